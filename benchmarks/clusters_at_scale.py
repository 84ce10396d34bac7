"""Peak memory and seconds of `clusters` as a study grows (issue 34): SpRAy clusters at most `CAP` maps a class and
assigns the others in a second pass, so its memory should not grow with the samples, and its time only linearly.

Each store is synthetic and cheap: 16x16 maps of one method, two classes, each class's maps one of two shapes
(a blob in a corner or in the centre) plus seeded noise, written block by block; no images. `clusters` runs in a
fresh process per store (`memory_at_scale.command_memory`): peak resident memory, what the command added after
its imports, and its seconds. Without --json, whose `sample_ids` list every sample (output that grows with the
study by design).

Run: .venv/bin/python benchmarks/clusters_at_scale.py [SAMPLES ...]     (default 4096 65536 262144)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIDE, BLOCK = 16, 1024  # blocks of 1024 samples, as a study of small maps might have


def synthetic_store(path: str, samples: int) -> str:
    """A finished study store of `samples` samples with gradcam maps of two shapes per class."""
    import storage

    t = storage.Template(sample_ids=[f"s/{i:07d}" for i in range(samples)], classes=["a", "b"], methods=["gradcam"],
                         image_shape=(3, SIDE, SIDE), block_size=BLOCK, has_masks=False, params={"gradcam": {}},
                         keep_images=False, attrs={"model": "synthetic", "dataset": "synthetic"})
    s = storage.create(path, t)
    g, rng = s.group, np.random.default_rng(0)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    shapes = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0) for cy, cx in ((3, 3), (8, 8))])
    labels = rng.integers(0, 2, samples)
    g["label"][:] = labels
    g["prediction"][:] = labels
    for start in range(0, samples, 8 * BLOCK):
        n = min(8 * BLOCK, samples - start)
        maps = shapes[rng.integers(0, 2, n)] + 0.05 * rng.random((n, SIDE, SIDE))
        g["attribution"][0, start:start + n] = maps.astype(np.float32)
    blocks = g["done"].shape[1]
    g["ingested"][:] = np.ones(blocks, bool)
    g["done"][:] = np.ones((1, blocks), bool)
    g["failure"][:] = np.zeros((1, samples), np.int8)
    return path


def main(sizes: list[int]) -> None:
    from memory_at_scale import command_memory

    print(f"{'samples':>8} {'peak MB':>8} {'work MB':>8} {'seconds':>8}   (clusters, 16x16 maps, 2 classes)")
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            store = synthetic_store(f"{tmp}/c{n}.zarr", n)
            got = command_memory(["clusters", store, "--method", "gradcam", "--figure", "none"])  # --json: every id
            first = first or got
            print(f"{n:>8} {got['peak_mb']:>8} {got['work_mb']:>8} {got['seconds']:>8.1f}   "
                  f"peak x{got['peak_mb'] / first['peak_mb']:.3f}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [4096, 65536, 262144])
