"""Baseline maps that need no model, to read a score against chance (category "baseline").

Studied like any other method, they show what a metric gives without any explanation:
`random_map` (chance), `centre_map` (TorchRay's "center" baseline: objects tend to be
central), `edge_map` (the image's own edges: what a method that only sees texture would give).
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as C
from ._core import seeded_rng
from ._registry import register


def no_pass(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    """A map made without the model: no forward, no backward pass."""
    return (0, 0)


@register("random_map", category="baseline", cost=no_pass)
def random_map(model: nn.Module, images: Tensor, target: Any, *, seed: int | None = 0) -> Tensor:
    """Random map: uniform noise in [0, 1), the chance level of every metric.

    Each image's map comes from a generator seeded with `seed` and a checksum of the image's
    values, so a map does not depend on the batch it is in and is the same on every device
    (seed=None: not reproducible).
    """
    maps = []
    for image in images.detach().to("cpu", torch.float32):
        key = None if seed is None else (seed * 1_000_003 + zlib.crc32(image.numpy().tobytes())) % 2**63
        maps.append(torch.rand(image.shape[-2:], generator=seeded_rng(key)))
    return torch.stack(maps).to(images.device)


@register("centre_map", category="baseline", cost=no_pass, checks={"sigma": C.number(0.0, low_open=True)})
def centre_map(model: nn.Module, images: Tensor, target: Any, *, sigma: float = 0.25) -> Tensor:
    """Centre map (TorchRay's "center" baseline): a Gaussian at the image centre, std `sigma` x min(H, W).

    Its maximum is the centre pixel (H and W even: the four central pixels tie, and a pointing
    game hit needs all of them within the tolerance of the mask).
    """
    h, w = images.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32, device=images.device) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float32, device=images.device) - (w - 1) / 2
    s = sigma * min(h, w)
    bump = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * s * s))
    return bump.expand(images.shape[0], h, w).clone()


@register("edge_map", category="baseline", cost=no_pass)
def edge_map(model: nn.Module, images: Tensor, target: Any) -> Tensor:
    """Edge map: the Sobel gradient magnitude of the input, summed over channels (replicated border)."""
    x = images.detach().float()
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device)
    kernels = torch.stack([sobel, sobel.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    padded = F.pad(x.flatten(0, 1)[:, None], (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(padded, kernels).view(x.shape[0], x.shape[1], 2, *x.shape[-2:])
    return grad.pow(2).sum(2).sqrt().sum(1)
