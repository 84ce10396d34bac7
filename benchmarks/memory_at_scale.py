"""Peak resident memory and seconds per sample of a study as the number of samples grows (issue 34).

Each study runs in a fresh process on the built-in data (shapes-cnn, 64x64): the imports, then the peak
mark reset, then the command, so `work_mb` is what the study itself added to the process at its peak
(`peak_mb` includes the imports). Memory must not grow with the samples: only the work in flight counts.

With --commands, the commands that read the study afterwards are measured the same way, each in its own
process on each store: `evaluate` (one mask metric), `rank`, `aggregate`, `clusters` and `report`.

Run: .venv/bin/python benchmarks/memory_at_scale.py [SAMPLES ...]     (default 4096 16384 65536)
     .venv/bin/python benchmarks/memory_at_scale.py --methods saliency --block-size 64 512 4096
     .venv/bin/python benchmarks/memory_at_scale.py --commands 4096 16384
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from pathlib import Path
import flows.cli, flows.study, prefect  # the imports before the mark: they are not the study's memory
status = lambda key: int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                              if l.startswith(key + ":")).split()[1]) >> 10
Path("/proc/self/clear_refs").write_text("5")  # the peak mark (VmHWM) starts again from the current memory
before, started = status("VmRSS"), time.perf_counter()
code = flows.cli.main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "before_mb": before, "peak_mb": status("VmHWM"),
                  "seconds": time.perf_counter() - started}))
"""


def command_memory(argv: list[str]) -> dict[str, float]:
    """`saliency-atlas ARGV` in a fresh process: its peak resident memory, what the command added to the process
    after the imports (`work_mb`), and its seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines or json.loads(lines[-1])["code"]:
        raise RuntimeError(f"`saliency-atlas {' '.join(argv)}` failed:\n{out.stderr[-3000:]}")
    got = json.loads(lines[-1])
    return {"peak_mb": got["peak_mb"], "work_mb": got["peak_mb"] - got["before_mb"], "seconds": got["seconds"]}


def study_memory(samples: int, store: str, methods: str = "saliency,gradcam,input_x_gradient",
                 block_size: int = 256, metrics: str | None = None) -> dict[str, float]:
    """One study of `samples` built-in samples into `store`, in a fresh process: its peak resident memory,
    what the study added to it (`work_mb`), and the seconds per sample."""
    argv = ["study", "--dataset", "shapes", "--model", "shapes-cnn", "--methods", methods, "--samples",
            str(samples), "--block-size", str(block_size), "--store", store, "--figure", "none",
            *(["--metrics", metrics] if metrics else [])]
    got = command_memory(argv)
    return {"samples": samples, "peak_mb": got["peak_mb"], "work_mb": got["work_mb"],
            "ms_per_sample": round(1000 * got["seconds"] / samples, 2)}


def readers(store: str, out: str) -> dict[str, list[str]]:
    """The commands that read a study, as measured with --commands (in this order: `rank` needs the scores)."""
    return {"evaluate": ["evaluate", store, "--metrics", "pointing_game", "--no-baselines", "--plot", "none"],
            "rank": ["rank", store], "aggregate": ["aggregate", store, "--out", f"{out}.agg.zarr"],
            "clusters": ["clusters", store, "--method", "gradcam", "--figure", "none", "--json"],
            "report": ["report", store, "--out", f"{out}.report"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=int, nargs="*", default=[4096, 16384, 65536])
    parser.add_argument("--methods", default="saliency,gradcam,input_x_gradient")
    parser.add_argument("--metrics", default=None)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--commands", action="store_true", help="also measure the commands that read each study")
    args = parser.parse_args()
    print(f"{'samples':>8} {'peak MB':>8} {'study MB':>9} {'ms/sample':>10}   ({args.methods}, blocks of {args.block_size})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.samples:
            started = time.perf_counter()
            row = study_memory(n, f"{tmp}/s{n}.zarr", args.methods, args.block_size, args.metrics)
            rows.append(row)
            print(f"{n:>8} {row['peak_mb']:>8} {row['work_mb']:>9} {row['ms_per_sample']:>10}   "
                  f"({time.perf_counter() - started:.0f} s with the start)", flush=True)
            for name, argv in (readers(f"{tmp}/s{n}.zarr", f"{tmp}/s{n}") if args.commands else {}).items():
                got = command_memory(argv)
                row[name] = got["peak_mb"]
                print(f"{'':>8} {got['peak_mb']:>8} {got['work_mb']:>9} {got['seconds']:>9.1f}s   {name}", flush=True)
    first = rows[0]
    for row in rows[1:]:
        print(f"{row['samples']} against {first['samples']} samples: peak x{row['peak_mb'] / first['peak_mb']:.3f}, "
              f"the study's own memory x{row['work_mb'] / max(first['work_mb'], 1):.3f}"
              + "".join(f", {k} x{row[k] / first[k]:.3f}" for k in readers("", "") if k in row))


if __name__ == "__main__":
    main()
