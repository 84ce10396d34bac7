"""Protocol stores as safe as study stores: a run killed at any moment resumes bit-identically, two runs at
once share the work and compute each unit once, a torn chunk is named by `status --verify` and recomputed;
the store is opened once per run; scores are checksummed like maps."""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import storage
from flows.cli import main
from helpers import killed_run

SANITY = ["sanity", "--methods", "saliency,gradcam", "--samples", "8", "--figure", "none", "--json"]

# A child that records each unit it writes (part and unit, one line each) before running the command line.
RECORDER = textwrap.dedent("""
    import sys
    import storage.results as results
    log, real = open(sys.argv[1], "a", buffering=1), results.ResultStore.write
    def write(self, part, unit, **values):
        real(self, part, unit, **values)
        log.write(f"{part} {tuple(unit)}\\n")
    results.ResultStore.write = write
    from flows.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONWARNINGS="ignore")


def assert_same_store(a: str, b: str) -> None:
    """Every variable of two protocol stores equal, bit for bit (NaN where NaN)."""
    x, y = storage.ResultStore(a, "r").dataset(), storage.ResultStore(b, "r").dataset()
    assert sorted(x.data_vars) == sorted(y.data_vars)
    for name in x.data_vars:
        assert np.array_equal(x[name].values, y[name].values, equal_nan=x[name].dtype.kind == "f"), name


@pytest.fixture(scope="module")
def reference(prefect_api, tmp_path_factory):
    """The sanity check run once, uninterrupted."""
    path = str(tmp_path_factory.mktemp("reference") / "sanity.zarr")
    assert main([*SANITY, "--store", path]) == 0
    return path


@pytest.mark.slow
@pytest.mark.parametrize("array, nth, half", [
    ("original", 2, True),        # inside a unit's data: the second method's maps half written
    ("checksum_step", 3, False),  # a unit's data written, its checksum and flag not
    ("done_step", 5, False),      # between one unit's checksum and its flag, four units finished
], ids=["mid-data", "before-checksum", "before-flag"])
def test_a_protocol_killed_at_any_moment_resumes_bit_identically(reference, tmp_path, array, nth, half):
    path = str(tmp_path / "killed.zarr")
    killed_run(SANITY, path, array, nth, half)
    st = storage.ResultStore(path, "r").status()["parts"]
    assert sum(done for done, _ in st.values()) < sum(total for _, total in st.values())  # it stopped midway
    assert main([*SANITY, "--store", path]) == 0
    assert_same_store(path, reference)


@pytest.mark.slow
def test_two_protocol_runs_at_once_compute_each_unit_once(reference, tmp_path):
    path, logs = str(tmp_path / "shared.zarr"), [tmp_path / "a.log", tmp_path / "b.log"]
    runs = [subprocess.Popen([sys.executable, "-c", RECORDER, str(log), *SANITY, "--store", path], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for log in logs]
    for r in runs:
        out, err = r.communicate(timeout=900)
        assert r.returncode == 0, err[-2000:]
    written = collections.Counter(line for log in logs for line in log.read_text().splitlines())
    total = sum(n for _, n in storage.ResultStore(reference, "r").status()["parts"].values())
    assert len(written) == total and set(written.values()) == {1}, written.most_common(3)
    print("units written by each run:", [len(log.read_text().splitlines()) for log in logs])
    assert_same_store(path, reference)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_torn_protocol_chunk_is_named_by_verify_and_recomputed(reference, tmp_path, capsys):
    import shutil

    path = str(tmp_path / "torn.zarr")
    shutil.copytree(reference, path)
    chunk = Path(path) / "similarity" / "c" / "1" / "0" / "2" / "0" / "0"  # gradcam, cascading, the third layer
    _truncate(chunk)
    capsys.readouterr()
    assert main(["status", path, "--verify"]) == 1
    out = capsys.readouterr().out
    damaged = [line for line in out.splitlines() if line.startswith("damaged")]
    assert len(damaged) == 1 and "step unit (1, 0, 2)" in damaged[0], out
    assert "marked not done" in out
    assert storage.ResultStore(path, "r").status()["parts"]["step"][0] == \
        storage.ResultStore(reference, "r").status()["parts"]["step"][0] - 1
    assert main([*SANITY, "--store", path]) == 0
    assert_same_store(path, reference)
    assert main(["status", path, "--verify"]) == 0
    assert "every one matches its checksum" in capsys.readouterr().out


def test_a_torn_score_chunk_is_named_by_verify_and_recomputed(prefect_api, tmp_path, capsys):
    import shutil

    argv = ["study", "--methods", "saliency", "--samples", "16", "--block-size", "8", "--metrics", "sparseness",
            "--no-baselines", "--figure", "none"]
    ref, path = str(tmp_path / "ref.zarr"), str(tmp_path / "torn.zarr")
    assert main([*argv, "--store", ref]) == 0
    shutil.copytree(ref, path)
    _truncate(Path(path) / "score" / "c" / "0" / "1" / "0")  # saliency, block 1, sparseness
    capsys.readouterr()
    assert main(["status", path, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "damaged  block 1 saliency scores of sparseness" in out, out
    assert storage.Store(path, "r").pending_scores("saliency", "sparseness") == [1]
    assert main([*argv, "--store", path]) == 0
    a, b = storage.open_dataset(path), storage.open_dataset(ref)
    for name in ("score", "score_status", "score_checksum"):
        assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name


def test_a_protocol_run_opens_its_store_and_loads_its_inputs_once(prefect_api, tmp_path, monkeypatch):
    """The command line validates by opening the store; the flow and every task reuse it (before: 2L+3 loads
    of the model and images, predictions and hashes for a sanity check of L layers)."""
    from tasks.protocols import common, sanity

    loads = []
    real = common.load_inputs
    monkeypatch.setattr(sanity, "load_inputs", lambda spec: loads.append(spec) or real(spec))
    assert main([*SANITY, "--store", str(tmp_path / "once.zarr")]) == 0
    assert len(loads) == 1
    assert main([*SANITY, "--store", str(tmp_path / "once.zarr")]) == 0  # a rerun in this process, nothing
    assert len(loads) == 1  # changed: the store's flags say what is left; the loaded inputs are reused
    assert main([*SANITY, "--samples", "4", "--store", str(tmp_path / "other.zarr")]) == 0
    assert len(loads) == 2


@pytest.mark.slow
def test_a_protocol_spreads_its_units_over_dask_workers_with_the_same_result(reference, tmp_path):
    """`--workers 2`: the randomised models (independent units) run on a local Dask cluster, each worker
    opening the store once; the store equals the one-process run's."""
    path = str(tmp_path / "dask.zarr")
    assert main([*SANITY, "--store", path, "--workers", "2"]) == 0
    assert_same_store(path, reference)
