"""Localisation metrics (does the map point at the object?), the audit's share of a box, and
complexity (how concentrated is the map?). Maps only: no model pass.

Where the anchors go wrong (each has a test):
- ties: the pointing game's maximum and relevance rank's top-k are defined on the set of
  tied values, never on which tied pixel a sort happens to put first;
- a constant map is not a hit (status CONSTANT_MAP, value 0); its relevance rank is the
  chance level |mask| / (H W);
- an empty mask, a map with NaN/Inf, a map without positive mass (for the mass shares) or
  all zero (sparseness) is NaN with its status, never a silent 0 or 1.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks as C
from ._registry import CONSTANT_MAP, NO_POSITIVE, OK, ZERO_MAP, Scores, register


def default_tolerance(size: tuple[int, int]) -> int:
    """The pointing game's tolerance: 15 px at 224 x 224 (TorchRay's benchmark), scaled with min(H, W)."""
    return round(15 * min(size) / 224)


def within(mask: Tensor, radius: int) -> Tensor:
    """(B, H, W) bool: pixels at Euclidean distance <= `radius` of a mask pixel."""
    if radius <= 0:
        return mask
    offsets = torch.arange(-radius, radius + 1, device=mask.device)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).float()
    near = F.conv2d(mask[:, None].float(), disk[None, None], padding=radius)[:, 0]
    return near > 0


def _status(ok: Tensor, code: int) -> Tensor:
    return torch.where(ok, OK, code).to(torch.int8)


def _positive_share(maps: Tensor, where: Tensor) -> Scores:
    """Positive attribution inside `where` over all positive attribution (NaN: no positive mass)."""
    pos = maps.clamp_min(0).flatten(1).double()
    total = pos.sum(1)
    share = (pos * where.flatten(1)).sum(1) / total
    return Scores(torch.where(total > 0, share, torch.nan).float(), _status(total > 0, NO_POSITIVE))


@register("pointing_game", family="localisation", higher_is_better=True, needs_mask=True,
          checks={"tolerance": C.optional(C.int_at_least(0))}, variants={"tolerance": (0, 8)})
def pointing_game(model: Any, images: Tensor, maps: Tensor, target: Any, mask: Tensor, *,
                  tolerance: int | None = None) -> Scores:
    """Pointing game (Zhang et al. 2016, as TorchRay's benchmark): 1 if the map's maximum lies within
    `tolerance` pixels of the mask, else 0.

    tolerance: pixels (None: 15 at 224 x 224, scaled with min(H, W); 4 at 64 x 64). Tied maxima: a hit
    only when every tied maximum is within the tolerance (Quantus counts a hit when any is, so a
    constant map always hits). A constant map is a miss (value 0, status CONSTANT_MAP).
    """
    tol = default_tolerance(maps.shape[-2:]) if tolerance is None else tolerance
    flat = maps.flatten(1)
    top = flat.amax(1, keepdim=True)
    constant = (top[:, 0] == flat.amin(1))
    off_target = ((flat == top) & ~within(mask, tol).flatten(1)).any(1)
    hit = ~off_target & ~constant
    return Scores(hit.float(), _status(~constant, CONSTANT_MAP))


@register("relevance_mass", family="localisation", higher_is_better=True, needs_mask=True)
def relevance_mass(model: Any, images: Tensor, maps: Tensor, target: Any, mask: Tensor) -> Scores:
    """Relevance mass accuracy (Arras et al. 2022): positive attribution inside the mask over all positive attribution."""
    return _positive_share(maps, mask)


@register("outside_mask_share", family="localisation", higher_is_better=False, needs_mask=True)
def outside_mask_share(model: Any, images: Tensor, maps: Tensor, target: Any, mask: Tensor) -> Scores:
    """Share of the positive attribution outside the ground-truth mask (the audit's measure; 1 - relevance mass)."""
    return _positive_share(maps, ~mask)


@register("relevance_rank", family="localisation", higher_is_better=True, needs_mask=True)
def relevance_rank(model: Any, images: Tensor, maps: Tensor, target: Any, mask: Tensor) -> Scores:
    """Relevance rank accuracy (Arras et al. 2022): share of the |mask| highest-ranked pixels that lie in the mask.

    Ties at the cut share the remaining places: pixels tied with the k-th value count with the
    fraction of them that are in the mask, so the result does not depend on pixel order and a
    constant map scores the chance level |mask| / (H W).
    """
    flat, inside = maps.flatten(1), mask.flatten(1)
    k = inside.sum(1)
    cut = flat.sort(1, descending=True).values.gather(1, (k - 1)[:, None])  # the k-th highest value
    above, tied = flat > cut, flat == cut
    places = k - above.sum(1)  # how many of the tied pixels make the top k
    tied_inside = (tied & inside).sum(1) / tied.sum(1)
    hits = (above & inside).sum(1) + places * tied_inside
    return Scores((hits / k).float(), torch.full_like(k, OK, dtype=torch.int8))


def _check_region(name: str, value: Any, ctx: C.Context) -> None:
    h, w = ctx.size
    ok = isinstance(value, (list, tuple)) and len(value) == 4 and all(C.is_int(v) for v in value)
    if not ok or not (0 <= value[0] < value[2] <= h and 0 <= value[1] < value[3] <= w):
        raise ValueError(f"region must be a box [y0, x0, y1, x1] of model-input pixels with 0 <= y0 < y1 <= {h} "
                         f"and 0 <= x0 < x1 <= {w} (end-exclusive), got {value!r}")


@register("region_share", family="audit", higher_is_better=False, checks={"region": _check_region})
def region_share(model: Any, images: Tensor, maps: Tensor, target: Any, mask: Any, *,
                 region: list[int] | None = None) -> Scores:
    """Share of the positive attribution inside a box `region` = [y0, x0, y1, x1] (model-input pixels, end-exclusive).

    The dataset audit's measure: a watermark, a scanner's label or a caption in a corner the
    model should not need. `region` is required.
    """
    y0, x0, y1, x1 = region  # type: ignore[misc]
    box = torch.zeros_like(maps, dtype=torch.bool)
    box[:, y0:y1, x0:x1] = True
    return _positive_share(maps, box)


@register("sparseness", family="complexity", higher_is_better=True)
def sparseness(model: Any, images: Tensor, maps: Tensor, target: Any, mask: Any) -> Scores:
    """Sparseness (Chalasani et al. 2020): the Gini index of |map|; 0 = uniform, near 1 = one pixel holds everything."""
    x = maps.abs().flatten(1).double().sort(1).values
    n = x.shape[1]
    total = x.sum(1)
    i = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    gini = ((2 * i - n - 1) * x).sum(1) / (n * total)
    return Scores(torch.where(total > 0, gini, math.nan).float(), _status(total > 0, ZERO_MAP))
