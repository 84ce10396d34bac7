"""Class activation maps: one template, each variant supplies its weights.

Every variant works on the activation A (B, K, h, w) of one layer and returns
``ReLU(sum_k w_k * A_k)`` (ReLU optional), upsampled bilinearly to the input
size (optional). The weights are per channel (B, K) or per element
(B, K, h, w) and come from

- the gradient dS/dA of the target logit S (`gradient_cam`: one batched
  forward+backward pass): Grad-CAM, HiResCAM, XGrad-CAM, Layer-CAM, Grad-CAM++;
- the model's linear head (`cam`), or the activation alone (`eigencam`):
  one forward pass, no backward;
- extra forward passes, one per (image, channel), batched across images and
  channels in chunks of ``internal_batch`` under inference mode: Score-CAM
  (masked inputs) and Ablation-CAM (one channel of the layer zeroed).

Token layers: when the layer emits tokens (B, N, D) (a ViT block), they are
turned into a grid (B, D, h, w) by `tokens_to_grid` (a square grid of N tokens,
or of N - 1 after a leading class token), or by the ``reshape`` parameter
(a callable tokens -> (B, D, h, w)) that every variant takes. Gradients go
through the same reshape, so it must only move / select entries (a view,
permute or slice), as pytorch-grad-cam's ``reshape_transform``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._core import (
    backprop,
    batched,
    class_score,
    default_layer,
    hooks,
    layer_name,
    layer_output,
    progress_bar,
    reduce_channels,
    resolve_layer,
    targets,
    untouched,
    upsample_to,
)
from ._registry import MethodFn, register
from .gradient import one_pass, relu_model

# (activation A, gradient dS/dA) -> weights (B, K) or (B, K, h, w)
CamWeights = Callable[[Tensor, Tensor], Tensor]
# layer output (e.g. tokens (B, N, D)) -> activation grid (B, K, h, w)
Reshape = Callable[[Tensor], Tensor]

# Channel count assumed by the cost of Score-CAM and Ablation-CAM (1 + K forward
# passes per image): the cost function sees only (params, (H, W)), not the layer.
# 512 is the last stage of ResNet-18/34 and VGG; ResNet-50's layer4 has 2048.
ASSUMED_CHANNELS = 512

SCORECAM_SOFTMAX = ("classes", "channels")


# --------------------------------------------------------------------------- template


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


def tokens_to_grid(tokens: Tensor) -> Tensor:
    """Tokens (B, N, D) -> grid (B, D, s, s): N = s*s patch tokens, or a leading class token and s*s patch tokens."""
    b, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        side = math.isqrt(max(n - 1, 0))
        if n < 2 or side * side != n - 1:
            raise ValueError(
                f"layer: its output has {n} tokens, neither a square grid nor a class token plus a square grid; "
                "pass reshape=, a callable tokens -> (B, D, h, w)"
            )
        tokens = tokens[:, 1:]
    return tokens.reshape(b, side, side, d).permute(0, 3, 1, 2)


def check_reshape(reshape: Any) -> None:
    if reshape is not None and not callable(reshape):
        raise TypeError(f"reshape must be None or a callable tokens -> (B, K, h, w), got {type(reshape).__name__}")


def to_grid(output: Tensor, model: nn.Module, layer: nn.Module, reshape: Reshape | None) -> Tensor:
    """The layer output as an activation grid (B, K, h, w): `reshape`, tokens_to_grid for 3-D outputs, or as is."""
    if reshape is not None:
        grid = reshape(output)
        if not isinstance(grid, Tensor) or grid.dim() != 4 or grid.shape[0] != output.shape[0]:
            got = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
            raise ValueError(f"reshape must return a tensor (B, K, h, w) with B = {output.shape[0]}, got {got}")
        return grid
    if output.dim() == 4:
        return output
    if output.dim() == 3:
        return tokens_to_grid(output)
    raise ValueError(
        f"layer: {layer_name(model, layer)!r} outputs shape {tuple(output.shape)}; CAM methods need a 4-D "
        "(B, K, h, w) activation (e.g. the last convolutional stage) or 3-D tokens (B, N, D) of a transformer block"
    )


def layer_activation_and_grad(
    model: nn.Module,
    images: Tensor,
    target: Any,
    layer: nn.Module,
    reshape: Reshape | None = None,
    score: Callable[[Tensor, Tensor], Tensor] = class_score,
) -> tuple[Tensor, Tensor]:
    """Activation grid (B, K, h, w) of `layer` and the gradient of the target logit (or of
    ``score(logits, target)``) w.r.t. it."""
    check_reshape(reshape)
    bp = backprop(model, images, target, layer=layer, score=score)
    assert bp.activation is not None
    return to_grid(bp.activation, model, layer, reshape), to_grid(bp.grad, model, layer, reshape)


def layer_forward(
    model: nn.Module, images: Tensor, target: Any, layer: nn.Module, reshape: Reshape | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward pass without gradients: (logits, target (B,), raw layer output, activation grid (B, K, h, w))."""
    check_reshape(reshape)
    with torch.no_grad(), layer_output(layer) as captured:
        logits = model(images)
    t = targets(logits, target, images.shape[0], images.device)
    raw = captured.output
    return logits, t, raw, to_grid(raw, model, layer, reshape)


