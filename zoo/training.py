"""Training a classifier from scratch, the one recipe the zoo uses (the built-in model's, and
the retrains of the label-randomisation and remove-and-retrain protocols).

Adam with a one-cycle learning rate, cross entropy, batches in an order drawn from ``seed``;
images are [0, 1] arrays normalised by ``preprocess``. ``train_test`` splits a dataset for a
retrain: the built-in data's own train and test splits, or a seeded hold-out of a folder.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Preprocess
from .datasets import load_dataset


def fit(model: nn.Module, images: np.ndarray, labels: np.ndarray, preprocess: Preprocess, *, epochs: int,
        batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
        report: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train `model` in place on (N, C, H, W) [0, 1] `images` and `labels`; returns it in eval mode.
    Every full batch of each epoch is one step (the last partial batch is dropped)."""
    if len(labels) < batch_size:
        raise ValueError(f"training needs at least batch_size={batch_size} images, got {len(labels)}")
    rng = np.random.default_rng(seed)  # batch order
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    per_epoch = len(labels) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
    x, y = torch.from_numpy(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))
    device = next(model.parameters()).device
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(y)))
        total = 0.0
        for i in range(per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(preprocess(x[idx]).to(device)), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        if report is not None:
            report(epoch, total / per_epoch)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, preprocess: Preprocess,
             batch: int = 250) -> float:
    """Top-1 accuracy of `model` (put in eval mode) on [0, 1] `images`."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(labels), batch):
        x = preprocess(torch.from_numpy(images[i:i + batch])).to(device)
        correct += int((model(x).argmax(1).cpu().numpy() == labels[i:i + batch]).sum())
    return correct / len(labels)


def train_test(dataset: str, size: tuple[int, int], train: int, test: int, seed: int = 0) -> tuple[Batch, Batch]:
    """`train` and `test` images of `dataset`: the built-in data's train and test splits, or a seeded
    split of a folder (its first `test` images of a seeded permutation are the test set)."""
    if dataset == "shapes":
        return (load_dataset("shapes", split="train", size=size, limit=train, seed=seed).load(0, train),
                load_dataset("shapes", split="test", size=size, limit=test, seed=seed).load(0, test))
    data = load_dataset(dataset, size=size)
    if len(data) < train + test:
        raise ValueError(f"dataset {dataset!r} has {len(data)} readable images, fewer than train={train} + test={test}")
    order = np.random.default_rng(seed).permutation(len(data))
    ids = data.ids(0, len(data))
    return (data.load_ids([ids[i] for i in order[test:test + train]]), data.load_ids([ids[i] for i in order[:test]]))
