"""Perturbation methods: forward passes only, run as large batches under inference mode.

Every method here builds perturbed copies of all images of the batch (image x
window, image x sample, image x mask) and feeds them to the model in chunks of
`internal_batch` inputs under ``torch.inference_mode()``, so the cost is the
model's forward passes and little else. They work on any model (no layer).

- `occlusion` (Zeiler & Fergus 2014): sliding windows set to a baseline.
- `lime` (Ribeiro et al. 2016): weighted ridge regression on superpixel on/off samples.
- `prediction_difference` (Zintgraf et al. 2017): weight of evidence of each patch,
  the patch resampled from a marginal or a conditional Gaussian.
- `rise` (Petsiuk et al. 2018): random smooth masks weighted by the target probability.

The optimisation-based methods (meaningful and extremal perturbation) live in
`perturbation_opt`. Shared machinery here: `Windows` (window grid, masks and overlap averaging) and
`target_score` (probability or logit); baselines (`resolve_baseline`, whose "blur" is the
project's one blur) and random draws (`seeded_rng`: CPU generator, moved to the device)
come from `_core`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as C
from ._core import (
    batched,
    class_score,
    forward_logits,
    progress_bar,
    resolve_baseline,
    rows,
    seeded_rng,
    spd_solve,
    targets,
)
from ._registry import register

Pair = int | tuple[int, int]

SCORE_CHOICES = ("probability", "logit")


# --------------------------------------------------------------------------- shared machinery


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
    wh, ww = C.pair_of_ints(window)  # type: ignore[misc]  (checked by WINDOW_CHECKS)
    if stride is None:
        stride = (max(1, wh // 2), max(1, ww // 2))
    sh, sw = C.pair_of_ints(stride)  # type: ignore[misc]
    return (wh, ww), window_starts(h, wh, sh), window_starts(w, ww, sw)


WINDOW_CHECKS: dict[str, C.Check] = {"window": C.window, "stride": C.optional(C.pair)}


class Windows:
    """The grid of sliding windows over an (H, W) image (row starts x column starts).

    Window k is (row k // nx, column k % nx). `masks(k)` gives their pixel
    masks, `average(values)` the per-pixel mean of per-window values over the
    windows covering each pixel (separable, since the windows form a grid).
    """

    def __init__(self, window: Pair | None, stride: Pair | None, size: tuple[int, int], device: torch.device) -> None:
        (self.wh, self.ww), ys, xs = sliding_windows(window, stride, size)
        h, w = size
        self.ys = torch.tensor(ys, device=device)
        self.xs = torch.tensor(xs, device=device)
        rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
        self.in_y = (rows >= self.ys[:, None]) & (rows < self.ys[:, None] + self.wh)  # (ny, H)
        self.in_x = (cols >= self.xs[:, None]) & (cols < self.xs[:, None] + self.ww)  # (nx, W)
        self.ny, self.nx = len(ys), len(xs)
        self.n = self.ny * self.nx

    def top_left(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """Top row and left column of windows `k`."""
        return self.ys[k // self.nx], self.xs[k % self.nx]

    def masks(self, k: Tensor) -> Tensor:
        """(n, H, W) bool pixel masks of windows `k`."""
        return self.in_y[k // self.nx][:, :, None] & self.in_x[k % self.nx][:, None, :]

    def average(self, values: Tensor) -> Tensor:
        """(B, n) per-window values -> (B, H, W): each pixel's mean over the windows covering it."""
        iy, ix = self.in_y.to(values.dtype), self.in_x.to(values.dtype)
        total = torch.einsum("bij,ih,jw->bhw", values.reshape(-1, self.ny, self.nx), iy, ix)
        return total / (iy.sum(0)[:, None] * ix.sum(0)[None, :])


def target_score(logits: Tensor, t: Tensor, score: str) -> Tensor:
    """(n,) score of classes `t`: "probability" (softmax) or "logit"."""
    if score == "logit":
        return class_score(logits, t)
    return logits.softmax(1).gather(1, t[:, None]).squeeze(1)


def _chunks(n: int, internal_batch: int, progress: bool, desc: str) -> Any:
    chunks = list(batched(n, internal_batch))
    return progress_bar(chunks, progress, total=len(chunks), desc=desc)


# --------------------------------------------------------------------------- occlusion


def _occlusion_cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    _, ys, xs = sliding_windows(params["window"], params["stride"], size)
    return (len(ys) * len(xs) + 1, 0)


@register("occlusion", category="perturbation", forward_only=True, cost=_occlusion_cost, checks=WINDOW_CHECKS)
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
    "zeros", "mean" (per-image per-channel mean), "blur" (the image blurred
    with a Gaussian of sigma 10 * min(H, W) / 224), "uniform" or a tensor broadcastable
    to the images (`_core.resolve_baseline`). All occluded inputs of the batch run in chunks of
    `internal_batch` forward passes; `progress` shows a tqdm bar if available.
    """
    b, _, h, w = images.shape
    x = images.detach()
    win = Windows(window, stride, (h, w), x.device)
    ref = resolve_baseline(x, baseline)
    logits = forward_logits(model, x, internal_batch)
    t = targets(logits, target, b, x.device)
    base_score = class_score(logits, t)

    drops = []
    for chunk in _chunks(b * win.n, internal_batch, progress, "occlusion"):
        j = torch.arange(chunk.start, chunk.stop, device=x.device)
        img, k = j // win.n, j % win.n
        with torch.inference_mode():
            occluded = torch.where(win.masks(k)[:, None], rows(ref, img), x[img])
            drops.append(base_score[img] - class_score(model(occluded), t[img]))
    return win.average(torch.cat(drops).view(b, win.n))


# --------------------------------------------------------------------------- LIME


def superpixels(images: Tensor, segmentation: str | Tensor, n_segments: int) -> tuple[Tensor, Tensor]:
    """Superpixel labels (B, H, W) numbered 0..K_b-1 per image, and K_b (B,).

    "slic": scikit-image SLIC with `n_segments` on each image min-max scaled to
    [0, 1], in that space (no CIELAB) with compactness 1 (CIELAB with
    compactness 10 collapses noisy or synthetic images into one segment);
    "quickshift": scikit-image quickshift with LIME's settings (kernel_size 4,
    max_dist 200, ratio 0.2); a tensor (H, W) or (B, H, W) of integer labels
    is used as given (renumbered per image).
    """
    b, c, h, w = images.shape
    device = images.device
    if isinstance(segmentation, Tensor):
        if segmentation.dtype.is_floating_point or segmentation.dtype == torch.bool:
            raise TypeError(f"segmentation must hold integer labels, got dtype {segmentation.dtype}")
        seg = segmentation.to(device)
        if seg.shape == (h, w):
            seg = seg.expand(b, h, w)
        if seg.shape != (b, h, w):
            raise ValueError(f"segmentation must have shape ({h}, {w}) or ({b}, {h}, {w}), got {tuple(seg.shape)}")
        labels = [torch.unique(s, return_inverse=True)[1] for s in seg]
    else:
        from skimage.segmentation import quickshift, slic

        arr = images.detach().to("cpu", torch.float64).numpy()
        low = arr.min(axis=(1, 2, 3), keepdims=True)
        span = np.maximum(arr.max(axis=(1, 2, 3), keepdims=True) - low, 1e-12)
        scaled = (arr - low) / span
        labels = []
        for img in scaled:  # scikit-image segments one image at a time
            if segmentation == "slic":
                lab = slic(
                    img, n_segments=n_segments, compactness=1.0, convert2lab=False, start_label=0, channel_axis=0
                )
            else:
                img = img if c == 3 else np.repeat(img[:1], 3, axis=0)
                lab = quickshift(img, kernel_size=4, max_dist=200, ratio=0.2, channel_axis=0, rng=0)
            labels.append(torch.from_numpy(np.unique(lab, return_inverse=True)[1].reshape(h, w)).to(device))
    seg = torch.stack(labels).long()
    return seg, seg.flatten(1).amax(1) + 1


def lime_design(samples: int, features: int, seed: int | None, device: torch.device) -> Tensor:
    """LIME's on/off samples (samples, features) in {0, 1}: the first row all on, the others uniform.

    Drawn column by column from one seeded generator, so the first k columns
    do not depend on how many columns are drawn: an image with k superpixels
    gets the same samples alone as in any batch.
    """
    g = seeded_rng(seed)
    cols = [torch.randint(0, 2, (samples,), generator=g) for _ in range(features)]
    design = torch.stack(cols, 1).float().to(device)
    design[0] = 1.0
    return design


def weighted_ridge(z: Tensor, y: Tensor, weights: Tensor, valid: Tensor, ridge: float) -> Tensor:
    """Coefficients (B, K) of y ~ z @ coef + intercept, minimising
    sum_s weights * residual^2 + ridge * |coef|^2 (intercept not penalised) for
    every image at once (one batched solve of the normal equations, float64).
    Columns where `valid` (B, K) is False are all zero and get coefficient 0.
    """
    zd, yd, wd = z.double(), y.double(), weights.double()
    design = torch.cat([zd, torch.ones_like(zd[..., :1])], -1)  # (B, S, K + 1)
    weighted = design * wd[..., None]
    gram = design.transpose(1, 2) @ weighted
    penalty = torch.where(valid, ridge, 1.0).double()  # invalid columns are zero: any positive value pins them to 0
    penalty = torch.cat([penalty, torch.zeros_like(penalty[:, :1])], 1)
    gram = gram + torch.diag_embed(penalty)
    coef = spd_solve(gram, (weighted * yd[..., None]).sum(1)[..., None])[..., 0]
    return coef[:, :-1]


def _lime_cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    return (params["samples"] + 1, 0)


def _check_segmentation(name: str, value: Any, ctx: C.Context) -> None:
    if not isinstance(value, Tensor):
        C.one_of("slic", "quickshift")(name, value, ctx)


@register("lime", category="perturbation", forward_only=True, cost=_lime_cost, checks={
    "segmentation": _check_segmentation, "n_segments": C.positive_int,
    "kernel_width": C.number(0.0, low_open=True), "ridge": C.number(0.0), "score": C.one_of(*SCORE_CHOICES),
})
def lime(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    samples: int = 1000,
    segmentation: str | Tensor = "slic",
    n_segments: int = 50,
    baseline: float | str | Tensor = 0.0,
    kernel_width: float = 0.25,
    ridge: float = 1.0,
    score: str = "probability",
    seed: int | None = 0,
    internal_batch: int = 256,
    progress: bool = False,
) -> Tensor:
    """LIME (Ribeiro et al. 2016): weights of a local linear surrogate fitted on superpixels switched on and off.

    Each image is cut into superpixels (`segmentation`: "slic" with
    `n_segments` (default), "quickshift", or a tensor of labels (H, W) /
    (B, H, W)). `samples` random on/off vectors (the first all on, as LIME)
    are drawn with `seed`; off superpixels take `baseline` (a number, default
    0.0 = the normalisation mean, "zeros", "mean", "blur", "uniform" or a tensor). The
    model's `score` of the target ("probability" (default, as LIME) or
    "logit") is regressed on the on/off vectors by ridge regression
    (`ridge`, default 1.0, LIME's ``Ridge(alpha=1)``; intercept not
    penalised) weighted by exp(-d^2 / (2 kernel_width^2)) with d the cosine
    distance of the vector to the all-on vector (LIME's kernel: sqrt of
    exp(-d^2 / width^2); width 0.25). Each pixel gets its superpixel's
    coefficient. All images share the same on/off samples; all fits are one
    batched solve.
    """
    b, _, h, w = images.shape
    x = images.detach()
    ref = resolve_baseline(x, baseline)
    seg, counts = superpixels(x, segmentation, n_segments)
    logits = forward_logits(model, x, internal_batch)
    t = targets(logits, target, b, x.device)

    k_max = int(counts.max())
    valid = torch.arange(k_max, device=x.device) < counts[:, None]  # (B, K)
    z = lime_design(samples, k_max, seed, x.device)[None] * valid[:, None].float()  # (B, S, K)
    flat_seg = seg.flatten(1)
    scores = []
    for chunk in _chunks(b * samples, internal_batch, progress, "lime"):
        j = torch.arange(chunk.start, chunk.stop, device=x.device)
        img, s = j // samples, j % samples
        on = z[img, s].gather(1, flat_seg[img]).view(-1, 1, h, w) > 0.5
        with torch.inference_mode():
            scores.append(target_score(model(torch.where(on, x[img], rows(ref, img))), t[img], score))
    y = torch.cat(scores).view(b, samples)

    distance = 1.0 - torch.sqrt(z.sum(-1) / counts[:, None])  # cosine distance of a 0/1 vector to all-ones
    weights = torch.exp(-(distance**2) / (2 * kernel_width**2))
    coef = weighted_ridge(z, y, weights, valid, ridge)
    return coef.to(x.dtype).gather(1, flat_seg).view(b, h, w)


# --------------------------------------------------------------------------- prediction difference


class ConditionalGaussian(NamedTuple):
    """x_a | x_b ~ N(mean_a + gain @ (x_b - mean_b), cov); `chol` is cov's Cholesky factor."""

    mean_a: Tensor  # (G, Da)
    mean_b: Tensor  # (G, Db)
    gain: Tensor  # (G, Da, Db) = S_ab S_bb^-1
    cov: Tensor  # (G, Da, Da) = S_aa - S_ab S_bb^-1 S_ba
    chol: Tensor  # (G, Da, Da)


