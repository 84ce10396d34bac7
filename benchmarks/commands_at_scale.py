"""Seconds of the commands that must answer at any size, on a synthetic study store of a million samples
(issue 34): `status`, `evaluate`'s table of stored scores, `rank`, and the listings and `--help` (a fresh
process each). The store is built cheaply: tiny 4x4 maps never written (flags say done), no images, random scores
and statuses written block by block. What the commands read is flags, attributes and scores, never maps.

Run: .venv/bin/python benchmarks/commands_at_scale.py [SAMPLES]          (default 1000000)
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS, METRICS = ["saliency", "gradcam", "random_map"], ["pointing_game", "deletion"]


def synthetic_store(path: str, samples: int, block: int = 8192) -> str:
    """A finished study store of `samples` samples (4x4 maps, never written; flags set), scored by `METRICS`."""
    import storage

    t = storage.Template(sample_ids=[f"s/{i:07d}" for i in range(samples)], classes=["a", "b"], methods=METHODS,
                         image_shape=(3, 4, 4), block_size=block, has_masks=False,
                         params={m: {} for m in METHODS}, keep_images=False, metrics=METRICS,
                         metric_params={k: {} for k in METRICS}, status_codes={0: "scored"},
                         attrs={"model": "synthetic", "dataset": "synthetic"})
    s = storage.create(path, t)
    g, rng = s.group, np.random.default_rng(0)
    blocks = g["done"].shape[1]
    g["label"][:] = rng.integers(0, 2, samples)
    g["prediction"][:] = g["label"][:]
    g["score"][:] = rng.random((len(METHODS), samples, len(METRICS)), dtype=np.float32)
    g["score_status"][:] = np.zeros((len(METHODS), samples, len(METRICS)), np.int8)
    g["ingested"][:] = np.ones(blocks, bool)
    g["done"][:] = np.ones((len(METHODS), blocks), bool)
    g["failure"][:] = np.zeros((len(METHODS), samples), np.int8)
    g["scored"][:] = np.ones((len(METHODS), len(METRICS), blocks), bool)
    return path


def timed(argv: list[str]) -> float:
    """Seconds of `saliency-atlas ARGV` in a fresh process, imports included."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def main(samples: int = 1_000_000) -> None:
    import storage

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        store = synthetic_store(f"{tmp}/million.zarr", samples)
        print(f"synthetic store of {samples:,} samples built in {time.perf_counter() - started:.1f} s")
        rows = {"--help": timed(["--help"]), "methods": timed(["methods"]), "metrics": timed(["metrics"]),
                "status": timed(["status", store]), "rank (1000 resamples)": timed(["rank", store])}
        started = time.perf_counter()
        ds = storage.open_dataset(store)
        storage.score_table(ds)
        storage.comparisons(ds, [("saliency", "random_map")])
        rows["evaluate's table (in process)"] = time.perf_counter() - started
        for name, seconds in rows.items():
            print(f"{name:<32} {seconds:6.2f} s")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
