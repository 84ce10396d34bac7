"""Robustness: does the map stay when the input barely moves? (It recomputes the method.)"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import _checks as C
from .._core import batched, seeded_rng
from .._registry import attribute, available
from ._registry import OK, ZERO_MAP, Scores, register


def _check_method(name: str, value: Any, ctx: C.Context) -> None:
    if value not in available():
        raise ValueError(f"max_sensitivity recomputes the method: method={value!r} is not one; "
                         f"available methods: {', '.join(available())}")


def _sensitivity_cost(params: Mapping[str, Any], size: tuple[int, int]) -> int:
    return params["samples"]  # plus the method's own passes on each perturbed image


@register("max_sensitivity", family="robustness", higher_is_better=False, needs_model=True, needs_method=True,
          cost=_sensitivity_cost, checks={"method": _check_method, "radius": C.number(0.0, low_open=True)},
          variants={"radius": (0.02, 0.1)})
def max_sensitivity(model: nn.Module, images: Tensor, maps: Tensor, target: Tensor, mask: Any, *,
                    method: str = "saliency", method_params: Mapping[str, Any] | None = None,
                    layer: str | None = None, contrast: Tensor | None = None, samples: int = 10,
                    radius: float = 0.05, seed: int | None = 0, internal_batch: int = 64) -> Scores:
    """Max-sensitivity (Yeh et al. 2019): max over `samples` perturbations in an L-inf ball of `radius` of ||phi(x+d) - phi(x)|| / ||phi(x)||.

    phi is `method` with `method_params` (and `layer` / `contrast` for layer and contrastive
    methods): a study passes its own, so the maps being scored are phi(x). d is uniform in
    [-radius, radius]^(C x H x W) in the normalised input space; one draw per sample, shared
    by all images (seeded). Norms are Frobenius over the map. A zero map: NaN, status ZERO_MAP.
    """
    b = images.shape[0]
    noise = (torch.rand((samples, *images.shape[1:]), generator=seeded_rng(seed)) * 2 - 1) * radius
    noise = noise.to(images.device, images.dtype)
    extra: dict[str, Any] = {"layer": layer} if layer is not None else {}
    worst = torch.zeros(b, device=images.device)
    for chunk in batched(b * samples, internal_batch):
        j = torch.arange(chunk.start, chunk.stop, device=images.device)
        img, k = j // samples, j % samples
        if contrast is not None:
            extra["contrast"] = contrast[img]
        moved = attribute(method, model, images[img] + noise[k], target=target[img], **extra,
                          **dict(method_params or {}))
        change = (moved - maps[img]).flatten(1).norm(dim=1)
        worst = worst.scatter_reduce(0, img, change, reduce="amax")
    norm = maps.flatten(1).norm(dim=1)
    return Scores(torch.where(norm > 0, worst / norm, torch.nan), torch.where(norm > 0, OK, ZERO_MAP).to(torch.int8))
