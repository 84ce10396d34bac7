"""Gradient-based methods: gradients of the target logit, possibly modified, integrated or averaged.

saliency, input_x_gradient: one forward and one backward pass.
deconvnet, guided_backprop: one pass with a modified ReLU backward (`_rules`).
integrated_gradients: gradients along a path from a baseline, all path points of
all images batched together. smoothgrad, smoothgrad_sq, vargrad: statistics of
any gradient method over noisy copies of the input, batched likewise.
fullgrad: input-gradient and bias-gradients of every layer, from one backward.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as C
from ._core import (
    REDUCE_CHOICES,
    backprop,
    batched,
    class_score,
    completeness_gap,
    forward_logits,
    hooks,
    reduce_channels,
    resolve_baseline,
    seeded_rng,
    targets,
    untouched,
)
from ._registry import MethodFn, MethodSpec, _check_params, available, register, spec
from ._rules import Rule, backward_rules, deconvnet_rule, guided_rule


def one_pass(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    """Cost of a method that needs one forward and one backward pass per image."""
    return (1, 1)


@register("saliency", category="gradient", cost=one_pass,
          from_pass=lambda bp, model, layer, size, kw: reduce_channels(bp.input_grad, kw["reduce"]))
def saliency(model: nn.Module, images: Tensor, target: Any, *, reduce: str | None = "max_abs") -> Tensor:
    """Saliency (Simonyan et al. 2014): gradient of the target logit w.r.t. the input.

    reduce: "max_abs" (default, the paper's map: max over channels of |grad|),
    "sum" (signed), "abs_sum", or None (the raw gradient, (B, C, H, W)).
    """
    return reduce_channels(backprop(model, images, target).grad, reduce)


# --------------------------------------------------------------------------- x * gradient


@register("input_x_gradient", category="gradient", cost=one_pass,
          from_pass=lambda bp, model, layer, size, kw: reduce_channels(bp.inputs * bp.input_grad, kw["reduce"]))
def input_x_gradient(model: nn.Module, images: Tensor, target: Any, *, reduce: str | None = "sum") -> Tensor:
    """Input x Gradient (Shrikumar et al. 2016): the input times the gradient of the target logit.

    reduce: "sum" (default: signed, and for a linear model f(x) = Wx + b the
    map sums to f(x) - b), "abs_sum", "max_abs", or None for (B, C, H, W).
    """
    bp = backprop(model, images, target)
    return reduce_channels(bp.inputs * bp.grad, reduce)


# --------------------------------------------------------------------------- modified ReLU backward


def _relu_rule_gradient(model: nn.Module, images: Tensor, target: Any, rule: Rule, name: str) -> Tensor:
    with backward_rules(model, {nn.ReLU: rule}) as scope:
        grad = backprop(model, images, target).grad
    if scope.calls == 0:
        warnings.warn(
            f"{name}: no nn.ReLU module ran in the model's forward pass, so the result is the plain "
            "gradient; functional ReLUs (torch.relu / F.relu in forward) cannot be hooked",
            stacklevel=4,
        )
    return grad


# Activation modules a ReLU rule does not touch: with them the modified backward pass mixes rules.
OTHER_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh,
                     nn.Hardswish, nn.Mish, nn.Softplus, nn.Tanh, nn.Sigmoid)


def relu_model(method: str) -> Callable[[nn.Module, tuple[int, int], Any], None]:
    """The assumption of DeconvNet and guided backpropagation: the model's nonlinearities are nn.ReLU
    modules. None at all is an error (the map would be the plain gradient); other activations warn."""

    def assumes(model: nn.Module, size: tuple[int, int], layer: Any) -> None:
        kinds: dict[str, int] = {}
        for m in model.modules():
            if isinstance(m, (nn.ReLU, *OTHER_ACTIVATIONS)):
                kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
        others = {k: n for k, n in kinds.items() if k != "ReLU"}
        if "ReLU" not in kinds:
            found = ", ".join(f"{n} {k}" for k, n in others.items()) or "none as modules"
            raise ValueError(f"{method} changes the backward pass of nn.ReLU modules and this model has none "
                             f"(activation modules: {found}), so its map would be the plain gradient; use saliency, "
                             "integrated_gradients or deeplift")
        if others:
            warnings.warn(f"{method}: the model's {', '.join(f'{n} {k}' for k, n in others.items())} module(s) keep "
                          f"their ordinary gradient; only its {kinds['ReLU']} nn.ReLU module(s) get the {method} "
                          "rule, so the map mixes two rules", stacklevel=3)

    return assumes


@register("deconvnet", category="gradient", cost=one_pass, assumes=relu_model("deconvnet"))
def deconvnet(model: nn.Module, images: Tensor, target: Any, *, reduce: str | None = "max_abs") -> Tensor:
    """DeconvNet (Zeiler & Fergus 2014): backward pass in which every ReLU passes ReLU(incoming gradient).

    The forward ReLU mask is ignored on the way back. Every ``nn.ReLU`` module
    gets the rule, on each of its calls (a module reused several times per
    forward, like torchvision ResNet's, is handled); functional ReLUs
    (``torch.relu``/``F.relu`` in ``forward``) are not modules and keep their
    ordinary gradient (a warning is issued when no ``nn.ReLU`` ran).
    reduce: "max_abs" (default, like `saliency`: the result is a modified
    gradient), "sum", "abs_sum", or None for the raw (B, C, H, W) tensor that
    Captum's ``Deconvolution`` returns.
    """
    return reduce_channels(_relu_rule_gradient(model, images, target, deconvnet_rule, "deconvnet"), reduce)


@register("guided_backprop", category="gradient", cost=one_pass, assumes=relu_model("guided_backprop"))
def guided_backprop(model: nn.Module, images: Tensor, target: Any, *, reduce: str | None = "max_abs") -> Tensor:
    """Guided Backprop (Springenberg et al. 2015): backward pass in which every ReLU passes grad * (x > 0) * (grad > 0).

    Same hooking and limitations as `deconvnet` (``nn.ReLU`` modules only,
    reused modules handled). reduce: "max_abs" (default), "sum", "abs_sum",
    or None for the raw (B, C, H, W) tensor (Captum's ``GuidedBackprop``),
    which guided Grad-CAM multiplies with an upsampled Grad-CAM map.
    """
    return reduce_channels(_relu_rule_gradient(model, images, target, guided_rule, "guided_backprop"), reduce)


# --------------------------------------------------------------------------- integrated gradients

IG_RULES = ("gauss_legendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


def ig_nodes(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes alpha in [0, 1] and weights (summing to 1) for `steps` path points.

    riemann_left/right/middle: alpha = k/n, (k+1)/n, (k+1/2)/n, weights 1/n.
    riemann_trapezoid: alpha = k/(n-1), weights 1/(n-1) halved at both ends
    (the trapezoid rule; needs n >= 2). gauss_legendre: Gauss-Legendre nodes
    and weights (numpy.polynomial.legendre.leggauss) mapped from [-1, 1] to [0, 1].
    """
    n = steps
    if rule == "gauss_legendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (nodes + 1) / 2, weights / 2
    if rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError(f"steps must be >= 2 for rule='riemann_trapezoid', got {n}")
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, n), weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}.get(rule)
    if offset is None:
        raise ValueError(f"rule={rule!r} is not valid; choose one of {IG_RULES}")
    return (np.arange(n) + offset) / n, np.full(n, 1.0 / n)


def _ig_cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    return (params["steps"] + 1, params["steps"])


def _check_rule(name: str, value: Any, ctx: C.Context) -> None:
    ig_nodes(value, ctx.params["steps"])  # the rule, and its least number of steps


#: blur_sigma of the methods whose baseline may be "blur" (None: `default_blur_sigma`)
BLUR_SIGMA = C.optional(C.number(0.0, low_open=True))


class IGResult(NamedTuple):
    attribution: Tensor  # (B, C, H, W): (x - x0) * sum_k w_k dS/dx(x0 + a_k (x - x0))
    target: Tensor  # (B,)
    baseline: Tensor  # (B, C, H, W) the reference x0
    score: Tensor  # (B,) S(x)


def _outside_inference_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` with inference mode off: its tensors (indices, accumulators, path points)
    are then normal tensors usable in autograd even when the caller is in inference mode."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper


@_outside_inference_mode
def _integrated_gradients(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    baseline: Any,
    steps: int,
    rule: str,
    internal_batch: int,
    blur_sigma: float | None,
    seed: int | None,
) -> IGResult:
    alphas, weights = ig_nodes(rule, steps)
    b = images.shape[0]
    x = images.detach().clone()  # a normal tensor even if the caller is in inference mode
    ref = resolve_baseline(x, baseline, seed=seed, blur_sigma=blur_sigma).expand_as(x)
    logits = forward_logits(model, x, internal_batch)
    t = targets(logits, target, b, x.device).clone()
    alpha = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
    weight = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    total = torch.zeros_like(x)
    # Row j of the (B * steps) path points is image j // steps at node j % steps;
    # chunks of internal_batch rows mix images and nodes freely.
    for chunk in batched(b * steps, internal_batch):
        j = torch.arange(chunk.start, chunk.stop, device=x.device)
        img, node = j // steps, j % steps
        a = alpha[node].view(-1, 1, 1, 1)
        path = ref[img] + a * (x[img] - ref[img])
        grad = backprop(model, path, t[img]).grad
        total.index_add_(0, img, grad * weight[node].view(-1, 1, 1, 1))
    return IGResult((x - ref) * total, t, ref, class_score(logits, t))


@register("integrated_gradients", category="gradient", cost=_ig_cost,
          checks={"rule": _check_rule, "blur_sigma": BLUR_SIGMA})
def integrated_gradients(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    baseline: float | str | Tensor = "zeros",
    steps: int = 32,
    rule: str = "gauss_legendre",
    blur_sigma: float | None = None,
    seed: int | None = 0,
    internal_batch: int = 64,
    reduce: str | None = "sum",
) -> Tensor:
    """Integrated Gradients (Sundararajan et al. 2017): (x - x0) times the mean gradient on the path from x0 to x.

    baseline x0: "zeros" (default: 0 in normalised space, i.e. the
    normalisation mean colour), a number, a tensor broadcastable to the images, "mean"
    (per-image per-channel mean), "blur" (the image blurred by the shared Gaussian of
    `blur_sigma` pixels, None = 10 * min(H, W) / 224, as every "blur" of the project) or
    "uniform" (uniform noise in each image's per-channel range, from a generator seeded
    by `seed`, one pattern shared by all images so the result does not depend on the
    batch; seed=None: not reproducible); see `_core.resolve_baseline`. steps: path points; rule:
    "gauss_legendre" (default, as Captum), "riemann_trapezoid",
    "riemann_left", "riemann_right", "riemann_middle" (see `ig_nodes`;
    weights sum to 1, so on a linear model every rule is exact).
    Gauss-Legendre converges much faster on smooth models; on ReLU networks
    the integrand is piecewise constant along the path and all rules
    converge at a similar rate (on shapes-cnn the trapezoid rule was
    slightly better). All B * steps path points run in chunks of
    `internal_batch` forward+backward passes (the memory bound), images and
    steps mixed. reduce: "sum" (default; then the map sums to about
    S(x) - S(x0), completeness: see `ig_completeness_gap`), "abs_sum",
    "max_abs" or None for (B, C, H, W). One extra forward pass finds S(x) and
    the top-1 class.
    """
    out = _integrated_gradients(
        model, images, target, baseline=baseline, steps=steps, rule=rule,
        internal_batch=internal_batch, blur_sigma=blur_sigma, seed=seed,
    )
    return reduce_channels(out.attribution, reduce)


def ig_completeness_gap(model: nn.Module, images: Tensor, target: Any = None, **params: Any) -> Tensor:
    """Relative completeness error of integrated gradients per image (B,):
    (sum(map) - (S(x) - S(x0))) / |S(x) - S(x0)|, with `params` as for
    ``integrated_gradients`` (its defaults otherwise; reduce is ignored). Not
    finite where S(x) = S(x0). One more forward pass for S(x0). Leaves the
    model untouched."""
    s = spec("integrated_gradients")
    _check_params(s, params, C.Context(size=tuple(images.shape[-2:]), model=model))
    kwargs = {**s.defaults, **params}
    kwargs.pop("reduce", None)
    with untouched(model):
        out = _integrated_gradients(model, images, target, **kwargs)
        ref_score = class_score(forward_logits(model, out.baseline, kwargs["internal_batch"]), out.target)
    return completeness_gap(out.attribution, out.score, ref_score)


# --------------------------------------------------------------------------- noise tunnels (SmoothGrad family)

TUNNELS = ("smoothgrad", "smoothgrad_sq", "vargrad")


def _tunnel_base(base: Any, base_params: Any, ctx: C.Context | None = None) -> tuple[MethodSpec, dict[str, Any]]:
    """Validate `base` and `base_params`; return the base's spec and its full keyword arguments."""
    gradient_methods = [n for n in available() if spec(n).category == "gradient" and n not in TUNNELS]
    if not isinstance(base, str) or base not in gradient_methods:
        raise ValueError(
            f"base={base!r} is not valid; a noise tunnel wraps a gradient method (not itself): "
            f"{', '.join(gradient_methods)}"
        )
    if base_params is None:
        base_params = {}
    if not isinstance(base_params, Mapping):
        raise TypeError(f"base_params must be a dict of {base}'s parameters or None, got {type(base_params).__name__}")
    s = spec(base)
    _check_params(s, base_params, ctx)
    if "reduce" in base_params and base_params["reduce"] is None:
        raise ValueError(
            "base_params: reduce=None is not supported here (the tunnel returns (B, H, W) maps); "
            f"choose one of {[r for r in REDUCE_CHOICES if r is not None]}"
        )
    return s, {**s.defaults, **base_params}


def _check_tunnel_base(name: str, value: Any, ctx: C.Context) -> None:
    _tunnel_base(value, ctx.params.get("base_params"), ctx)


TUNNEL_CHECKS: dict[str, C.Check] = {"base": _check_tunnel_base, "noise": C.number(0.0)}


def _tunnel_cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    s, kwargs = _tunnel_base(params["base"], params["base_params"])
    forward, backward = s.cost(kwargs, size)
    return (1 + params["samples"] * forward, params["samples"] * backward)


@_outside_inference_mode
def _noise_tunnel(
    model: nn.Module,
    images: Tensor,
    target: Any,
    statistic: str,
    *,
    base: str,
    base_params: Mapping[str, Any] | None,
    samples: int,
    noise: float,
    seed: int | None,
    internal_batch: int,
) -> Tensor:
    s, kwargs = _tunnel_base(base, base_params)
    b = images.shape[0]
    x = images.detach().clone()  # a normal tensor even if the caller is in inference mode
    t = targets(forward_logits(model, x, internal_batch), target, b, x.device).clone()
    sigma = noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1))  # (B,) per the paper
    # One unit-noise pattern per sample, shared by all images (scaled by each image's sigma):
    # an image's map does not depend on the other images in the batch.
    eps = torch.randn((samples, *x.shape[1:]), generator=seeded_rng(seed)).to(device=x.device, dtype=x.dtype)
    acc = torch.float64 if x.device.type != "mps" else torch.float32
    total = sq_total = None
    for chunk in batched(b * samples, internal_batch):
        j = torch.arange(chunk.start, chunk.stop, device=x.device)
        img, k = j // samples, j % samples
        noisy = x[img] + sigma[img].view(-1, 1, 1, 1) * eps[k]
        maps = s.fn(model, noisy, t[img], **kwargs).detach().to(acc)
        if total is None:
            total = maps.new_zeros((b, *maps.shape[1:]))
            sq_total = maps.new_zeros((b, *maps.shape[1:]))
        total.index_add_(0, img, maps)
        sq_total.index_add_(0, img, maps * maps)
    mean, mean_sq = total / samples, sq_total / samples
    if statistic == "mean":
        out = mean
    elif statistic == "sq":
        out = mean_sq
    else:
        out = (mean_sq - mean * mean).clamp_min(0)
    return out.to(x.dtype)


def noise_tunnel_variant(name: str, statistic: str, doc: str) -> MethodFn:
    """Define and register a noise tunnel with one statistic over the noisy samples' maps
    (the registry reads the parameters from the signature, so it is written once here)."""

    def method(
        model: nn.Module,
        images: Tensor,
        target: Any,
        *,
        base: str = "saliency",
        base_params: Mapping[str, Any] | None = None,
        samples: int = 16,
        noise: float = 0.15,
        seed: int | None = 0,
        internal_batch: int = 64,
    ) -> Tensor:
        return _noise_tunnel(
            model, images, target, statistic, base=base, base_params=base_params,
            samples=samples, noise=noise, seed=seed, internal_batch=internal_batch,
        )

    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    return register(name, category="gradient", cost=_tunnel_cost, checks=TUNNEL_CHECKS)(method)


smoothgrad = noise_tunnel_variant("smoothgrad", "mean", """SmoothGrad (Smilkov et al. 2017): mean of the base method's maps over noisy copies of the input.

    base: a registered gradient method (default "saliency"; not a noise
    tunnel itself), run with its own defaults updated by `base_params` (a
    dict; reduce=None is refused). The base's channel reduction is applied to
    each noisy sample's map before the statistic is taken: with saliency's
    default "max_abs" the result is the mean of max_c |grad| (Captum's
    NoiseTunnel over Saliency(abs=True) averages |grad| per channel instead,
    and reduces afterwards); base_params={"reduce": "sum"} gives the paper's
    mean gradient, summed over channels. samples: noisy copies per image.
    noise: standard deviation of the Gaussian noise as a fraction of each
    image's (max - min), the paper's noise level (default 0.15).
    Reproducibility: the noise comes from a CPU generator seeded by `seed`:
    one pattern of shape (samples, C, H, W), shared by all images and scaled
    by each image's sigma, so an image's map does not depend on the other
    images of the batch and is the same on every device (seed=None: a
    non-reproducible draw). All B * samples
    noisy images go to the base in chunks of `internal_batch` (the base's own
    internal_batch bounds its inner passes, e.g. integrated gradients' path
    points). The target is resolved on the clean images (one extra forward).
    """)
smoothgrad_sq = noise_tunnel_variant("smoothgrad_sq", "sq", """SmoothGrad-Squared (Hooker et al. 2019): mean of the squared base maps over noisy copies of the input.

    Parameters, noise and batching as `smoothgrad` (the base's reduction is
    applied to each sample's map before squaring).
    """)
vargrad = noise_tunnel_variant("vargrad", "var", """VarGrad (Adebayo et al. 2018; Hooker et al. 2019): variance of the base maps over noisy copies of the input.

    The population variance (divided by `samples`, as Captum's NoiseTunnel),
    accumulated in float64. Parameters, noise and batching as `smoothgrad`
    (the base's reduction is applied to each sample's map first).
    """)


# --------------------------------------------------------------------------- FullGrad


def effective_bias(module: nn.Module) -> Tensor | None:
    """The bias a layer adds to its output, or None.

    Conv / ConvTranspose / Linear: their ``bias``. BatchNorm with running
    statistics (eval mode): beta - running_mean * gamma / sqrt(running_var + eps)
    (gamma = 1, beta = 0 without affine parameters); BatchNorm without running
    statistics has no fixed bias (None).
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None or module.running_var is None:
            return None
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        bias = -module.running_mean * scale
        return (bias + module.bias if module.bias is not None else bias).detach()
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and module.bias is not None:
        return module.bias.detach()
    return None


class FullGradTerms(NamedTuple):
    """The full-gradient decomposition, before any post-processing (all detached)."""

    input_term: Tensor  # (B, C, H, W): x * dS/dx
    bias_terms: list[tuple[str, Tensor]]  # (layer name, bias * dS/d(layer output)), one per layer call
    score: Tensor  # (B,) S(x), the target logit
    target: Tensor  # (B,)


def fullgrad_terms(model: nn.Module, images: Tensor, target: Any) -> FullGradTerms:
    """x * dS/dx and, for every call of a layer with an (effective) bias, bias * dS/d(output).

    Forward hooks capture every such layer's output and ONE
    ``torch.autograd.grad`` call returns the gradients w.r.t. the input and
    all of them (one forward, one backward). For a piecewise-linear network
    in eval mode (ReLU, max/avg pooling, conv, linear, BatchNorm) the terms
    sum exactly to S(x) (completeness). Call inside `untouched(model)`.
    """
    captured: list[tuple[str, Tensor, Tensor]] = []  # (name, bias, output)

    def capture(name: str, bias: Tensor) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None
            captured.append((name, bias, output))
            return output.clone()  # a later in-place op (ResNet's `out += identity`) must not rewrite it

        return hook

    with torch.inference_mode(False), torch.enable_grad(), hooks() as handles:
        for name, module in model.named_modules():
            bias = effective_bias(module)
            if bias is not None:
                handles.append(module.register_forward_hook(capture(name, bias)))
        x = images.detach().clone().requires_grad_(True)
        logits = model(x)
        t = targets(logits, target, images.shape[0], images.device)
        score = class_score(logits, t)
        grads = torch.autograd.grad(score.sum(), [x, *(o for _, _, o in captured)], allow_unused=True)
    terms = []
    for (name, bias, output), grad in zip(captured, grads[1:]):
        grad = torch.zeros_like(output) if grad is None else grad
        terms.append((name, (grad * bias.view(1, -1, *[1] * (grad.dim() - 2))).detach()))
    return FullGradTerms((x * grads[0]).detach(), terms, score.detach(), t)


def fullgrad_psi(term: Tensor, size: tuple[int, int], eps: float = 1e-6) -> Tensor:
    """The paper's post-processing of one (B, K, h, w) term -> (B, H, W): |.|, min-max
    rescaling per image over all channels and positions, sum over channels, bilinear
    upsampling to `size` (align_corners=True, as the authors' code)."""
    a = term.abs().flatten(1)
    a = a - a.amin(1, keepdim=True)
    a = (a / (a.amax(1, keepdim=True) + eps)).view_as(term).sum(1)
    if tuple(a.shape[-2:]) == tuple(size):
        return a
    return F.interpolate(a[:, None], size=tuple(size), mode="bilinear", align_corners=True)[:, 0]


@register("fullgrad", category="gradient", cost=one_pass)
def fullgrad(model: nn.Module, images: Tensor, target: Any) -> Tensor:
    """FullGrad (Srinivas & Fleuret 2019): psi(x * grad) + sum over conv/BatchNorm layers of psi(bias * grad).

    psi = absolute value, min-max rescaling per image (over channels and
    positions jointly), sum over channels, bilinear upsampling to the input
    size: exactly the authors' code (idiap/fullgrad-saliency). Biases: those
    of Conv layers and the effective bias of BatchNorm layers (see
    `effective_bias`; it uses running statistics, so use eval mode; unlike
    the authors' code, BatchNorm without affine parameters is included, its
    effective bias being -running_mean / sqrt(running_var + eps)). Every
    call of a layer counts (a reused layer gives several terms). Bias terms
    that are not spatial (Linear layers) enter the decomposition (see
    `fullgrad_terms`, which sums to the logit) but not the map, as in the
    paper. All terms come from one forward and one backward pass. The map is
    raw, not rescaled at the end. pytorch-grad-cam's ``FullGrad`` differs:
    it rescales each channel separately before summing channels, resizes
    with half-pixel centres, and min-max scales the final map.
    """
    size = tuple(images.shape[-2:])
    terms = fullgrad_terms(model, images, target)
    out = fullgrad_psi(terms.input_term, size)
    for _, term in terms.bias_terms:
        if term.dim() == 4:
            out = out + fullgrad_psi(term, size)
    return out
