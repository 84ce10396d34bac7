"""Train the built-in ``shapes-cnn`` on the ``shapes`` dataset (CPU, a few minutes).

    python -m zoo.train_shapes_cnn [--out zoo/weights/shapes_cnn.pt] [--epochs N] [--seed 0]

Trains on split "train" (seed ``--seed``), reports accuracy on 1000 "val" samples after
each epoch, saves the state dict, then reloads it through ``zoo.load_model`` and prints
the accuracy on 1000 fresh "test" samples.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .models import SHAPES_PREPROCESS, SHAPES_WEIGHTS, ShapesCNN, load_model
from .shapes import ShapesDataset
from .training import accuracy, fit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=SHAPES_WEIGHTS, help="where to save the state dict")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    t0 = time.time()
    train = ShapesDataset(seed=args.seed, split="train", length=args.train_samples).load(0, args.train_samples)
    val = ShapesDataset(seed=args.seed, split="val", length=1000).load(0, 1000)
    print(f"generated {len(train.labels)} train + {len(val.labels)} val images in {time.time() - t0:.1f}s", flush=True)

    model = ShapesCNN()

    def report(epoch: int, loss: float) -> None:
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, val acc "
              f"{accuracy(model, val.images, val.labels, SHAPES_PREPROCESS):.4f} ({time.time() - t0:.0f}s)", flush=True)

    fit(model, train.images, train.labels, SHAPES_PREPROCESS, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, report=report)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB); training took {time.time() - t0:.0f}s")

    test = ShapesDataset(seed=args.seed, split="test", length=1000).load(0, 1000)
    shipped = load_model("shapes-cnn", weights=args.out)  # the path users take (weights_only=True)
    print(f"test acc (1000 fresh test samples): {accuracy(shipped, test.images, test.labels, SHAPES_PREPROCESS):.4f}")


if __name__ == "__main__":
    main()