def gradient_cam(
    model: nn.Module,
    images: Tensor,
    target: Any,
    layer: nn.Module,
    weights: CamWeights,
    *,
    relu: bool,
    upsample: bool,
    reshape: Reshape | None = None,
    score: Callable[[Tensor, Tensor], Tensor] = class_score,
) -> Tensor:
    """The template for gradient-weighted CAM variants (`score`: what is differentiated, default the target logit)."""
    activation, grad = layer_activation_and_grad(model, images, target, layer, reshape, score)
    return finish(combine(activation, weights(activation, grad)), images.shape[2:], relu=relu, upsample=upsample)


# --------------------------------------------------------------------------- costs


def forward_only(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    """Cost of a method that needs one forward pass per image and no backward pass."""
    return (1, 0)


def per_channel(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    """1 + K forward passes per image; K (the layer's channels) is unknown here: `ASSUMED_CHANNELS`."""
    return (1 + ASSUMED_CHANNELS, 0)


def two_passes(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    """Cost of two forward and two backward passes per image."""
    return (2, 2)


# --------------------------------------------------------------------------- CAM


def gap_linear_head(model: nn.Module, layer: nn.Module, activation: Tensor, logits: Tensor) -> nn.Linear:
    """The nn.Linear `fc` of the model with logits == fc(global average pool of `activation`), checked numerically."""
    k, classes = activation.shape[1], logits.shape[1]
    pooled = activation.mean(dim=(2, 3))
    candidates = [
        m for m in model.modules() if isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (k, classes)
    ]
    tolerance = 1e-4 * (1.0 + float(logits.abs().max()))
    with torch.no_grad():
        for fc in reversed(candidates):  # the last one defined is the usual head
            if torch.allclose(fc(pooled.to(fc.weight.dtype)), logits, rtol=1e-4, atol=tolerance):
                return fc
    raise ValueError(
        f"layer: CAM needs a global-average-pooling + linear head directly after the layer, but the logits of the "
        f"model are not Linear(GAP({layer_name(model, layer)!r})) ({k} channels, {classes} classes; "
        f"{len(candidates)} nn.Linear({k}, {classes}) found); choose the last convolutional stage before the "
        "pooling, or use 'gradcam', which equals CAM up to a scale wherever CAM applies"
    )


def gap_head(model: nn.Module, size: tuple[int, int], layer: Any) -> None:
    """CAM's assumption, checked on a seeded random probe (one forward pass, in eval mode, the global
    RNG untouched): the logits are Linear(GAP(layer)). A model without a first convolution is left
    to the same check on the real batch."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return
    weight = conv.weight
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(1, conv.in_channels, *size, generator=g).to(weight.device, weight.dtype)
    with untouched(model):
        model.eval()
        module = resolve_layer(model, layer if layer is not None else default_layer(model, probe))
        logits, _, _, activation = layer_forward(model, probe, None, module)
        gap_linear_head(model, module, activation, logits)


def _cam_from_pass(bp: Any, model: nn.Module, layer: nn.Module, size: tuple[int, int], kw: Mapping[str, Any]) -> Tensor:
    return cam_map(model, layer, to_grid(bp.activation, model, layer, None), bp.logits, bp.target, size,
                   relu=kw["relu"], upsample=kw["upsample"])


@register("cam", category="cam", cost=forward_only, assumes=gap_head, from_pass=_cam_from_pass)
def cam(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    layer: nn.Module,
    relu: bool = True,
    upsample: bool = True,
    reshape: Reshape | None = None,
) -> Tensor:
    """CAM (Zhou et al. 2016): the target's row of the linear head after global average pooling, sum_k w_k A_k.

    Needs logits = fc(GAP(A)) for an nn.Linear `fc` of the model (checked
    numerically on the batch; otherwise a ValueError suggests 'gradcam'). The
    bias is left out of the map. One forward pass, no backward. On such a model
    CAM = h*w * Grad-CAM.
    """
    logits, t, _, activation = layer_forward(model, images, target, layer, reshape)
    return cam_map(model, layer, activation, logits, t, images.shape[2:], relu=relu, upsample=upsample)


def cam_map(model: nn.Module, layer: nn.Module, activation: Tensor, logits: Tensor, t: Tensor, size: tuple[int, int],
            *, relu: bool, upsample: bool) -> Tensor:
    """CAM from a forward pass's layer activation and logits (shared with `attribute_many`)."""
    fc = gap_linear_head(model, layer, activation, logits)
    weights = fc.weight.detach()[t].to(activation.dtype)
    return finish(combine(activation, weights), size, relu=relu, upsample=upsample)


# --------------------------------------------------------------------------- gradient-weighted variants


def gradient_variant(name: str, weights: CamWeights, doc: str) -> MethodFn:
    """Define and register a CAM variant that differs from Grad-CAM only in its weights
    (the registry reads the parameters from the signature, so it is written once here)."""

    def method(
        model: nn.Module,
        images: Tensor,
        target: Any,
        *,
        layer: nn.Module,
        relu: bool = True,
        upsample: bool = True,
        reshape: Reshape | None = None,
    ) -> Tensor:
        return gradient_cam(model, images, target, layer, weights, relu=relu, upsample=upsample, reshape=reshape)

    def from_pass(bp: Any, model: nn.Module, layer: nn.Module, size: tuple[int, int], kw: Mapping[str, Any]) -> Tensor:
        activation, grad = (to_grid(t, model, layer, None) for t in (bp.activation, bp.grad))
        return finish(combine(activation, weights(activation, grad)), size, relu=kw["relu"], upsample=kw["upsample"])

    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    return register(name, category="cam", cost=one_pass, from_pass=from_pass)(method)


def _gradcam_weights(a: Tensor, g: Tensor) -> Tensor:
    return g.mean(dim=(2, 3))


def _xgradcam_weights(a: Tensor, g: Tensor) -> Tensor:
    return (g * a).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + 1e-7)


def _gradcam_pp_weights(a: Tensor, g: Tensor) -> Tensor:
    # Paper eq. 19 with Y = exp(S): its 2nd and 3rd derivatives are exp(S) g^2 and exp(S) g^3
    # (piecewise-linear network), so exp(S) cancels in alpha; the remaining exp(S) factor of
    # the weights is a positive per-image scale, dropped (as pytorch-grad-cam does).
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + 1e-6)
    return (alpha * g.clamp_min(0)).sum(dim=(2, 3))


gradcam = gradient_variant("gradcam", _gradcam_weights, "Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of dS/dA.")
hirescam = gradient_variant("hirescam", lambda a, g: g, """HiResCAM (Draelos & Carin 2020): sum over channels of dS/dA * A, element-wise.

    Without the ReLU, the map summed over the grid is the first-order Taylor term
    of S at the layer (what Grad-CAM approximates by averaging the gradient).
    """)
xgradcam = gradient_variant(
    "xgradcam", _xgradcam_weights, "XGrad-CAM (Fu et al. 2020): channel weights = sum_ij dS/dA * A / (sum_ij A + 1e-7)."
)
layercam = gradient_variant(
    "layercam", lambda a, g: g.clamp_min(0), "Layer-CAM (Jiang et al. 2021): sum over channels of ReLU(dS/dA) * A, element-wise."
)
gradcam_pp = gradient_variant("gradcam_pp", _gradcam_pp_weights, """Grad-CAM++ (Chattopadhay et al. 2018): weights sum_ij alpha ReLU(g), alpha = g^2 / (2 g^2 + sum_ij A * g^3).

    g = dS/dA of the target logit; alpha is the closed form for exp(S) (the
    paper's eq. 19); the positive per-image factor exp(S) of the weights is
    dropped, as pytorch-grad-cam does (it would overflow for large logits).
    """)


# --------------------------------------------------------------------------- Score-CAM


@register("scorecam", category="cam", forward_only=True, cost=per_channel)
def scorecam(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    layer: nn.Module,
    relu: bool = True,
    upsample: bool = True,
    softmax: str = "classes",
    internal_batch: int = 64,
    progress: bool = False,
    reshape: Reshape | None = None,
) -> Tensor:
    """Score-CAM (Wang et al. 2020): channel weights = the target's score on the input masked by each upsampled map.

    Each map A_k is upsampled bilinearly to the input size and min-max
    normalised per image and channel (a constant map gets weight 0, as in the
    authors' code); the input times that mask is scored. softmax="classes"
    (default, the paper and its official code): the weight is the softmax
    probability of the target for the masked input; "channels" (pytorch-grad-cam):
    the target logits of the K masked inputs, softmax-normalised over channels.
    No baseline score is subtracted (neither the official code nor
    pytorch-grad-cam does). All B*K masked inputs run in chunks of
    `internal_batch` under inference mode; 1 + K forward passes per image (the
    cost assumes K = 512).
    """
    if softmax not in SCORECAM_SOFTMAX:
        raise ValueError(f"softmax={softmax!r} is not valid; choose one of {SCORECAM_SOFTMAX}")
    _, t, _, activation = layer_forward(model, images, target, layer, reshape)
    b, k = activation.shape[:2]
    size = tuple(images.shape[2:])
    scores = activation.new_empty(b * k)
    varies = torch.empty(b * k, dtype=torch.bool, device=activation.device)
    chunks = batched(b * k, internal_batch)
    with torch.inference_mode():
        for chunk in progress_bar(chunks, progress, total=-(-b * k // internal_batch), desc="scorecam"):
            pair = torch.arange(chunk.start, chunk.stop, device=activation.device)
            image, channel = pair // k, pair % k
            mask = upsample_to(activation[image, channel], size)  # (n, H, W)
            low = mask.amin(dim=(1, 2), keepdim=True)
            span = mask.amax(dim=(1, 2), keepdim=True) - low
            mask = (mask - low) / span.clamp_min(torch.finfo(span.dtype).tiny)  # a constant map -> 0
            logits = model(images[image] * mask[:, None].to(images.dtype))
            if softmax == "classes":
                logits = logits.softmax(dim=1)
            scores[chunk] = class_score(logits, t[image]).to(scores.dtype)
            varies[chunk] = span.flatten() > 0
    weights = scores.view(b, k)
    if softmax == "channels":
        weights = weights.softmax(dim=1)
    weights = weights * varies.view(b, k)
    return finish(combine(activation, weights), size, relu=relu, upsample=upsample)


# --------------------------------------------------------------------------- Ablation-CAM


@register("ablationcam", category="cam", forward_only=True, cost=per_channel)
def ablationcam(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    layer: nn.Module,
    relu: bool = True,
    upsample: bool = True,
    internal_batch: int = 64,
    progress: bool = False,
    reshape: Reshape | None = None,
) -> Tensor:
    """Ablation-CAM (Desai & Ramaswamy 2020): channel weights = (S - S_k) / |S|, S_k the score with channel k zeroed.

    S is the target logit. A forward hook zeroes one channel of the layer's
    output per element of a batch of (image, channel) pairs; all B*K pairs run
    in chunks of `internal_batch` under inference mode (1 + K forward passes per
    image; the cost assumes K = 512). For token layers (or with reshape=) the
    channel is the last dimension of the layer output, zeroed in every token.
    The paper divides by S; |S| gives the same map when S > 0 and keeps
    "larger = more evidence" when the target logit is negative.
    """
    calls: list[None] = []  # the layer's calls in the first pass
    with hooks(layer.register_forward_hook(lambda *_: calls.append(None))):
        logits, t, raw, activation = layer_forward(model, images, target, layer, reshape)
    b, k = activation.shape[:2]
    dim = 1 if raw.dim() == 4 and reshape is None else raw.dim() - 1
    if raw.shape[dim] != k:
        raise ValueError(
            f"reshape: ablationcam zeroes channels along the last dimension of the layer output {tuple(raw.shape)}, "
            f"which must then be the K = {k} channels of the reshaped activation"
        )
    score = class_score(logits, t)
    ablated = torch.empty(b * k, dtype=score.dtype, device=score.device)
    zeroed: dict[str, Tensor] = {}  # the image and the channel zeroed of each element of the current chunk
    # A layer that runs once per forward does not run again: its output is the first pass's (as pytorch-grad-cam
    # does), and only the layers before it run; one that runs more often is computed every time.
    reuse = len(calls) == 1 and not isinstance(layer, torch.jit.ScriptModule)

    def ablate(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        out = raw[zeroed["image"]] if reuse else output.clone()  # indexing copies
        out.movedim(dim, 1)[torch.arange(out.shape[0], device=out.device), zeroed["channel"]] = 0
        return out

    chunks = batched(b * k, internal_batch)
    skipped = forward_replaced(layer, lambda *args, **kwargs: raw) if reuse else contextlib.nullcontext()
    with torch.inference_mode(), hooks(layer.register_forward_hook(ablate)), skipped:
        for chunk in progress_bar(chunks, progress, total=-(-b * k // internal_batch), desc="ablationcam"):
            pair = torch.arange(chunk.start, chunk.stop, device=images.device)
            zeroed["image"], zeroed["channel"] = pair // k, pair % k
            ablated[chunk] = class_score(model(images[zeroed["image"]]), t[zeroed["image"]])
    weights = (score[:, None] - ablated.view(b, k)) / score.abs().clamp_min(torch.finfo(score.dtype).tiny)[:, None]
    return finish(combine(activation, weights.to(activation.dtype)), images.shape[2:], relu=relu, upsample=upsample)


@contextlib.contextmanager
def forward_replaced(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Scope in which `module` runs `forward` instead of its own (its hooks still run); undone on exit."""
    own = module.__dict__.get("forward")  # a forward already set on the instance, kept
    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own  # type: ignore[method-assign]


# --------------------------------------------------------------------------- Eigen-CAM


@register("eigencam", category="cam", cost=forward_only, from_pass=lambda bp, model, layer, size, kw: eigencam_map(
    to_grid(bp.activation, model, layer, None), size, relu=kw["relu"], upsample=kw["upsample"]))
def eigencam(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    layer: nn.Module,
    relu: bool = True,
    upsample: bool = True,
    reshape: Reshape | None = None,
) -> Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): projection of the activation on its first principal component.

    Class-agnostic (the target is only validated). The activation of each image,
    as hw samples of K features, is centred per channel (as pytorch-grad-cam) and
    projected on its first right singular vector. The sign of a principal
    component is arbitrary; it is fixed so the map correlates positively with
    the channel mean of the activation (pytorch-grad-cam keeps whatever sign
    the SVD returns). One forward pass, no backward.
    """
    _, _, _, activation = layer_forward(model, images, target, layer, reshape)
    return eigencam_map(activation, images.shape[2:], relu=relu, upsample=upsample)


def eigencam_map(activation: Tensor, size: tuple[int, int], *, relu: bool, upsample: bool) -> Tensor:
    """Eigen-CAM from a layer activation (shared with `attribute_many`)."""
    b, _, h, w = activation.shape
    samples = activation.flatten(2).transpose(1, 2)  # (B, hw, K)
    samples = samples - samples.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(samples, full_matrices=False)
    projection = (samples @ vh[:, 0, :, None]).squeeze(2)  # (B, hw)
    mean = activation.mean(dim=1).flatten(1)
    agreement = (projection * (mean - mean.mean(dim=1, keepdim=True))).sum(dim=1, keepdim=True)
    projection = torch.where(agreement < 0, -projection, projection)
    return finish(projection.view(b, h, w), size, relu=relu, upsample=upsample)


# --------------------------------------------------------------------------- Guided Grad-CAM


@register("guided_gradcam", category="cam", cost=two_passes, assumes=relu_model("guided_gradcam"))
def guided_gradcam(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    layer: nn.Module,
    relu: bool = True,
    reduce: str | None = "max_abs",
    reshape: Reshape | None = None,
) -> Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation times the upsampled Grad-CAM map.

    The element-wise product of the guided-backprop gradient (B, C, H, W) and the
    Grad-CAM map upsampled to (H, W), reduced over colour channels by `reduce`:
    "max_abs" (default, as saliency), "sum", "abs_sum", or None for the paper's
    (B, C, H, W) image. Always at input resolution (no `upsample` parameter).
    Two forward and two backward passes per image.
    """
    from .gradient import guided_backprop

    heat = gradient_cam(model, images, target, layer, _gradcam_weights, relu=relu, upsample=True, reshape=reshape)
    guided = guided_backprop(model, images, target, reduce=None)
    return reduce_channels(guided * heat[:, None].to(guided.dtype), reduce)
