"""Prefect's cost per block task, and what batching blocks into tasks saves.

For each block size, one study of N built-in samples with saliency is run through the study flow
twice: with one unit (block) per task, and with the flow's own batching (the first task measures
Prefect's cost against the work, then `units_per_task` groups the rest). The bare compute of the
same work (data, normalisation, prediction, maps; no Prefect, no Zarr) is measured in the same run.

    .venv/bin/python benchmarks/bench_orchestration.py [--samples 512] [--blocks 4,16,64,256] [--out FILE]

Reports per block size: tasks, seconds bare / one per task / batched, the pipeline's share over
bare, and Prefect's cost per task = (one-per-task - batched) / (tasks saved).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

import flows.study  # noqa: E402
from bench_pipeline import bare  # noqa: E402  (the same bare compute: data, prediction, maps)
from benchlib.report import publish  # noqa: E402


def flow_seconds(samples: int, block: int, batched: bool, tmp: str) -> float:
    store = os.path.join(tmp, f"s{block}{'b' if batched else ''}.zarr")
    real = flows.study.units_per_task
    flows.study.units_per_task = real if batched else (lambda *a: 1)
    try:
        t0 = time.perf_counter()
        flows.study.study(dataset="shapes", model="shapes-cnn", methods=["saliency"], samples=samples,
                          block_size=block, store=store, device="cpu", figure=None)
        return time.perf_counter() - t0
    finally:
        flows.study.units_per_task = real
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--blocks", default="4,16,64,256")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from prefect.testing.utilities import prefect_test_harness

    rows = ["| block size | block tasks | bare s | one unit per task s | batched s | one per task over bare "
            "| batched over bare | Prefect ms per task |", "|---|---|---|---|---|---|---|---|"]
    load = os.getloadavg()[0]
    with prefect_test_harness(server_startup_timeout=120), tempfile.TemporaryDirectory() as tmp:
        flow_seconds(64, 64, True, tmp)  # warm-up: imports, the model, the dataset cache
        for block in (int(b) for b in args.blocks.split(",")):
            tasks = 2 * -(-args.samples // block)  # ingest + saliency per block
            b = bare(args.samples, block, ["saliency"])
            one, batched = flow_seconds(args.samples, block, False, tmp), flow_seconds(args.samples, block, True, tmp)
            saved = max(tasks - 2 * 2, 1)  # batched: about one measuring task per stage plus a few groups
            rows.append(f"| {block} | {tasks} | {b:.1f} | {one:.1f} | {batched:.1f} | {100 * (one / b - 1):+.0f}% "
                        f"| {100 * (batched / b - 1):+.0f}% | {1000 * (one - batched) / saved:.0f} |")
            print(rows[-1], flush=True)
    text = "\n".join([f"`python benchmarks/bench_orchestration.py --samples {args.samples} --blocks {args.blocks}`, "
                      f"load average at start {load:.2f}, saliency on shapes-cnn, in-process flow (test harness "
                      "API).", "", *rows, ""])
    publish(text + "\n", args.out)


if __name__ == "__main__":
    main()
