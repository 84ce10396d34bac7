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

import numpy as np
import torch
import torch.nn.functional as F

from .models import SHAPES_PREPROCESS, SHAPES_WEIGHTS, ShapesCNN, load_model
from .shapes import ShapesDataset


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 250) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on [0, 1] images."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = SHAPES_PREPROCESS(torch.from_numpy(images[i:i + batch]))
        correct += int((model(x).argmax(1).numpy() == labels[i:i + batch]).sum())
    return correct / len(images)


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
    rng = np.random.default_rng(args.seed)  # batch order
    t0 = time.time()
    train = ShapesDataset(seed=args.seed, split="train", length=args.train_samples).load(0, args.train_samples)
    val = ShapesDataset(seed=args.seed, split="val", length=1000).load(0, 1000)
    print(f"generated {len(train.labels)} train + {len(val.labels)} val images in {time.time() - t0:.1f}s", flush=True)

    model = ShapesCNN()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(train.labels) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    for epoch in range(args.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(labels)))
        total = 0.0
        for i in range(len(labels) // args.batch_size):  # drops the last partial batch
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(SHAPES_PREPROCESS(images[idx])), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / (i + 1):.4f}, "
              f"val acc {accuracy(model, val.images, val.labels):.4f} ({time.time() - t0:.0f}s)", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB); training took {time.time() - t0:.0f}s")

    test = ShapesDataset(seed=args.seed, split="test", length=1000).load(0, 1000)
    shipped = load_model("shapes-cnn", weights=args.out)  # the path users take (weights_only=True)
    print(f"test acc (1000 fresh test samples): {accuracy(shipped, test.images, test.labels):.4f}")


if __name__ == "__main__":
    main()
