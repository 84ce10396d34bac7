"""What a user of the Prefect UI sees: a real Prefect server, the nightly audit deployed and run by a
process worker as the README says, and every figure artifact of the run opened in headless Chromium
(the pictures load; the page logs no error)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from browser import broken_images, chromium, console_errors
from test_audit import export_shapes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FIGURES = {"dataset-audit-shares-chart", "dataset-audit-samples-figure", "dataset-audit-clusters-gradcam",
           "dataset-audit-clusters-saliency"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/api{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on a free port, with its own home (database) in a temporary folder."""
    home = tmp_path_factory.mktemp("prefect-ui")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PWD=str(ROOT),
               PREFECT_UI_API_URL=f"{base}/api")  # the UI's own calls go to this port, not the default 4200
    p = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
              home / "server.log")
    try:
        for _ in range(240):
            try:
                if api(base, "/health") is True:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the Prefect server did not start: " + (home / "server.log").read_text()[-2000:])
        yield base, dict(env, PREFECT_API_URL=f"{base}/api"), home
    finally:
        stop(p)


def prefect(env: dict, *argv: str) -> str:
    done = subprocess.run([str(BIN / "prefect"), *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def audit_run(server, tmp_path_factory):
    """The README's steps: a process pool, `prefect deploy`, a run of dataset-audit/nightly, a worker."""
    base, env, home = server
    work = tmp_path_factory.mktemp("ui-audit")
    export_shapes(work / "images", 0, 12)
    prefect(env, "work-pool", "create", "saliency-atlas", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--name", "nightly")
    params = {"dataset": str(work / "images"), "store": str(work / "audit.zarr"), "report_dir": str(work / "report"),
              "block_size": 4}
    out = prefect(env, "deployment", "run", "dataset-audit/nightly", "--params", json.dumps(params))
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "saliency-atlas"], env, home / "worker.log")
    try:
        for _ in range(600):
            state = api(base, f"/flow_runs/{run_id}")["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
    finally:
        stop(worker)
    assert state == "COMPLETED", (home / "worker.log").read_text()[-3000:]
    return base, run_id, work


@pytest.mark.slow
def test_every_figure_of_the_audit_shows_in_the_prefect_ui(audit_run):
    base, run_id, work = audit_run
    artifacts = {a["key"]: a for a in api(base, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})}
    assert FIGURES <= set(artifacts), sorted(artifacts)
    with chromium() as driver:
        for key in sorted(FIGURES):
            driver.get(f"{base}/artifacts/artifact/{artifacts[key]['id']}")
            for _ in range(60):  # the UI renders the markdown after its API call returns
                sources = driver.execute_script("return Array.from(document.images).map(i => i.src.slice(0, 22));")
                if "data:image/png;base64," in sources and not broken_images(driver):
                    break
                time.sleep(0.5)
            assert "data:image/png;base64," in sources, f"{key}: no inline picture on the page"
            assert broken_images(driver) == [], key
            loaded = driver.execute_script(
                "return Array.from(document.images).filter(i => i.src.startsWith('data:image/png')).map(i => i.naturalWidth);")
            assert loaded and min(loaded) > 100, f"{key}: the figure did not decode"
            errors = [e for e in console_errors(driver) if "favicon.ico" not in e]
            assert errors == [], f"{key}: {errors}"
            assert str(work / "report") in driver.find_element("tag name", "body").text, "the file's path is kept"
    assert (work / "report" / "index.html").exists()
    assert Path(str(work / "report" / "index.html")).as_uri() in artifacts["dataset-audit-atlas"]["data"]
