"""The package works under every install mode, with block tasks on a local Dask cluster.

A Dask worker puts its own folder first on sys.path and spills to a folder called `storage` in
it; under a default (finder-mode) editable install that folder used to stand in for the
`storage` package and every task failed. Each mode is installed into a fresh virtual
environment (the dependencies come from this one, so nothing is downloaded) and runs a study
with `--workers 2` from a folder outside the checkout.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache")


def environment(tmp: Path, editable: bool) -> Path:
    """A fresh venv holding only this package (installed from a copy of the tree), the rest via a .pth."""
    src, venv = tmp / "src", tmp / "venv"
    shutil.copytree(ROOT, src, ignore=SKIP)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    target = ["-e", str(src)] if editable else [str(src)]
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    "--no-build-isolation", *target], check=True, capture_output=True, timeout=300)
    return py


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["non-editable", "default-editable"])
def test_a_study_on_two_dask_workers_under_each_install_mode(tmp_path, editable):
    py = environment(tmp_path, editable)
    run = tmp_path / "run"
    (run / "shadow" / "storage").mkdir(parents=True)  # a folder like a Dask worker's spill folder
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PYTHONWARNINGS="ignore", PREFECT_LOGGING_LEVEL="INFO")
    env.pop("PREFECT_API_URL", None)
    where = subprocess.run([py, "-c", "import sys; sys.path.insert(0, 'shadow'); import tasks, storage; "
                                      "print(storage.__file__, storage.Store.__name__)"],
                           cwd=run, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    home = tmp_path / ("src" if editable else "venv")
    assert where.stdout.startswith(str(home)), where.stdout  # the mode under test, and no shadowing
    r = subprocess.run([py, "-m", "flows.cli", "study", "--samples", "8", "--block-size", "4", "--methods",
                        "saliency,gradcam", "--workers", "2", "--store", "s.zarr", "--figure", "none"],
                       cwd=run, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 computed by this run" in r.stdout, r.stdout
    # The workers report to the run's temporary server (flows.study.reported_here), each did start its own.
    assert (r.stdout + r.stderr).count("Starting temporary server") == 1, r.stderr[-3000:]
    check = subprocess.run([py, "-c", "import xarray as xr; ds = xr.open_zarr('s.zarr'); "
                                      "print(bool(ds.done.all()), int(ds.attribution.isnull().sum()))"],
                           cwd=run, env=env, capture_output=True, text=True, timeout=120)
    assert check.stdout.split() == ["True", "0"], check.stdout + check.stderr
