"""A Clever-Hans model on the built-in shapes (Lapuschkin et al. 2019): `shapes-cnn` trained, seeded, on images
where every other square carries a watermark (a white square with a black hole, top right), and a folder of
fresh test images marked the same way, each with its object's mask beside it (`IMAGE.mask.png`, the folder
dataset's default). The model learns to call a watermarked image a square from the watermark.

    python -m zoo.clever_hans runs/clever_hans     # wm.pt and images/<class>/{wm,plain}-NNN.png (+ .mask.png)

Then study it like any folder (docs/findings.md, "A Clever-Hans model"):

    saliency-atlas study --dataset runs/clever_hans/images --model shapes-cnn --weights runs/clever_hans/wm.pt ...
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WATERMARKED = "wm"  # file-name prefix of the test images that carry the watermark
REGION = (0, 48, 12, 64)  # (y0, x0, y1, x1) around the watermark at 64 x 64: region_share's --metric-param


def mark(images: np.ndarray, labels: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy of (N, 3, 64, 64) `images` with the watermark on every other image of class `label`, and which."""
    out, flag = images.copy(), np.zeros(len(labels), bool)
    idx = np.flatnonzero(labels == label)[::2]
    out[idx, :, 2:10, 54:62] = 1.0
    out[idx, :, 4:8, 56:60] = 0.0
    flag[idx] = True
    return out, flag


def build(out: str | Path, *, train: int = 1500, test: int = 120, epochs: int = 3, seed: int = 0) -> dict[str, Path]:
    """Train the watermarked model into `out`/wm.pt and write `test` marked test images with their masks under
    `out`/images; returns the two paths. Seeded: the same weights and images every time on one machine."""
    from .models import SHAPES_PREPROCESS, ShapesCNN
    from .shapes import CLASSES, ShapesDataset
    from .training import fit

    root, square = Path(out), CLASSES.index("square")
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = ShapesDataset(seed=1, split="train", length=train).load(0, train)
    model = fit(ShapesCNN(), mark(data.images, data.labels, square)[0], data.labels, SHAPES_PREPROCESS,
                epochs=epochs, seed=seed)
    torch.save(model.state_dict(), root / "wm.pt")
    fresh = ShapesDataset(seed=1, split="test", length=test).load(0, test)
    images, flags = mark(fresh.images, fresh.labels, square)
    for i, (img, label, flag, mask) in enumerate(zip(images, fresh.labels, flags, fresh.masks)):
        folder = root / "images" / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{WATERMARKED if flag else 'plain'}-{i:03d}"
        Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(folder / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}.mask.png")
    return {"weights": root / "wm.pt", "images": root / "images"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the folder to write wm.pt and images/ into")
    ap.add_argument("--test", type=int, default=120, help="test images to write (default 120)")
    ap.add_argument("--train", type=int, default=1500, help="training images (default 1500)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    args = ap.parse_args(argv)
    paths = build(args.out, train=args.train, test=args.test, epochs=args.epochs)
    print(f"weights: {paths['weights']}\nimages:  {paths['images']}")


if __name__ == "__main__":
    main()
