"""Gradient-based methods: one forward and one (possibly modified) backward pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ._core import backprop, reduce_channels
from ._registry import register


def one_pass(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    """Cost of a method that needs one forward and one backward pass per image."""
    return (1, 1)


@register("saliency", category="gradient", cost=one_pass)
def saliency(model: nn.Module, images: Tensor, target: Any, *, reduce: str | None = "max_abs") -> Tensor:
    """Saliency (Simonyan et al. 2014): gradient of the target logit w.r.t. the input.

    reduce: "max_abs" (default, the paper's map: max over channels of |grad|),
    "sum" (signed), "abs_sum", or None (the raw gradient, (B, C, H, W)).
    """
    return reduce_channels(backprop(model, images, target).grad, reduce)
