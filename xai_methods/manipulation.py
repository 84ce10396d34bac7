"""Explanations can be manipulated (Dombrowski et al. 2019), and beta-smoothing defends them.

`manipulate` optimises a perturbation of the images, within the valid pixel range, so that a
method's map approaches a target map while the network's output stays; the gradient of the
map w.r.t. the input needs second derivatives, which a ReLU network does not have, so the
attack differentiates through a softplus copy of the model (`surgery.softplus_copy`) and the
result is then explained by the model itself. The defence is to explain through a softplus
copy with a small beta.

`explanation` is the differentiable form of the methods the attack supports: the same maps as
`xai_methods.attribute` with default parameters (tested), built with ``create_graph=True``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._core import class_score, default_layer, layer_output, resolve_layer, targets
from .cam import _gradcam_weights, combine, finish
from .gradient import ig_nodes
from .surgery import softplus_copy

DIFFERENTIABLE = ("saliency", "input_x_gradient", "integrated_gradients", "gradcam")


def _grad(score: Tensor, wrt: Tensor) -> Tensor:
    (g,) = torch.autograd.grad(score.sum(), wrt, create_graph=True)
    return g


def explanation(name: str, model: nn.Module, x: Tensor, target: Tensor, layer: str | None = None,
                steps: int = 32) -> Tensor:
    """(B, H, W) map of `name` for inputs `x` that stays differentiable w.r.t. `x`."""
    if name not in DIFFERENTIABLE:
        raise ValueError(f"method {name!r} cannot be manipulated here; valid: {', '.join(DIFFERENTIABLE)}")
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        if name == "gradcam":
            chosen = resolve_layer(model, layer if layer is not None else default_layer(model, x))
            with layer_output(chosen) as captured:
                score = class_score(model(x), target)
            a = captured.output
            return finish(combine(a, _gradcam_weights(a, _grad(score, a))), x.shape[2:], relu=True, upsample=True)
        if name == "integrated_gradients":  # zeros baseline, Gauss-Legendre nodes: the method's defaults
            alphas, weights = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in ig_nodes("gauss_legendre", steps))
            total = torch.zeros_like(x)
            for a, w in zip(alphas, weights):
                path = a * x
                total = total + w * _grad(class_score(model(path), target), path)
            return (x * total).sum(1)
        g = _grad(class_score(model(x), target), x)
        return g.abs().amax(1) if name == "saliency" else (x * g).sum(1)


def _unit(maps: Tensor) -> Tensor:
    """Maps scaled to unit absolute sum (the attack compares shapes, not magnitudes)."""
    return maps / maps.abs().flatten(1).sum(1).clamp_min(1e-12)[:, None, None]


class Manipulated(NamedTuple):
    images: Tensor  # (B, C, H, W) the perturbed model inputs (normalised)
    delta: Tensor  # (B, C, H, W) the perturbation in [0, 1] pixel units


def manipulate(method: str, model: nn.Module, images: Tensor, target_maps: Tensor, *, preprocess: Any,
               target: Any = None, layer: str | None = None, steps: int = 200, lr: float = 1e-3,
               beta: float = 10.0, gamma: float = 1e3, epsilon: float = 0.05) -> Manipulated:
    """Dombrowski et al.'s attack: minimise ||h(x + d) - h_t||^2 + gamma ||p(x + d) - p(x)||^2 over d.

    h is `method`'s map scaled to unit absolute sum, h_t the target map scaled alike, p the
    model's softmax output (the model itself: keeping it needs first derivatives only); d is optimised by Adam in [0, 1] pixel units, projected after each step to
    |d| <= `epsilon` (the L-inf budget that keeps it imperceptible) and to an image in [0, 1].
    The map is differentiated through the softplus copy of `beta` (with a small beta, that
    copy's map is the defended explanation, and this is the attack on it).
    `preprocess` maps [0, 1] images to model inputs and back (`zoo.Preprocess`).
    """
    if steps < 1 or lr <= 0 or gamma < 0 or not 0 < epsilon <= 1:
        raise ValueError(f"steps must be >= 1, lr > 0, gamma >= 0 and epsilon in (0, 1]; got steps={steps}, "
                         f"lr={lr}, gamma={gamma}, epsilon={epsilon}")
    surrogate = softplus_copy(model, beta)
    x01 = preprocess.invert(images).detach()
    with torch.no_grad():
        logits = model(images)
        t = targets(logits, target, images.shape[0], images.device)
        p0 = logits.softmax(1)
        goal = _unit(target_maps.to(images.dtype))
    delta = torch.zeros_like(x01, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        x = preprocess((x01 + delta).clamp(0, 1))
        h = _unit(explanation(method, surrogate, x, t, layer))
        with torch.enable_grad():
            loss = ((h - goal) ** 2).flatten(1).sum(1) * goal[0].numel() \
                + gamma * ((model(x).softmax(1) - p0) ** 2).sum(1)  # the model's own output (first order only)
            # the gradient w.r.t. the perturbation only: nothing accumulates in the model's parameters
            (delta.grad,) = torch.autograd.grad(loss.sum(), delta)
        opt.step()
        with torch.no_grad():
            delta.copy_((x01 + delta.clamp(-epsilon, epsilon)).clamp(0, 1) - x01)
    d = delta.detach()
    return Manipulated(images=preprocess(x01 + d).detach(), delta=d)


def smoothed_explanation(method: str, model: nn.Module, images: Tensor, target: Tensor, beta: float,
                         layer: str | None = None) -> Tensor:
    """The defence: `method`'s map through the softplus copy of `beta` (detached)."""
    return explanation(method, softplus_copy(model, beta), images, target, layer).detach()


def output_change(model: nn.Module, before: Tensor, after: Tensor) -> Tensor:
    """(B,) total-variation distance of the softmax outputs on `before` and `after` (0 = the same output)."""
    with torch.no_grad():
        return 0.5 * (F.softmax(model(after), 1) - F.softmax(model(before), 1)).abs().sum(1)
