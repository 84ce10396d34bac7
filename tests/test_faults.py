"""Faults a nightly audit meets: kills at random moments, two runs on one store, a claim whose owner
died, a Dask worker killed mid-block. Each ends with a store bit-identical to an uninterrupted run,
and no finished block computed twice."""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import xarray as xr

import storage
from flows.study import study
from helpers import killed_run

ARGS = dict(samples=32, block_size=8, methods=["saliency", "gradcam"], metrics=["pointing_game", "deletion"],
            metric_params={"deletion": {"steps": 8}}, baselines=False, device="cpu")
CLI = ["study", "--samples", "32", "--block-size", "8", "--methods", "saliency,gradcam", "--metrics",
       "pointing_game,deletion", "--metric-param", "deletion.steps=8", "--no-baselines", "--device", "cpu",
       "--figure", "none"]
VARIABLES = ("attribution", "failure", "checksum", "image", "logits", "prediction", "label", "score", "score_status",
             "curve", "done", "ingested", "scored")

# (array, writes of it in one uninterrupted run): the moments a kill can land on
WRITES = {"ingested": 4, "image": 4, "attribution": 8, "failure": 8, "checksum": 8, "done": 8,
          "score": 16, "curve": 8, "scored": 16}


def digests(path: str) -> dict[str, str]:
    ds = xr.open_zarr(path)
    return {v: hashlib.sha256(ds[v].values.tobytes()).hexdigest() for v in VARIABLES}


def api_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def reference(prefect_api, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("faults") / "reference.zarr")
    study(store=path, **ARGS)
    return path


def trials(n: int = 10, seed: int = 13) -> list[tuple[str, int, bool]]:
    """Seeded random kill moments: an array, which of its writes, whole or half-way (half-way only
    for the arrays written a block at a time)."""
    rng = random.Random(seed)
    out = [("ingested", 2, False), ("attribution", 7, True), ("score", 13, False),  # between blocks, mid-chunk,
           ("curve", 5, True)]  # mid-evaluation
    while len(out) < n:
        array = rng.choice(sorted(WRITES))
        moment = (array, rng.randint(1, WRITES[array]), array in ("attribution", "image", "score", "curve")
                  and rng.random() < 0.5)
        if moment not in out:
            out.append(moment)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("array, nth, half", trials())
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(reference, tmp_path, array, nth, half):
    store = str(tmp_path / "killed.zarr")
    killed_run(CLI, store, array, nth, half)
    before = xr.open_zarr(store).load() if storage.exists(store) else None
    summary = study(store=store, **ARGS)
    if before is not None:  # exactly the blocks not finished at the kill were computed
        assert summary["ingested_blocks"] == int((~before.ingested.values).sum())
        for i, m in enumerate(before.xai_method.values):
            assert summary["computed_blocks"][str(m)] == int((~before.done.values[i]).sum()), m
        assert sum(summary["scored_blocks"].values()) == int((~before.scored.values).sum())
    assert digests(store) == digests(reference)


# --------------------------------------------------------------------------- two runs at once


