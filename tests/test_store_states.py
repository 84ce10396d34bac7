"""Every command on every state a store can be left in.

A seeded generator drives random sequences of the real commands (study: new, grown, more methods, more
metrics; evaluate; clusters; report; status; status --verify; aggregate; figure) on one small store, some
of them in a child process killed with SIGKILL at a random write or sent SIGTERM at a random moment.
After every step: the command succeeded, or failed with one line and no traceback, or died of the signal
it was sent (a SIGTERM'd command says how to resume); `status --verify` passes, names what to recompute,
or says in one line which state the store is in; and the next command goes on from there. At the end the
user's own rerun of the study finishes the store, which then equals the same end state reached in one
uninterrupted run, variable by variable.

`make test` runs `SEQUENCES` seeded sequences; `SALIENCY_ATLAS_STATE_SEQUENCES=N make test-fast` (or pytest
-m nightly) runs N more, as a nightly job would. Each sequence prints what it ran (`-s` shows it).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import xarray as xr

from flows.cli import main
from helpers import KILLER

SEQUENCES = 3  # in CI
NIGHTLY = int(os.environ.get("SALIENCY_ATLAS_STATE_SEQUENCES", "0"))
STEPS = 7
METHODS = ["saliency", "gradcam", "input_x_gradient", "contrastive_gradcam"]  # the last: the contrast variable
METRICS = ["pointing_game", "sparseness", "deletion"]
SAMPLES = [8, 12, 16]  # with blocks of 8: a short last block, grown later
# per command, the arrays whose Nth write a SIGKILL lands on: creation (sample_id), ingestion, maps, scores,
# growth (xai_method, metric)
KILL_AT = {"study": ["sample_id", "ingested", "image", "attribution", "done", "score", "scored", "xai_method"],
           "evaluate": ["score", "score_status", "curve", "scored", "metric"]}
COMPARED = ("attribution", "failure", "image", "label", "prediction", "target", "contrast", "logits", "score",
            "score_status", "curve")
DELETION = ["--metric-param", "deletion.steps=4"]
RUN = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"


@dataclass
class Sequence:
    """What the user has asked of the store so far, and what the sequence did."""

    store: str
    out: str
    samples: int = 0
    methods: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    layout: list[str] = field(default_factory=list)  # fixed at creation: with or without the model inputs
    kills: int = 0
    terms: int = 0

    def study_argv(self) -> list[str]:
        argv = ["study", "--samples", str(self.samples), "--block-size", "8", "--methods", ",".join(self.methods),
                "--no-baselines", "--device", "cpu", "--figure", "none", "--store", self.store, *self.layout]
        if self.metrics:
            argv += ["--metrics", ",".join(self.metrics), *DELETION * ("deletion" in self.metrics)]
        return argv


def next_command(rng: random.Random, seq: Sequence) -> list[str]:
    """A random command a user could run next, growing what is asked of the store now and then."""
    kind = rng.choice(["study", "study", "evaluate", "clusters", "report", "status", "aggregate", "figure"])
    if kind == "study" or not seq.methods:
        seq.samples = max(seq.samples, rng.choice(SAMPLES))
        new = [m for m in METHODS if m not in seq.methods]
        if new and (not seq.methods or rng.random() < 0.5):
            seq.methods.append(rng.choice(new))
        if rng.random() < 0.3 and len(seq.metrics) < len(METRICS):
            seq.metrics.append(next(m for m in METRICS if m not in seq.metrics))
        return seq.study_argv()
    if kind == "evaluate":
        left = [m for m in METRICS if m not in seq.metrics]
        metric = rng.choice(left or seq.metrics or METRICS)
        if metric not in seq.metrics:
            seq.metrics.append(metric)
        return ["evaluate", seq.store, "--metrics", metric, *DELETION * (metric == "deletion"), "--no-baselines",
                "--device", "cpu", "--plot", "none", "--json"]
    return {"clusters": ["clusters", seq.store, "--method", rng.choice(seq.methods), "--figure", "none", "--json"],
            "report": ["report", seq.store, "--out", f"{seq.out}/report", "--max-samples", "4"],
            "status": ["status", seq.store],
            "aggregate": ["aggregate", seq.store, "--out", f"{seq.out}/agg.zarr"],
            "figure": ["figure", seq.store, "--samples", "0,1", "--out", f"{seq.out}/figure.png"]}[kind]


def api_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONWARNINGS="ignore")


def in_child(argv: list[str], rng: random.Random, seq: Sequence) -> tuple[int, str]:
    """`argv` in a child process of its own session, killed with SIGKILL at a random write or sent SIGTERM
    after a random delay; returns its exit code and stderr, once no process of its session is left."""
    if rng.random() < 0.6:
        array, nth = rng.choice(KILL_AT[argv[0]]), rng.randint(1, 4)
        cmd, what = [sys.executable, "-c", KILLER, array, str(nth), "half" if rng.random() < 0.5 else "whole", *argv], \
            f"SIGKILL at write {nth} of {array}"
        seq.kills += 1
    else:
        cmd, what = [sys.executable, "-c", RUN, *argv], None
    child = subprocess.Popen(cmd, env=api_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    if what is None:
        delay = rng.uniform(6, 16)
        what = f"SIGTERM after {delay:.1f} s"
        seq.terms += 1
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=600)
    for _ in range(100):  # nothing the command started outlives it (a temporary server, Dask workers)
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{argv[0]} ({what}) left processes running in its session")
    seq.log.append(f"{argv[0]} ({what}) -> {child.returncode}{said(err)}")
    return child.returncode, err


def said(err: str) -> str:
    """The command's own last line on stderr (its error or how it stopped), for the sequence's log."""
    lines = [line for line in err.strip().splitlines() if line.startswith("saliency-atlas:")]
    return f": {lines[-1][len('saliency-atlas: '):][:160]}" if lines else ""


def check_outcome(code: int, err: str, argv: list[str]) -> None:
    """Succeeded; or failed with one line naming the problem; or died of the signal it was sent (SIGTERM:
    after saying how to resume, unless it came before the command line had even started)."""
    assert "Traceback" not in err, f"{argv}: {err[-3000:]}"
    lines = [line for line in err.strip().splitlines() if line.startswith("saliency-atlas:")]
    if code in (0, -signal.SIGKILL, -signal.SIGTERM):
        return
    if code == 128 + signal.SIGTERM:
        assert lines and "run the same command again" in lines[-1], err[-2000:]
        return
    assert len(lines) == 1 and lines[0].startswith("saliency-atlas: error: "), f"{argv} -> {code}: {err[-2000:]}"


def verify(capsys, seq: Sequence) -> None:
    """`status --verify`: every finished block matches its checksum (0); or damaged ones are named and marked
    to recompute (1); or one line says which state the store is in and what to run (2)."""
    capsys.readouterr()
    code = main(["status", seq.store, "--verify"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 1:
        assert "damaged" in out, out
    elif code == 2:
        assert len(err.strip().splitlines()) == 1 and ("no study store" in err or "interrupted" in err), err
    else:
        assert code == 0 and "verified" in out, (code, out, err)
    seq.log.append(f"  verify -> {code}")


REFERENCES: dict[tuple, str] = {}


def reference(seq: Sequence, root) -> xr.Dataset:
    """The end state reached in one uninterrupted run of the final study (made once per final request)."""
    key = (seq.samples, tuple(sorted(seq.methods)), tuple(sorted(seq.metrics)), tuple(seq.layout))
    if key not in REFERENCES:
        path = str(root / f"reference-{len(REFERENCES)}.zarr")
        ref = Sequence(store=path, out=str(root), samples=seq.samples, methods=list(seq.methods),
                       metrics=list(seq.metrics), layout=seq.layout)
        assert main(ref.study_argv()) == 0
        REFERENCES[key] = path
    return xr.open_zarr(REFERENCES[key])


def assert_same_end_state(store: str, ref: xr.Dataset, seq: Sequence) -> None:
    ds = xr.open_zarr(store)
    assert list(ds.sample_id.values) == list(ref.sample_id.values)
    for name in COMPARED:
        if name not in ref:
            continue
        sel = {k: v for k, v in (("xai_method", seq.methods), ("metric", seq.metrics)) if k in ref[name].dims}
        got, want = ds[name].sel(**sel).values, ref[name].sel(**sel).values
        if name == "curve":  # the sequence's store may have more steps (a longer curve asked earlier): none here
            got = got[..., : want.shape[-1]]
        np.testing.assert_array_equal(got, want, err_msg=f"{name} differs after {seq.log}")
    for flag in ("done", "ingested", "scored"):
        if flag in ds:
            assert bool(ds[flag].sel(**({"xai_method": seq.methods} if "xai_method" in ds[flag].dims else {})).all())


def run_sequence(seed: int, tmp_path, capsys) -> Sequence:
    rng = random.Random(seed)
    seq = Sequence(store=str(tmp_path / "store.zarr"), out=str(tmp_path), layout=rng.choice([[], ["--no-images"]]))
    for _ in range(STEPS):
        argv = next_command(rng, seq)
        if argv[0] in ("study", "evaluate") and rng.random() < 0.45:
            code, err = in_child(argv, rng, seq)
        else:
            capsys.readouterr()
            code = main(argv)
            err = capsys.readouterr().err
            seq.log.append(f"{argv[0]} -> {code}{said(err)}")
        check_outcome(code, err, argv)
        verify(capsys, seq)
    assert main(seq.study_argv()) == 0, capsys.readouterr().err  # the user reruns the study
    verify(capsys, seq)
    assert_same_end_state(seq.store, reference(seq, tmp_path), seq)
    for argv in (["clusters", seq.store, "--method", seq.methods[0], "--figure", "none"],
                 ["report", seq.store, "--out", f"{seq.out}/final-report"], ["aggregate", seq.store, "--out",
                                                                             f"{seq.out}/final-agg.zarr"]):
        capsys.readouterr()
        assert main(argv) == 0, capsys.readouterr().err
    return seq


def report(seed: int, seq: Sequence) -> None:
    with_signals = sum("SIG" in line for line in seq.log)
    print(f"\nsequence {seed} ({' '.join(seq.layout) or 'with images'}): {STEPS} steps + the final rerun, "
          f"{with_signals} with a signal ({seq.kills} SIGKILL, {seq.terms} SIGTERM):\n  " + "\n  ".join(seq.log))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SEQUENCES))
def test_random_command_sequences_with_kills_end_in_the_uninterrupted_state(prefect_api, tmp_path, capsys, seed):
    seq = run_sequence(seed, tmp_path, capsys)
    with capsys.disabled():
        report(seed, seq)


if NIGHTLY:  # defined only when asked for: an empty parameter set would show as a skipped test

    @pytest.mark.nightly
    @pytest.mark.parametrize("seed", range(SEQUENCES, SEQUENCES + NIGHTLY))
    def test_more_sequences_nightly(prefect_api, tmp_path, capsys, seed):
        seq = run_sequence(seed, tmp_path, capsys)
        with capsys.disabled():
            report(seed, seq)
