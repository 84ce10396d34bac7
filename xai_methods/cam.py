"""Class activation maps: one template, each variant supplies its weights.

The template captures the layer activation A (B, K, h, w) and the gradient
dS/dA of the target logit S in one batched forward+backward pass. A variant
returns weights that are either per channel (B, K) or per element
(B, K, h, w); the map is ``ReLU(sum_k w_k * A_k)``, upsampled bilinearly to
the input size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ._core import backprop, layer_name, upsample_to
from ._registry import register
from .gradient import one_pass

# (activation A, gradient dS/dA) -> weights (B, K) or (B, K, h, w)
CamWeights = Callable[[Tensor, Tensor], Tensor]


def combine(activation: Tensor, weights: Tensor) -> Tensor:
    """sum_k w_k * A_k for channel weights (B, K) or element weights (B, K, h, w) -> (B, h, w)."""
    if weights.dim() == 2:
        weights = weights[:, :, None, None]
    return (weights * activation).sum(1)


def finish(maps: Tensor, size: tuple[int, int], *, relu: bool, upsample: bool) -> Tensor:
    """Optional ReLU, then optional bilinear upsampling of (B, h, w) maps to `size`."""
    if relu:
        maps = maps.clamp_min(0)
    return upsample_to(maps, size) if upsample else maps


def layer_activation_and_grad(model: nn.Module, images: Tensor, target: Any, layer: nn.Module) -> tuple[Tensor, Tensor]:
    """Activation (B, K, h, w) of `layer` and the gradient of the target logit w.r.t. it."""
    bp = backprop(model, images, target, layer=layer)
    if bp.activation is None or bp.activation.dim() != 4:
        shape = None if bp.activation is None else tuple(bp.activation.shape)
        raise ValueError(
            f"layer: {layer_name(model, layer)!r} outputs shape {shape}; "
            "CAM methods need a 4-D (B, K, h, w) activation, e.g. the last convolutional stage"
        )
    return bp.activation, bp.grad


def gradient_cam(
    model: nn.Module,
    images: Tensor,
    target: Any,
    layer: nn.Module,
    weights: CamWeights,
    *,
    relu: bool,
    upsample: bool,
) -> Tensor:
    """The template for gradient-weighted CAM variants."""
    activation, grad = layer_activation_and_grad(model, images, target, layer)
    return finish(combine(activation, weights(activation, grad)), images.shape[2:], relu=relu, upsample=upsample)


@register("gradcam", category="cam", cost=one_pass)
def gradcam(
    model: nn.Module, images: Tensor, target: Any, *, layer: nn.Module, relu: bool = True, upsample: bool = True
) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of dS/dA."""
    return gradient_cam(model, images, target, layer, lambda a, g: g.mean(dim=(2, 3)), relu=relu, upsample=upsample)
