"""Faithfulness metrics: does the model's output follow what the map calls important?

Every metric here builds all perturbed inputs of the batch (image x step) and feeds them to
the model in chunks of `internal_batch` under inference mode: the cost is the forward
passes and little else. Pixels are ranked by the map, ties broken by one seeded random
permutation shared by all images (so a constant map is a random order, not raster order,
and an image's result does not depend on the batch). Substrates are the project's
baselines (`_core.resolve_baseline`: "zeros" = the normalisation mean, "blur", ...).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import _checks as C
from .._core import batched, check_baseline, class_score, resolve_baseline, rows, seeded_rng
from ._registry import CONSTANT_MAP, NOT_FINITE_OUTPUT, OK, Scores, register

SCORES = ("probability", "logit")


def ranks(maps: Tensor, seed: int | None, descending: bool = True) -> Tensor:
    """(B, H*W) long: each pixel's place when the pixels are ordered by the map (0 = first),
    ties in the order of one seeded random permutation of the pixels."""
    flat = maps.flatten(1)
    perm = torch.randperm(flat.shape[1], generator=seeded_rng(seed)).to(flat.device)
    order = perm[torch.sort(flat[:, perm], dim=1, descending=descending, stable=True).indices]
    out = torch.empty_like(order)
    out.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return out


def target_scores(logits: Tensor, t: Tensor, score: str) -> Tensor:
    return logits.softmax(1).gather(1, t[:, None])[:, 0] if score == "probability" else class_score(logits, t)


def scored_inputs(model: nn.Module, t: Tensor, n_points: int, build: Callable[[Tensor, Tensor], Tensor],
                  internal_batch: int, score: str) -> Tensor:
    """(B, n_points): the target's score on ``build(image rows, point indices)`` for every image x point,
    in chunks of `internal_batch` forward passes."""
    b = t.shape[0]
    out = []
    for chunk in batched(b * n_points, internal_batch):
        j = torch.arange(chunk.start, chunk.stop, device=t.device)
        img, k = j // n_points, j % n_points
        with torch.inference_mode():
            out.append(target_scores(model(build(img, k)), t[img], score).float())
    return torch.cat(out).view(b, n_points)


def auc(curve: Tensor, x: Tensor) -> Tensor:
    """Trapezoid area under (B, n) curves over the points `x` (n,), divided by the x range: the curve's mean height."""
    widths = (x[1:] - x[:-1])
    return ((curve[:, 1:] + curve[:, :-1]) / 2 * widths).sum(1) / (x[-1] - x[0])


def _finite(value: Tensor, curve: Tensor) -> Scores:
    ok = torch.isfinite(curve).all(1)
    return Scores(torch.where(ok, value, torch.nan), torch.where(ok, OK, NOT_FINITE_OUTPUT).to(torch.int8), curve)


def _pixel_curve(model: nn.Module, images: Tensor, maps: Tensor, t: Tensor, *, steps: int, substrate: Any,
                 score: str, seed: int | None, internal_batch: int, insert: bool) -> Scores:
    """Deletion (or insertion): the target's score as the most relevant pixels are replaced by (or
    inserted into) the substrate, `steps` equal steps from none to all; value = the area under it."""
    hw = maps.shape[1] * maps.shape[2]
    order = ranks(maps, seed)
    counts = torch.round(torch.arange(steps + 1, device=maps.device) * hw / steps).long()
    ref = resolve_baseline(images, substrate, seed=seed)

    def build(img: Tensor, k: Tensor) -> Tensor:
        changed = (order[img] < counts[k][:, None]).view(-1, 1, *maps.shape[1:])
        x, base = images[img], rows(ref, img)
        return torch.where(changed, x, base) if insert else torch.where(changed, base, x)

    curve = scored_inputs(model, t, steps + 1, build, internal_batch, score)
    return _finite(auc(curve, torch.linspace(0, 1, steps + 1, device=curve.device)), curve)


PIXEL_CHECKS: dict[str, C.Check] = {"score": C.one_of(*SCORES), "substrate": check_baseline}


def _points(params: Any) -> int:
    return params["steps"] + 1


def _pixel_cost(params: Any, size: tuple[int, int]) -> int:
    return _points(params)


PIXEL_STEPS = (16, 64)  # the variants' step counts: half and twice the default's 32


@register("deletion", family="faithfulness", higher_is_better=False, needs_model=True, cost=_pixel_cost,
          points=_points, checks=PIXEL_CHECKS, variants={"substrate": ("blur", "mean"), "steps": PIXEL_STEPS})
def deletion(model: nn.Module, images: Tensor, maps: Tensor, target: Tensor, mask: Any, *, steps: int = 32,
             substrate: float | str | Tensor = "zeros", score: str = "probability", seed: int | None = 0,
             internal_batch: int = 64) -> Scores:
    """Deletion (Petsiuk et al. 2018): area under the target's probability as the most relevant pixels are deleted first.

    `steps` equal steps from the image to the substrate (default "zeros", the normalisation
    mean; "blur", "mean", a number... as every baseline of the project), all channels of a
    pixel at once; lower = more faithful. The curve (steps + 1 points) is kept.
    """
    return _pixel_curve(model, images, maps, target, steps=steps, substrate=substrate, score=score, seed=seed,
                        internal_batch=internal_batch, insert=False)


