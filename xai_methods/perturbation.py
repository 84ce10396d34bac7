"""Perturbation methods: forward passes only, run as large batches under inference mode."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._core import baseline_like, batched, class_score, forward_logits, progress_bar, targets
from ._registry import register

Pair = int | tuple[int, int]


def _pair(name: str, value: Any) -> tuple[int, int]:
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts 0, stride, 2*stride, ... of windows along one axis, plus length - window so the border is covered."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def sliding_windows(
    window: Pair | None, stride: Pair | None, size: tuple[int, int]
) -> tuple[tuple[int, int], list[int], list[int]]:
    """Resolve defaults and return (window (h, w), row starts, column starts).

    window=None -> max(2, round(min(H, W) / 8)); stride=None -> max(1, window // 2).
    """
    h, w = size
    if window is None:
        window = max(2, round(min(h, w) / 8))
    wh, ww = _pair("window", window)
    if stride is None:
        stride = (max(1, wh // 2), max(1, ww // 2))
    sh, sw = _pair("stride", stride)
    if wh > h or ww > w:
        raise ValueError(f"window {(wh, ww)} is larger than the image {(h, w)}")
    return (wh, ww), window_starts(h, wh, sh), window_starts(w, ww, sw)


def _occlusion_cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    _, ys, xs = sliding_windows(params["window"], params["stride"], size)
    return (len(ys) * len(xs) + 1, 0)


@register("occlusion", category="perturbation", cost=_occlusion_cost)
def occlusion(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    window: Pair | None = None,
    stride: Pair | None = None,
    baseline: float | str | Tensor = 0.0,
    internal_batch: int = 256,
    progress: bool = False,
) -> Tensor:
    """Occlusion (Zeiler & Fergus 2014): drop of the target logit when a sliding window is replaced by a baseline.

    A pixel's value is the mean, over the windows covering it, of
    score(image) - score(image with the window set to `baseline`). Windows
    start at 0, stride, ... and at H - window (W - window), so borders are
    covered. baseline: a number (default 0.0 = the normalisation mean, grey),
    "zeros", "mean" (per-image per-channel mean) or a tensor broadcastable to
    the images. All occluded inputs of the batch run in chunks of
    `internal_batch` forward passes; `progress` shows a tqdm bar if available.
    """
    b, _, h, w = images.shape
    (wh, ww), ys, xs = sliding_windows(window, stride, (h, w))
    x = images.detach()
    ref = baseline_like(x, baseline)
    ref = ref.reshape((1,) * (4 - ref.dim()) + tuple(ref.shape))
    logits = forward_logits(model, x, internal_batch)
    t = targets(logits, target, b, x.device)
    base_score = class_score(logits, t)

    device = x.device
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    starts_y, starts_x = torch.tensor(ys, device=device), torch.tensor(xs, device=device)
    # The windows form a grid (row starts x column starts), so coverage is an outer product.
    cover_y = ((rows >= starts_y[:, None]) & (rows < starts_y[:, None] + wh)).sum(0)
    cover_x = ((cols >= starts_x[:, None]) & (cols < starts_x[:, None] + ww)).sum(0)
    counts = (cover_y[:, None] * cover_x[None, :]).to(x.dtype)  # windows covering each pixel
    win_y = starts_y.repeat_interleave(len(xs))  # (N,) top row of each window
    win_x = starts_x.repeat(len(ys))  # (N,) left column of each window
    n_windows = win_y.numel()

    total = torch.zeros(b, h, w, dtype=x.dtype, device=device)
    chunks = list(batched(b * n_windows, internal_batch))
    for chunk in progress_bar(chunks, progress, total=len(chunks), desc="occlusion"):
        j = torch.arange(chunk.start, chunk.stop, device=device)
        img, win = j // n_windows, j % n_windows
        in_y = (rows >= win_y[win, None]) & (rows < win_y[win, None] + wh)  # (n, H)
        in_x = (cols >= win_x[win, None]) & (cols < win_x[win, None] + ww)  # (n, W)
        mask = in_y[:, :, None] & in_x[:, None, :]  # (n, H, W)
        fill = ref[img] if ref.shape[0] > 1 else ref
        with torch.inference_mode():
            occluded = torch.where(mask[:, None], fill, x[img])
            drop = base_score[img] - class_score(model(occluded), t[img])
        total.index_add_(0, img, drop[:, None, None] * mask)
    return total / counts