def conditional_gaussian(mean: Tensor, cov: Tensor, a: Tensor, b: Tensor) -> ConditionalGaussian:
    """Condition N(mean (G, D), cov (G, D, D)) on the coordinates `b`, for the coordinates `a`."""
    s_aa = cov[:, a][:, :, a]
    s_ab = cov[:, a][:, :, b]
    s_bb = cov[:, b][:, :, b]
    gain = spd_solve(s_bb, s_ab.transpose(1, 2)).transpose(1, 2)  # S_ab S_bb^-1 (S_bb symmetric, shrunk: SPD)
    cond = s_aa - gain @ s_ab.transpose(1, 2)
    cond = 0.5 * (cond + cond.transpose(1, 2))
    # Cholesky factor, with the smallest diagonal jitter (relative to the mean variance) that works.
    scale = cond.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None]
    eye = torch.eye(len(a), dtype=cond.dtype, device=cond.device)
    for jitter in (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        chol, info = torch.linalg.cholesky_ex(cond + jitter * scale * eye)
        if not bool((info > 0).any()):
            break
    else:
        raise ValueError("prediction_difference: the conditional patch covariance is not positive definite")
    return ConditionalGaussian(mean[:, a], mean[:, b], gain, cond, chol)


# Shrinkage of patch covariances towards their mean variance, so S_bb is invertible
# even when an image has fewer patches than a patch has values.
COV_SHRINKAGE = 1e-2


def patch_gaussian(images: Tensor, size: tuple[int, int], pooled: bool) -> tuple[Tensor, Tensor]:
    """Mean (G, D) and covariance (G, D, D), float64, of all (C, ph, pw) patches (stride 1) of
    each image (G = B) or of all images pooled (G = 1). D = C * ph * pw in (c, row, col)
    order. The covariance is shrunk: (1 - s) S + s * mean(diag S) * I with s = COV_SHRINKAGE.
    """
    n, c, h, w = images.shape
    ph, pw = size
    d, per_image = c * ph * pw, (h - ph + 1) * (w - pw + 1)
    step = max(1, 2**24 // (d * per_image))  # images per chunk: bounded memory
    sums, outer = [], []
    for chunk in batched(n, step):
        patches = F.unfold(images[chunk].double(), (ph, pw))  # (n, D, L)
        sums.append(patches.sum(-1))
        outer.append(patches @ patches.transpose(1, 2))
    s1, s2 = torch.cat(sums), torch.cat(outer)
    count = per_image
    if pooled:
        s1, s2, count = s1.sum(0, keepdim=True), s2.sum(0, keepdim=True), per_image * n
    mean = s1 / count
    cov = (s2 - count * mean[:, :, None] * mean[:, None, :]) / max(count - 1, 1)
    scale = cov.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return mean, (1 - COV_SHRINKAGE) * cov + COV_SHRINKAGE * scale[:, None, None] * eye


def _marginal_stats(x: Tensor, ref: Any) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (G, C): of each image, of reference images, or given as a pair."""
    c = x.shape[1]
    if ref is None:
        return x.mean(dim=(2, 3)), x.std(dim=(2, 3))
    if isinstance(ref, Tensor):
        return ref.mean(dim=(0, 2, 3))[None], ref.std(dim=(0, 2, 3))[None]
    mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).flatten() for v in ref)
    if mean.numel() not in (1, c) or std.numel() not in (1, c) or bool((std < 0).any()):
        raise ValueError(f"reference=(mean, std) needs 1 or {c} values each and std >= 0")
    return mean.expand(c)[None], std.expand(c)[None]


def _check_reference(name: str, ref: Any, ctx: C.Context) -> None:
    if ref is None:
        return
    if isinstance(ref, Tensor):
        if ref.dim() != 4 or not ref.dtype.is_floating_point:
            raise ValueError(f"reference must be a float tensor (N, C, h, w) of dataset images, got {tuple(ref.shape)}")
        return
    if ctx.params.get("sampling") == "marginal" and isinstance(ref, (tuple, list)) and len(ref) == 2:
        return
    raise TypeError(
        "reference must be None (the image's own statistics), a tensor (N, C, h, w) of dataset images, "
        f"or, for sampling='marginal', a pair (mean, std); got {type(ref).__name__}"
    )


Patches = Callable[[Tensor, Tensor, Tensor], Tensor]  # (image, window, sample) indices -> (n, C, wh, ww)


def marginal_patches(x: Tensor, win: Windows, samples: int, reference: Any, g: torch.Generator) -> Patches:
    """Patch values drawn from N(mean_c, std_c^2) of their channel (of the image, of `reference`
    images, or a given pair); one standard-normal draw (samples, C, wh, ww) shared by all."""
    mean, std = _marginal_stats(x, reference)  # (G, C)
    z = torch.randn((samples, x.shape[1], win.wh, win.ww), generator=g, dtype=x.dtype).to(x.device)

    def patches(img: Tensor, k: Tensor, s: Tensor) -> Tensor:
        return rows(mean, img)[:, :, None, None] + rows(std, img)[:, :, None, None] * z[s]

    return patches


def conditional_patches(
    x: Tensor, win: Windows, samples: int, reference: Any, g: torch.Generator, padding: int
) -> Patches:
    """Patch values drawn given their frame of width `padding` from a Gaussian over framed patches
    of the image itself (or of `reference` images); one draw (samples, Da) shared by all."""
    b, c, h, w = x.shape
    wh, ww = win.wh, win.ww
    ph, pw = wh + 2 * padding, ww + 2 * padding
    source = x if reference is None else reference.to(x.device)
    if source.shape[2] < ph or source.shape[3] < pw:
        raise ValueError(f"window + 2 * padding = {(ph, pw)} is larger than the images {tuple(source.shape[2:])}")
    mean, cov = patch_gaussian(source, (ph, pw), pooled=reference is not None)
    inner = torch.zeros(c, ph, pw, dtype=torch.bool, device=x.device)
    inner[:, padding : padding + wh, padding : padding + ww] = True
    a_idx, b_idx = inner.flatten().nonzero()[:, 0], (~inner).flatten().nonzero()[:, 0]
    gauss = conditional_gaussian(mean, cov, a_idx, b_idx)
    # The frame of every window: patch (ph, pw) at the window's top-left of the padded image.
    mode = "reflect" if padding < min(h, w) else "replicate"
    padded = F.pad(x, (padding,) * 4, mode=mode).double()
    ky, kx = win.top_left(torch.arange(win.n, device=x.device))
    py, px = torch.arange(ph, device=x.device), torch.arange(pw, device=x.device)
    pix = (ky[:, None, None] + py[:, None]) * (w + 2 * padding) + kx[:, None, None] + px  # (n, ph, pw)
    frames = padded.flatten(2)[:, :, pix.flatten(1)]  # (B, C, n, ph*pw)
    frames = frames.permute(0, 2, 1, 3).reshape(b, win.n, -1)[:, :, b_idx]  # (B, n, Db)
    # mean_a + S_ab S_bb^-1 (x_b - mean_b) for every window (G = 1 broadcasts over images)
    cond_mean = gauss.mean_a[:, None] + (frames - gauss.mean_b[:, None]) @ gauss.gain.transpose(1, 2)
    cond_mean = cond_mean.to(x.dtype)  # (B, n, Da)
    z = torch.randn((samples, len(a_idx)), generator=g, dtype=torch.float64).to(x.device)
    noise = (z @ gauss.chol.transpose(1, 2)).to(x.dtype)  # (G, S, Da)

    def patches(img: Tensor, k: Tensor, s: Tensor) -> Tensor:
        sampled = noise[img, s] if noise.shape[0] > 1 else noise[0, s]
        return (cond_mean[img, k] + sampled).view(-1, c, wh, ww)

    return patches


def _resampled_probability(
    model: nn.Module, x: Tensor, t: Tensor, win: Windows, samples: int, patches: Patches,
    internal_batch: int, progress: bool,
) -> Tensor:
    """(B, n windows): the mean target probability over `samples` copies of each image whose
    window is replaced by sampled `patches`, in chunks of `internal_batch` forward passes."""
    b, per_image = x.shape[0], win.n * samples
    probs = []
    dy, dx = torch.arange(win.wh, device=x.device), torch.arange(win.ww, device=x.device)
    for chunk in _chunks(b * per_image, internal_batch, progress, "prediction_difference"):
        j = torch.arange(chunk.start, chunk.stop, device=x.device)
        img, k, s = j // per_image, (j % per_image) // samples, j % samples
        top, left = win.top_left(k)
        n = len(j)
        with torch.inference_mode():
            canvas = x[img].clone()
            values = patches(img, k, s).to(x.dtype)  # (n, C, wh, ww)
            row, col = (top[:, None] + dy)[:, :, None], (left[:, None] + dx)[:, None, :]  # (n, wh, 1), (n, 1, ww)
            canvas[torch.arange(n, device=x.device)[:, None, None], :, row, col] = values.permute(0, 2, 3, 1)
            probs.append(model(canvas).double().softmax(1).gather(1, t[img, None]).squeeze(1))
    return torch.cat(probs).view(b, win.n, samples).mean(-1)


def _laplace(p: Tensor, eps: float, classes: int) -> Tensor:
    return (p + eps) / (1 + classes * eps)


def _log2_odds(p: Tensor) -> Tensor:
    return torch.log2(p) - torch.log2(1 - p)


def _prediction_difference_cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    _, ys, xs = sliding_windows(params["window"], params["stride"], size)
    return (len(ys) * len(xs) * params["samples"] + 1, 0)


@register("prediction_difference", category="perturbation", forward_only=True, cost=_prediction_difference_cost, checks={
    **WINDOW_CHECKS, "padding": C.positive_int, "sampling": C.one_of("conditional", "marginal"),
    "laplace": C.number(0.0, 1.0), "reference": _check_reference,
})
def prediction_difference(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    window: Pair = 4,
    stride: Pair = 2,
    samples: int = 10,
    sampling: str = "conditional",
    padding: int = 2,
    reference: Any = None,
    laplace: float = 1e-6,
    seed: int | None = 0,
    internal_batch: int = 256,
    progress: bool = False,
) -> Tensor:
    """Prediction difference analysis (Zintgraf et al. 2017): weight of evidence of each patch, the patch resampled.

    WE = log2 odds p(c|x) - log2 odds p(c|x without the patch), where
    p(c|x without the patch) is the mean target probability over `samples`
    copies of x whose `window` patch (all channels) is resampled; per-pixel
    values average the windows covering the pixel (windows every `stride`,
    border included). sampling="conditional" (default, the paper's): the patch
    is drawn given its surrounding frame of width `padding` from a Gaussian
    over (window + 2 padding)^2 x C patches, estimated from all such patches
    of the image itself (or of `reference` dataset images), shrunk by
    COV_SHRINKAGE; the image is reflect-padded so border windows have a frame.
    sampling="marginal": each patch value is drawn from N(mean_c, std_c^2) of
    its channel, from the image itself, `reference` images, or a given pair
    `reference=(mean, std)`. Probabilities get the paper's Laplace correction
    (p N + 1) / (N + K) with N = 1 / `laplace` (default 1e-6, about ImageNet's
    size; 0 disables it). The standard-normal draws are shared by all windows
    and images (common random numbers): reproducible with `seed`, and
    batched == per image. All (image, window, sample) inputs run in chunks of
    `internal_batch`.
    """
    b, c, h, w = images.shape
    x = images.detach()
    if isinstance(reference, Tensor) and reference.shape[1] != c:
        raise ValueError(f"reference must have the images' {c} channels, got {tuple(reference.shape)}")
    win = Windows(window, stride, (h, w), x.device)
    logits = forward_logits(model, x, internal_batch)
    t = targets(logits, target, b, x.device)
    g = seeded_rng(seed)
    if sampling == "marginal":
        patches = marginal_patches(x, win, samples, reference, g)
    else:
        patches = conditional_patches(x, win, samples, reference, g, padding)
    without = _resampled_probability(model, x, t, win, samples, patches, internal_batch, progress)
    full = logits.double().softmax(1).gather(1, t[:, None])
    classes = logits.shape[1]
    evidence = _log2_odds(_laplace(full, laplace, classes)) - _log2_odds(_laplace(without, laplace, classes))
    return win.average(evidence).to(x.dtype)


# --------------------------------------------------------------------------- RISE


def rise_grids(masks: int, cells: int, p: float, size: tuple[int, int], seed: int | None, device: torch.device):
    """RISE's random low-resolution binary grids (N, cells, cells) and shifts (N, 2) (seeded)."""
    g = seeded_rng(seed)
    grids = (torch.rand((masks, cells, cells), generator=g) < p).float()
    cell = (math.ceil(size[0] / cells), math.ceil(size[1] / cells))
    shift_y = torch.randint(0, cell[0], (masks,), generator=g)
    shift_x = torch.randint(0, cell[1], (masks,), generator=g)
    return grids.to(device), torch.stack([shift_y, shift_x], 1).to(device)


def rise_masks(grids: Tensor, shifts: Tensor, size: tuple[int, int]) -> Tensor:
    """Smooth masks (n, H, W): each grid bilinearly upsampled to (cells + 1) * cell size, then cropped at its shift."""
    h, w = size
    cells = grids.shape[-1]
    up = F.interpolate(
        grids[:, None], size=((cells + 1) * math.ceil(h / cells), (cells + 1) * math.ceil(w / cells)),
        mode="bilinear", align_corners=False,
    )[:, 0]
    n = len(grids)
    ry = shifts[:, :1] + torch.arange(h, device=grids.device)  # (n, H)
    rx = shifts[:, 1:] + torch.arange(w, device=grids.device)  # (n, W)
    return up[torch.arange(n, device=grids.device)[:, None, None], ry[:, :, None], rx[:, None, :]]


def _rise_cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    return (params["masks"] + 1, 0)


@register("rise", category="perturbation", forward_only=True, cost=_rise_cost, checks={
    "masks": C.positive_int, "cells": C.positive_int, "p": C.number(0.0, 1.0, low_open=True),
    "score": C.one_of(*SCORE_CHOICES),
})
def rise(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    masks: int = 4000,
    cells: int = 7,
    p: float = 0.5,
    baseline: float | str | Tensor = 0.0,
    score: str = "probability",
    seed: int | None = 0,
    internal_batch: int = 256,
    progress: bool = False,
) -> Tensor:
    """RISE (Petsiuk et al. 2018): average of random smooth masks weighted by the target's score on the masked image.

    `masks` binary grids of `cells` x `cells` cells, each on with probability
    `p`, are bilinearly upsampled to (cells + 1) x cell size and cropped at a
    random shift (seeded by `seed`); the masked image is
    baseline + M * (image - baseline) (baseline 0.0 = the normalisation mean:
    image * M as in the paper; also "zeros", "mean", "blur", "uniform" or a tensor).
    saliency = sum_i score_i * M_i / (masks * p), score = the target's
    softmax "probability" (default, the paper's) or "logit". Every image of
    the batch sees the same masks (batched == per image); masks are built
    chunk by chunk and images x masks run together, at most
    `internal_batch` inputs per forward pass.
    """
    b, _, h, w = images.shape
    x = images.detach()
    ref = resolve_baseline(x, baseline)
    logits = forward_logits(model, x, internal_batch)
    t = targets(logits, target, b, x.device)

    grids, shifts = rise_grids(masks, cells, p, (h, w), seed, x.device)
    per_chunk = max(1, internal_batch // b)
    saliency = torch.zeros(b, h, w, dtype=x.dtype, device=x.device)
    for mchunk in _chunks(masks, per_chunk, progress, "rise"):
        with torch.inference_mode():
            m = rise_masks(grids[mchunk], shifts[mchunk], (h, w)).to(x.dtype)  # (n, H, W)
            n = m.shape[0]
            for ichunk in batched(b, internal_batch):
                xi, ri = x[ichunk], rows(ref, ichunk)
                masked = ri[:, None] + m[None, :, None] * (xi - ri)[:, None]  # (bi, n, C, H, W)
                bi = xi.shape[0]
                s = target_score(model(masked.flatten(0, 1)), t[ichunk].repeat_interleave(n), score)
                saliency[ichunk] += torch.einsum("bn,nhw->bhw", s.view(bi, n), m)
    return saliency / (masks * p)