@register("insertion", family="faithfulness", higher_is_better=True, needs_model=True, cost=_pixel_cost,
          points=_points, checks=PIXEL_CHECKS, variants={"substrate": ("zeros", "mean"), "steps": PIXEL_STEPS})
def insertion(model: nn.Module, images: Tensor, maps: Tensor, target: Tensor, mask: Any, *, steps: int = 32,
              substrate: float | str | Tensor = "blur", score: str = "probability", seed: int | None = 0,
              internal_batch: int = 64) -> Scores:
    """Insertion (Petsiuk et al. 2018): area under the target's probability as the most relevant pixels are inserted first.

    From the substrate (default "blur", as RISE: the one blur of the project) to the image in
    `steps` equal steps; higher = more faithful. The curve (steps + 1 points) is kept.
    """
    return _pixel_curve(model, images, maps, target, steps=steps, substrate=substrate, score=score, seed=seed,
                        internal_batch=internal_batch, insert=True)


def _explanation_probs(model: nn.Module, images: Tensor, maps: Tensor, t: Tensor, baseline: Any,
                       internal_batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Target probability on the image (Y) and on the map-weighted image (O), and which maps are constant."""
    flat = maps.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    constant = high == low
    weights = ((flat - low[:, None]) / torch.where(constant, 1.0, high - low)[:, None]).view_as(maps)
    ref = resolve_baseline(images, baseline)

    def build(img: Tensor, k: Tensor) -> Tensor:
        x, base = images[img], rows(ref, img)
        weighted = base + weights[img][:, None] * (x - base)
        return torch.where((k == 0).view(-1, 1, 1, 1), x, weighted)

    probs = scored_inputs(model, t, 2, build, internal_batch, "probability")
    return probs[:, 0], probs[:, 1], constant


def _drop_status(y: Tensor, o: Tensor, constant: Tensor) -> Tensor:
    code = torch.where(constant, CONSTANT_MAP, OK)
    return torch.where(torch.isfinite(y) & torch.isfinite(o), code, NOT_FINITE_OUTPUT).to(torch.int8)


EXPLANATION_BASELINES = {"baseline": ("blur", "mean")}  # the variants of the explanation image's baseline (0.0)


@register("average_drop", family="faithfulness", higher_is_better=False, needs_model=True, cost=lambda p, s: 2,
          variants=EXPLANATION_BASELINES)
def average_drop(model: nn.Module, images: Tensor, maps: Tensor, target: Tensor, mask: Any, *,
                 baseline: float | str | Tensor = 0.0, internal_batch: int = 64) -> Scores:
    """Average drop (Chattopadhyay et al. 2018, Grad-CAM++): max(0, Y - O) / Y, O the target probability on the map-weighted image.

    The explanation image is baseline + m (x - baseline), m the map min-max scaled to [0, 1]
    per image (the paper multiplies pixels by m: baseline "black"; default here 0.0, the
    normalisation mean, as the perturbation methods). The dataset's average drop is the mean
    of these values (x 100 for the paper's percent). A constant map has no scaling: NaN,
    status CONSTANT_MAP.
    """
    y, o, constant = _explanation_probs(model, images, maps, target, baseline, internal_batch)
    value = torch.where(constant, torch.nan, (y - o).clamp_min(0) / y)
    return Scores(value, _drop_status(y, o, constant))


@register("increase_in_confidence", family="faithfulness", higher_is_better=True, needs_model=True,
          cost=lambda p, s: 2, variants=EXPLANATION_BASELINES)
def increase_in_confidence(model: nn.Module, images: Tensor, maps: Tensor, target: Tensor, mask: Any, *,
                           baseline: float | str | Tensor = 0.0, internal_batch: int = 64) -> Scores:
    """Increase in confidence (Chattopadhyay et al. 2018): 1 if the map-weighted image raises the target's probability, else 0.

    The same explanation image as `average_drop`; the dataset's value is the mean (the share of
    images, x 100 for the paper's percent). A constant map: NaN, status CONSTANT_MAP.
    """
    y, o, constant = _explanation_probs(model, images, maps, target, baseline, internal_batch)
    return Scores(torch.where(constant, torch.nan, (o > y).float()), _drop_status(y, o, constant))


# --------------------------------------------------------------------------- ROAD

# Noisy linear imputation (Rong et al. 2022): a removed pixel is the weighted mean of its 8
# neighbours (1/6 for the 4 direct ones, 1/12 for the diagonals), plus Gaussian noise.
_NEIGHBOURS = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]


def impute(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """(C, H, W) image with the `removed` (H, W) pixels replaced by the solution of the linear
    system "each removed pixel is the weighted mean of its neighbours" (known neighbours are
    constants), for all channels at once (scipy's sparse LU)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import splu

    c, h, w = image.shape
    unknown = np.flatnonzero(removed)
    if unknown.size == 0:
        return image
    index = np.full(h * w, -1)
    index[unknown] = np.arange(unknown.size)
    ys, xs = np.divmod(unknown, w)
    flat = image.reshape(c, -1)
    diag = np.zeros(unknown.size)
    rhs = np.zeros((unknown.size, c))
    r, cols, vals = [], [], []
    for dy, dx, weight in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        rows_, neighbour = np.flatnonzero(inside), (ny * w + nx)[inside]
        diag[rows_] += weight
        other = index[neighbour]
        free = other >= 0
        r.append(rows_[free]), cols.append(other[free]), vals.append(np.full(free.sum(), -weight))
        np.add.at(rhs, rows_[~free], weight * flat[:, neighbour[~free]].T)
    n = unknown.size
    a = coo_matrix((np.concatenate([diag, *vals]), (np.concatenate([np.arange(n), *r]),
                                                     np.concatenate([np.arange(n), *cols]))), shape=(n, n))
    out = flat.copy()
    out[:, unknown] = splu(a.tocsc()).solve(rhs).T
    return out.reshape(c, h, w)


def _road(model: nn.Module, images: Tensor, maps: Tensor, t: Tensor, *, fractions: Sequence[float], noise: float,
          seed: int | None, internal_batch: int, most_first: bool) -> Scores:
    """The target's probability with the top (MoRF) or bottom (LeRF) `fractions` of pixels imputed."""
    hw = maps.shape[1] * maps.shape[2]
    order = ranks(maps, seed, descending=most_first).cpu().numpy()
    x = images.detach().cpu().double().numpy()
    g = seeded_rng(seed)
    imputed = []
    for f in fractions:  # one noise pattern per fraction, shared by all images: batched == per image
        jitter = torch.randn(x.shape[1:], generator=g, dtype=torch.float64).numpy() * noise
        for i in range(len(x)):
            removed = (order[i] < round(f * hw)).reshape(maps.shape[1:])
            imputed.append(np.where(removed, impute(x[i], removed) + jitter, x[i]))
    inputs = torch.from_numpy(np.stack(imputed)).to(images.device, images.dtype)  # (F * B, C, H, W)
    b, n_f = len(x), len(fractions)
    curve = scored_inputs(model, t, n_f, lambda img, k: inputs[k * b + img], internal_batch, "probability")
    return _finite(auc(curve, torch.tensor(list(fractions), device=curve.device)), curve)


ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _check_fractions(name: str, value: Any, ctx: C.Context) -> None:
    ok = isinstance(value, (list, tuple)) and len(value) >= 2 and all(C.is_real(v) and 0 < v < 1 for v in value)
    if not ok or list(value) != sorted(set(value)):
        raise ValueError(f"{name} must be at least two increasing numbers in (0, 1), got {value!r}")


ROAD_CHECKS: dict[str, C.Check] = {"fractions": _check_fractions, "noise": C.number(0.0)}
ROAD_VARIANTS = {"fractions": ((0.1, 0.2, 0.3, 0.4, 0.5), (0.5, 0.6, 0.7, 0.8, 0.9))}  # the lower and upper half


def _road_points(params: Any) -> int:
    return len(params["fractions"])


def _road_cost(params: Any, size: tuple[int, int]) -> int:
    return _road_points(params)


@register("road_morf", family="faithfulness", higher_is_better=False, needs_model=True, cost=_road_cost,
          points=_road_points, checks=ROAD_CHECKS, variants=ROAD_VARIANTS)
def road_morf(model: nn.Module, images: Tensor, maps: Tensor, target: Tensor, mask: Any, *,
              fractions: Sequence[float] = ROAD_FRACTIONS, noise: float = 0.01, seed: int | None = 0,
              internal_batch: int = 64) -> Scores:
    """ROAD, most relevant first (Rong et al. 2022): the target's probability with the top fraction of pixels imputed.

    Removed pixels are filled by noisy linear imputation: each is the weighted mean of its 8
    neighbours (one sparse system per image and fraction), plus N(0, `noise`) noise in normalised
    units. The removal thus leaks no shape and moves the image little off the data. The noise is
    one seeded pattern per fraction, shared by all images, so an image's result does not depend
    on its batch.
    Value: the mean height of the curve over `fractions` (trapezoid); lower = more faithful.
    """
    return _road(model, images, maps, target, fractions=fractions, noise=noise, seed=seed,
                 internal_batch=internal_batch, most_first=True)


@register("road_lerf", family="faithfulness", higher_is_better=True, needs_model=True, cost=_road_cost,
          points=_road_points, checks=ROAD_CHECKS, variants=ROAD_VARIANTS)
def road_lerf(model: nn.Module, images: Tensor, maps: Tensor, target: Tensor, mask: Any, *,
              fractions: Sequence[float] = ROAD_FRACTIONS, noise: float = 0.01, seed: int | None = 0,
              internal_batch: int = 64) -> Scores:
    """ROAD, least relevant first (Rong et al. 2022): the target's probability with the bottom fraction of pixels imputed.

    As `road_morf` with the least relevant pixels removed first; higher = more faithful.
    """
    return _road(model, images, maps, target, fractions=fractions, noise=noise, seed=seed,
                 internal_batch=internal_batch, most_first=False)