def test_two_runs_on_one_store_at_once_compute_each_block_once(reference, tmp_path):
    store = str(tmp_path / "shared.zarr")
    runs = [subprocess.Popen([sys.executable, "-m", "flows.cli", *CLI, "--store", store], env=api_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [e[-2000:] for _, e in outs]
    computed = [int(re.search(r"attribution blocks: (\d+) computed by this run", o).group(1)) for o, _ in outs]
    assert sum(computed) == 4 * 2, (computed, [o for o, _ in outs])  # 4 blocks x 2 methods, each once
    assert digests(store) == digests(reference)
    assert storage.holders(store) == []


CLAIMER = textwrap.dedent("""
    import sys, time, storage
    with storage.claim(sys.argv[1], "maps-saliency-0"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_claim_ends_with_its_owner_even_when_killed(tmp_path):
    store = str(tmp_path / "s.zarr")
    owner = subprocess.Popen([sys.executable, "-c", CLAIMER, store], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "held"
    held = storage.holders(store)
    assert [(c["unit"], c["pid"]) for c in held] == [("maps-saliency-0", owner.pid)]
    got = threading.Event()

    def take() -> None:
        with storage.claim(store, "maps-saliency-0"):
            got.set()

    waiter = threading.Thread(target=take, daemon=True)
    waiter.start()
    assert not got.wait(1.0), "a held claim must make another run wait"
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert got.wait(30), "the kernel releases a killed owner's claim"
    waiter.join(30)  # the waiter releases it in turn
    assert storage.holders(store) == []


# --------------------------------------------------------------------------- a Dask worker killed


@pytest.mark.slow
def test_a_dask_worker_killed_mid_block_is_recomputed_elsewhere(reference, tmp_path):
    store = str(tmp_path / "dask.zarr")
    killed: list[int] = []

    def killer() -> None:  # the first claim held by another process is a worker mid-block: kill it
        deadline = time.time() + 300
        while not killed and time.time() < deadline:
            for c in storage.holders(store):
                if c["unit"].startswith("maps-") and c.get("pid") not in (None, os.getpid()):
                    os.kill(c["pid"], signal.SIGKILL)
                    killed.append(c["pid"])
                    break
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = study(store=store, workers=2, **ARGS)
    thread.join(5)
    assert killed, "no worker was caught mid-block"
    assert sum(summary["computed_blocks"].values()) == 4 * 2
    assert digests(store) == digests(reference)
    assert np.asarray(xr.open_zarr(store).done.values).all()


# --------------------------------------------------------------------------- kills during creation, SIGTERM, Ctrl-C


@pytest.mark.slow
def test_a_creation_killed_midway_is_named_by_every_command_and_recreated_by_the_same_study(reference, tmp_path,
                                                                                           capsys):
    from flows.cli import main

    store = str(tmp_path / "creating.zarr")
    killed_run(CLI, store, "sample_id", 1, half=False)  # the root's metadata is written, the arrays not all
    assert storage.creation_state(store) == "unfinished"
    for argv in (["status", store], ["report", store], ["evaluate", store, "--metrics", "sparseness"],
                 ["clusters", store, "--method", "saliency"], ["aggregate", store], ["figure", store]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "was interrupted while it was being created" in err, (argv, err)
    summary = study(store=store, **ARGS)  # the same study: created again, then computed
    assert summary["ingested_blocks"] == 4
    assert digests(store) == digests(reference)


def _sent(signum: int, store: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """The study's command line in a session of its own, sent `signum` once its first block is written."""
    # as a terminal's foreground command: a shell's background job (CI may be one) starts with SIGINT ignored
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", *CLI, "--store", store], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        with contextlib.suppress(Exception):  # a flag chunk being written as it is read: try again
            if storage.exists(store) and storage.Store(store, mode="r").group["ingested"][:].any():
                break
        time.sleep(0.05)
    run.send_signal(signum)
    _, err = run.communicate(timeout=300)
    return run, err


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_the_study_cleanly_and_the_same_command_resumes(reference, tmp_path, signum):
    """Without an API to report to, the study starts Prefect's temporary server: the signal must stop it too
    (SIGTERM used to leave it running), and every process the run started, before the command exits."""
    store = str(tmp_path / "stopped.zarr")
    env = {k: v for k, v in api_env().items() if k != "PREFECT_API_URL"}
    run, err = _sent(signum, store, env)
    assert run.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1] if "Stopping temporary server" not in err.strip().splitlines()[-1] else \
        err.strip().splitlines()[-2]
    assert re.search(r"saliency-atlas: stopped by (SIGTERM|Ctrl-C).*every finished block is kept in .*"
                     r"blocks ingested; maps saliency \d+/4, gradcam \d+/4\): run the same command again", last), last
    with contextlib.suppress(ProcessLookupError):  # nothing of its session is left: no server, no worker
        os.killpg(run.pid, 0)
        raise AssertionError("the stopped study left processes running")
    summary = study(store=store, **ARGS)
    assert digests(store) == digests(reference)
    assert sum(summary["computed_blocks"].values()) < 4 * 2 or summary["ingested_blocks"] < 4


@pytest.mark.slow
def test_a_growth_killed_after_its_new_names_and_before_their_fingerprint_resumes(reference, tmp_path):
    """The sample names are committed before the dataset fingerprint that covers them is recorded: a kill in
    between left the fingerprint of fewer samples than the store names, and every later run was refused as
    'the stored samples changed'. The fingerprint records how many samples it covers."""
    store = str(tmp_path / "grown.zarr")
    study(store=store, **{**ARGS, "samples": 12, "methods": ["saliency"], "metrics": [], "metric_params": {}})
    killed_run(CLI, store, "xai_method", 1, half=True)  # after `sample_id` grew, halfway through the methods
    assert len(storage.Store(store, mode="r").sample_ids()) == 32
    study(store=store, **ARGS)
    assert digests(store) == digests(reference)
