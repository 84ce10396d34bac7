"""The pipeline's own cost: a study of N built-in samples x 6 methods, run through the
Prefect flow into a Zarr store, against the bare attribution compute of the same work
(same model, same blocks, no Prefect, no Zarr) measured in the same run.

    .venv/bin/python benchmarks/bench_pipeline.py [--samples 2000] [--block-size 250] [--out FILE]

Reports: bare compute seconds, pipeline seconds, overhead = pipeline / bare - 1;
the time to resume the finished study (in-process, and the whole command line with
the command line); stored bytes per map for float32 and float16.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import storage
import xai_methods as xm
import zoo
from benchlib.report import publish
from flows.study import study

METHODS = ["saliency", "input_x_gradient", "guided_backprop", "gradcam", "gradcam_pp", "occlusion"]
PARAMS = {"occlusion": {"window": 16, "stride": 8}}


def bare(samples: int, block: int, methods: list[str]) -> float:
    """Data generation, normalisation, prediction and every method on every block, in memory; the methods
    that share a pass share it here too (`attribute_many`), as in a study."""
    model = zoo.load_model("shapes-cnn")
    dataset = zoo.load_dataset("shapes", limit=samples)
    t0 = time.perf_counter()
    for start in range(0, samples, block):
        batch = dataset.load(start, min(start + block, samples))
        images = model.preprocess(torch.from_numpy(batch.images))
        with torch.inference_mode():
            target = model(images).argmax(1)
        xm.attribute_many(methods, model, images, target=target, params=PARAMS)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=250)
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    methods = [m for m in METHODS if m in xm.available()]
    work = tempfile.mkdtemp(prefix="bench-pipeline-")
    store = os.path.join(work, "study.zarr")
    kw = dict(samples=args.samples, block_size=args.block_size, methods=methods, params=PARAMS, device="cpu")

    study(store=os.path.join(work, "warmup.zarr"), **dict(kw, samples=args.block_size))  # API up, imports warm
    t_bare = bare(args.samples, args.block_size, methods)
    t0 = time.perf_counter()
    summary = study(store=store, **kw)
    t_pipe = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = study(store=store, **kw)
    t_resume = time.perf_counter() - t0
    assert sum(again["computed_blocks"].values()) == 0
    cli = [os.path.join(os.path.dirname(sys.executable), "saliency-atlas"), "study", "--samples", str(args.samples),
           "--block-size", str(args.block_size), "--methods", ",".join(methods), "--param", "occlusion.window=16",
           "--param", "occlusion.stride=8", "--device", "cpu", "--store", store, "--figure", "none"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    t0 = time.perf_counter()
    subprocess.run(cli, check=True, capture_output=True, env=env)
    t_resume_cli = time.perf_counter() - t0
    per_map = {"float32": storage.Store(store).status()["bytes_per_map"]}
    half = os.path.join(work, "half.zarr")
    study(store=half, **dict(kw, samples=args.block_size * 2, methods=methods[:3], params={}), dtype="float16")
    per_map["float16"] = storage.Store(half).status()["bytes_per_map"]
    n_tasks = summary["blocks"] * (1 + len(methods))
    lines = [
        f"\n## Pipeline overhead ({args.samples} built-in samples x {len(methods)} methods)\n",
        f"`python benchmarks/bench_pipeline.py --samples {args.samples} --block-size {args.block_size}` "
        f"on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"load average at start {os.getloadavg()[0]:.2f}.\n",
        f"Methods: {', '.join(methods)} (occlusion window 16, stride 8); {n_tasks} block tasks.\n",
        "| measure | value |", "|---|---|",
        f"| bare compute (same work, no Prefect, no Zarr) | {t_bare:.1f} s |",
        f"| study flow (Prefect tasks, Zarr writes) | {t_pipe:.1f} s |",
        f"| pipeline overhead | {100 * (t_pipe / t_bare - 1):.1f} % (target <= 15 %) |",
        f"| resume a finished study, flow in process | {t_resume:.2f} s (target < 10 s) |",
        f"| resume a finished study, the whole command (starts no flow when nothing is pending) | {t_resume_cli:.1f} s |",
        f"| stored bytes per 64x64 map, float32, zstd | {per_map['float32']:.0f} |",
        f"| stored bytes per 64x64 map, float16, zstd | {per_map['float16']:.0f} |",
    ]
    publish("\n".join(lines) + "\n", args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
