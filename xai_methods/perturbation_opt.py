"""Optimisation-based perturbation methods: a mask is learnt by gradient descent.

- `meaningful_perturbation` (Fong & Vedaldi 2017): the smallest, smoothest region
  whose deletion (blur, constant or noise) destroys the target probability.
- `extremal_perturbation` (Fong, Patrick & Vedaldi 2019): smooth masks of a fixed
  area (ranking constraint) that preserve (or delete) the target logit the most.

Both optimise the masks of all images of the batch together: every mask's loss
depends only on its own image, so one optimiser over the stacked masks with the
losses summed is exact (batched == per image). Only the masks need gradients
(`untouched` has turned off the parameters'). Forward/backward passes run in
chunks of `internal_batch` inputs. A mask stops early once its loss has
changed by less than `tol` (relative) over the last `patience` steps; a
converged mask is frozen, so the others carry on unaffected.

Since a method returns only the maps, the optimisation's outcome is handed to
an optional ``report`` callable, called once with a dict of per-image tensors
(see `OptimisationReport` and each method's docstring)::

    info = {}
    maps = xm.attribute("meaningful_perturbation", model, x, report=info.update)
    info["loss"], info["steps"], info["converged"], info["score"]
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as C
from ._core import (
    batched,
    forward_logits,
    gaussian_blur,
    grad_rows,
    hooks,
    progress_bar,
    resolve_baseline,
    resolve_layer,
    seeded_rng,
    targets,
    upsample_to,
)
from ._registry import register
from .perturbation import target_score


# --------------------------------------------------------------------------- shared optimiser


class OptimisationReport(NamedTuple):
    """Outcome per optimised mask (row): all tensors (N,) on the images' device."""

    loss: Tensor  # float: the loss at the last step the mask took
    steps: Tensor  # long: steps run
    converged: Tensor  # bool: stopped early by the tol/patience rule


def optimise(
    params: Tensor,
    objective: Callable[[Tensor, Tensor, int], Tensor],
    *,
    steps: int,
    lr: float,
    method: str,
    tol: float,
    patience: int,
    chunk: int,
    progress: bool = False,
    desc: str = "",
) -> tuple[Tensor, OptimisationReport]:
    """Minimise ``objective(params[i], i, step)`` (a loss per row, rows independent) over the rows
    of `params`, clamping to [0, 1] after each step.

    method "adam" (``torch.optim.Adam``) or "sgd" (``torch.optim.SGD``, momentum 0.9 with
    dampening 0.9, as TorchRay). Gradients are taken `chunk` rows at a time. A row whose loss
    range over the last `patience` + 1 steps is below `tol` times its current |loss| is frozen
    (tol=0 never stops): it gets no gradient and keeps its value.
    """
    # Normal tensors even when the caller is in inference mode (the state is updated in place).
    with torch.inference_mode(False):
        p = params.detach().clone()
        n = p.shape[0]
        opt = (torch.optim.Adam([p], lr=lr) if method == "adam"
               else torch.optim.SGD([p], lr=lr, momentum=0.9, dampening=0.9))
        active = torch.ones(n, dtype=torch.bool, device=p.device)
        converged = torch.zeros_like(active)
        steps_run = torch.zeros(n, dtype=torch.long, device=p.device)
        last = torch.full((n,), math.nan, dtype=p.dtype, device=p.device)
        history: deque[Tensor] = deque(maxlen=patience + 1)
        for step in progress_bar(range(steps), progress, total=steps, desc=desc):
            idx = active.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            p.grad, (loss,) = grad_rows(lambda leaf, i: (objective(leaf, i, step),), p, idx, chunk)
            last[idx] = loss.to(p.dtype)
            frozen = p[~active].clone()
            with torch.no_grad():
                opt.step()  # frozen rows have zero gradient but momentum: they are put back below
                p[~active] = frozen
                p.clamp_(0.0, 1.0)
            steps_run[idx] += 1
            history.append(last.clone())
            if tol > 0 and len(history) == history.maxlen:
                window = torch.stack(list(history))
                spread = window.amax(0) - window.amin(0)
                done = active & (spread <= tol * last.abs())
                converged |= done
                active &= ~done
    return p, OptimisationReport(loss=last, steps=steps_run, converged=converged)


#: the parameters both methods share
OPTIMISER_CHECKS: dict[str, C.Check] = {
    "lr": C.number(0.0, low_open=True), "tol": C.number(0.0), "patience": C.positive_int,
}


def _prepare(model: nn.Module, images: Tensor, target: Any, internal_batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Normal (not inference-mode) copies of the images, the target classes and the logits."""
    logits = forward_logits(model, images.detach(), internal_batch)
    with torch.inference_mode(False):
        x = images.detach().clone()
        t = targets(logits, target, images.shape[0], images.device).clone()
        logits = logits.clone()
    return x, t, logits


# --------------------------------------------------------------------------- meaningful perturbation


def total_variation(m: Tensor, beta: float) -> Tensor:
    """Per-mask mean of |vertical differences|^beta plus mean of |horizontal differences|^beta of (n, h, w)."""
    dy = (m[:, 1:, :] - m[:, :-1, :]).abs().pow(beta).flatten(1)
    dx = (m[:, :, 1:] - m[:, :, :-1]).abs().pow(beta).flatten(1)
    zero = m.new_zeros(m.shape[0])
    return (dy.mean(1) if dy.shape[1] else zero) + (dx.mean(1) if dx.shape[1] else zero)


def _meaningful_cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    return (params["steps"] + 2, params["steps"])


@register("meaningful_perturbation", category="perturbation", cost=_meaningful_cost, checks={
    **OPTIMISER_CHECKS, "mask_size": C.optional(C.positive_int), "perturbation": C.one_of("blur", "constant", "noise"),
    "lambda_l1": C.number(0.0), "lambda_tv": C.number(0.0), "tv_beta": C.number(1.0), "jitter": C.int_at_least(0),
})
def meaningful_perturbation(
    model: nn.Module, images: Tensor, target: Any, *, steps: int = 300, lr: float = 0.1, mask_size: int | None = None,
    perturbation: str = "blur", lambda_l1: float = 1.0, lambda_tv: float = 1.0, tv_beta: float = 3.0, jitter: int = 0,
    tol: float = 1e-4, patience: int = 20, seed: int | None = 0, report: Callable[[dict], Any] | None = None,
    internal_batch: int = 32, progress: bool = False,
) -> Tensor:
    """Meaningful perturbation (Fong & Vedaldi 2017): smallest smooth deletion mask that destroys the target probability.

    A mask m (1 keeps, 0 deletes) of `mask_size` x `mask_size` (default
    max(2, min(H, W) // 8): 28 for 224) is upsampled bilinearly and the model
    sees m * x + (1 - m) * x0, x0 from `perturbation`: "blur" (default,
    Gaussian sigma 10 * min(H, W) / 224), "constant" (0.0, the normalisation
    mean) or "noise" (fixed N(0, 1) noise drawn with `seed`). Adam (`lr` 0.1,
    `steps` 300) minimises the paper's objective
    lambda_l1 * mean|1 - m| + lambda_tv * (mean |dm/dy|^tv_beta + mean |dm/dx|^tv_beta)
    + p(target | perturbed image), clamping m to [0, 1]. Deliberate choices:
    the terms are means over the mask (the paper sums), so the weights do not
    depend on its size, and lambda_l1 = 1 makes deleting the whole image cost
    as much as destroying the probability (lambda_tv 1, tv_beta 3 as the
    paper); the mask starts at m = 0 (all deleted) and the L1 term restores
    what the target does not need: started from m = 1, a confident
    prediction (p ~ 1, vanishing softmax gradient) never moves the mask.
    `jitter` > 0 rolls the perturbed image by a random shift of up to that
    many pixels at each step (seeded), against adversarial masks. A mask
    stops when its loss moved less than `tol` (relative) over `patience`
    steps. Map: 1 - m upsampled (large = deleted = evidence). `report`, if
    given, is called with {"loss", "steps", "converged", "score" (target
    probability with the final mask), "original" (target probability of the
    image)}, each a (B,) tensor.
    """
    b, c, h, w = images.shape
    size = max(2, min(h, w) // 8) if mask_size is None else mask_size
    x, t, logits = _prepare(model, images, target, internal_batch)
    g = seeded_rng(seed)
    with torch.inference_mode(False):
        x0 = _deleted(x, perturbation, g)
        shifts = torch.randint(-jitter, jitter + 1, (steps, 2), generator=g).tolist()

    def perturbed(m: Tensor, i: Tensor) -> Tensor:
        up = upsample_to(m, (h, w))[:, None]
        return x[i] * up + x0[i] * (1 - up)

    def objective(m: Tensor, i: Tensor, step: int) -> Tensor:
        inputs = perturbed(m, i)
        if jitter:
            inputs = torch.roll(inputs, shifts=shifts[step], dims=(2, 3))
        prob = target_score(model(inputs), t[i], "probability")
        area = (1 - m).abs().flatten(1).mean(1)
        return lambda_l1 * area + lambda_tv * total_variation(m, tv_beta) + prob

    start = torch.zeros(b, size, size, dtype=x.dtype, device=x.device)  # everything deleted, see the docstring
    masks, info = optimise(start, objective, steps=steps, lr=lr, method="adam", tol=tol, patience=patience,
                           chunk=internal_batch, progress=progress, desc="meaningful_perturbation")
    if report is not None:
        with torch.inference_mode():
            final = torch.cat([target_score(model(perturbed(masks[part], torch.arange(b)[part].to(x.device))), t[part],
                                            "probability") for part in batched(b, internal_batch)])
        report({**info._asdict(), "score": final, "original": target_score(logits, t, "probability")})
    return 1 - upsample_to(masks, (h, w))


def _deleted(x: Tensor, perturbation: str, g: torch.Generator) -> Tensor:
    """What a deleted pixel shows: fixed N(0, 1) noise drawn from `g`, or the shared baselines ("blur" is the
    project's one blur, "constant" the normalisation mean)."""
    if perturbation == "noise":
        return torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    return resolve_baseline(x, 0.0 if perturbation == "constant" else perturbation).expand_as(x)


# --------------------------------------------------------------------------- extremal perturbation


class SmoothMask:
    """Smooth masks from low-resolution parameters (Fong, Patrick & Vedaldi 2019, section 3.2).

    Parameters sit on a grid every `step` pixels (at the cell centres). The
    mask at pixel u is the smooth max, over the parameters of the cells within
    1 + ceil(sigma / step) cells of u's cell, of p_j * k(|u - c_j| / sigma),
    with the kernel k(z) = exp(-2 max(z - 1/2, 0)^2) (flat top, Gaussian
    fall-off) and the smooth max smax(v) = sum_j v_j softmax(20 v)_j
    (temperature 1/20, as TorchRay's); with parameters in [0, 1] it lies in
    [0, 1]. Parameters outside the grid count as 0.

    As in TorchRay the mask is generated with a margin of round(sigma) pixels
    around the image (`full`, shape (H + 2 margin, W + 2 margin)) and the area
    constraint applies to it: without the margin the border parameters, which
    reach fewer pixels, would feel a weaker area penalty and win by default.
    Unlike TorchRay, the smooth max is evaluated every `stride` pixels
    (default max(1, step // 2)) and bilinearly interpolated in between: the
    mask is smooth at the scale of sigma, and at 224 x 224 this is 9x cheaper
    than every pixel (which costs more than a ResNet-18 forward and backward).
    """

    coldness = 20.0

    def __init__(
        self, size: tuple[int, int], step: int, sigma: float, device: torch.device, dtype: torch.dtype,
        stride: int | None = None,
    ) -> None:
        h, w = size
        self.size = size
        self.margin = round(sigma)
        self.stride = stride = max(1, step // 2) if stride is None else stride
        self.grid = (math.ceil(h / step), math.ceil(w / step))
        self.radius = radius = 1 + math.ceil(sigma / step)
        offsets = torch.arange(-radius, radius + 1, device=device)
        self.pads, self.cells, self.samples = [], [], []

        def axis(length: int, cells: int) -> Tensor:
            full = length + 2 * self.margin
            n = math.ceil((full - 1) / stride) + 1  # samples every `stride` pixels, covering the full length
            self.samples.append(n)
            pos = torch.arange(n, device=device) * stride - self.margin
            cell = torch.div(pos, step, rounding_mode="floor")
            first, last = int(cell[0]), int(cell[-1])
            # zero-pad the parameters so that unfold's output o holds the neighbours of cell first + o
            self.pads.append((radius - first, last + radius + 1 - cells))
            self.cells.append(cell - first)
            centre = (cell[:, None] + offsets) * step + (step - 1) / 2
            return pos[:, None].to(dtype) - centre.to(dtype)  # (n, K) offset to each neighbour

        dy, dx = axis(h, self.grid[0]), axis(w, self.grid[1])
        k = len(offsets)
        dist = torch.sqrt(dy.T[:, None, :, None] ** 2 + dx.T[None, :, None, :] ** 2)  # (K, K, ny, nx)
        self.kernel = torch.exp(-2 * (dist / sigma - 0.5).clamp_min(0) ** 2).reshape(k * k, len(dy), len(dx))

    def sampled(self, params: Tensor) -> Tensor:
        """(n, gh, gw) parameters -> the mask at the sample points (n, ny, nx), every `stride` pixels from -margin."""
        (ylo, yhi), (xlo, xhi) = self.pads
        padded = F.pad(params[:, None], (xlo, xhi, ylo, yhi))
        k = 2 * self.radius + 1
        near = F.unfold(padded, (k, k))  # (n, K*K, cells): the neighbours of every cell
        near = near.view(params.shape[0], k * k, padded.shape[2] - k + 1, padded.shape[3] - k + 1)
        v = near.index_select(2, self.cells[0]).index_select(3, self.cells[1]) * self.kernel  # (n, K*K, ny, nx)
        # A convex combination of values in [0, 1], so no clamp is needed (a clamp would stop the
        # gradient of a mask sitting exactly at 0 or 1).
        return (v * torch.softmax(self.coldness * v, 1)).sum(1)

    def full(self, params: Tensor) -> Tensor:
        """(n, gh, gw) parameters -> (n, H + 2 margin, W + 2 margin) masks in [0, 1]."""
        m = self.sampled(params)
        if self.stride > 1:
            ny, nx = self.samples
            size = ((ny - 1) * self.stride + 1, (nx - 1) * self.stride + 1)
            m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        h, w = self.size
        return m[:, : h + 2 * self.margin, : w + 2 * self.margin]

    def crop(self, full: Tensor) -> Tensor:
        """The image part (n, H, W) of a full mask."""
        m = self.margin
        return full[:, m : m + self.size[0], m : m + self.size[1]]

    def __call__(self, params: Tensor) -> Tensor:
        """(n, gh, gw) parameters -> (n, H, W) masks in [0, 1]."""
        return self.crop(self.full(params))


def blur_pyramid(x: Tensor, levels: int, max_blur: float) -> Tensor:
    """(B, L, C, H, W): level l is x blurred with sigma max_blur * (1 - l / (L - 1)) (level L-1 = x)."""
    sigmas = [max_blur * (1 - level / (levels - 1)) for level in range(levels)]
    return torch.stack([gaussian_blur(x, s) for s in sigmas], 1)


def apply_pyramid(pyramid: Tensor, mask: Tensor) -> Tensor:
    """Perturb with (n, H, W) masks in [0, 1] over (n, L, C, H, W) pyramids: 1 = untouched,
    0 = most blurred, linear interpolation between levels."""
    levels = pyramid.shape[1]
    pos = mask[:, None, None] * (levels - 1)  # (n, 1, 1, H, W)
    low = pos.detach().floor().clamp(max=levels - 2)
    frac = pos - low
    index = low.long().expand(-1, 1, pyramid.shape[2], -1, -1)
    y0 = pyramid.gather(1, index)
    y1 = pyramid.gather(1, index + 1)
    return ((1 - frac) * y0 + frac * y1)[:, 0]


def area_loss(masks: Tensor, reference: Tensor) -> Tensor:
    """The ranking loss of the area constraint, mean((sort(m) - r)^2) per row of (n, P) masks against
    (n, P) sorted references, with ties shared: equal mask values all get the mean of the reference
    values of their ranks. (A plain sort breaks ties by position, so from the all-ones start the
    constraint would pull every parameter down but the ones that happen to sort last, which then
    win whatever the reward says.) Same value and gradient as the plain loss when there is no tie."""
    values, order = masks.sort(1)
    new_group = torch.ones_like(values, dtype=torch.long)
    new_group[:, 1:] = (values[:, 1:] != values[:, :-1]).long()
    group = new_group.cumsum(1) - 1  # (n, P): the tie group of each rank
    total = torch.zeros_like(reference).scatter_add_(1, group, reference)
    count = torch.zeros_like(reference).scatter_add_(1, group, torch.ones_like(reference))
    shared = (total / count.clamp_min(1)).gather(1, group)
    return ((values - shared) ** 2).mean(1)


def _areas(area: Any) -> list[float]:
    return [float(a) for a in (area if isinstance(area, (list, tuple)) else [area])]


def _extremal_cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    inputs = len(_areas(params["area"])) * (2 if params["variant"] == "dual" else 1)
    return (params["steps"] * inputs + 1, params["steps"] * inputs)


class SpatialMasks:
    """Extremal masks over pixels: a `SmoothMask` indexes a blur pyramid of the image."""

    def __init__(self, x: Tensor, step: int, sigma: float, levels: int, max_blur: float) -> None:
        h, w = x.shape[-2:]
        with torch.inference_mode(False):
            self.generate = SmoothMask((h, w), step, sigma, x.device, x.dtype)
            self.pyramid = blur_pyramid(x, levels, max_blur)  # (B, L, C, H, W)
        self.size, self.shape = (h, w), self.generate.grid
        self.constrained = (h + 2 * self.generate.margin) * (w + 2 * self.generate.margin)

    def ones(self, area: float) -> int:
        return round(area * self.size[0] * self.size[1])  # a mask zero on the margin covers the fraction `area`

    def masks(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """(the full mask the area constraint sees, the mask applied)."""
        full = self.generate.full(params)
        return full, self.generate.crop(full)

    def inputs(self, kept: Tensor, img: Tensor) -> Tensor:
        return apply_pyramid(self.pyramid[img], kept)

    def scope(self) -> Any:
        return hooks()

    def result(self, masks: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return masks.sum(1), {}


class ChannelMasks:
    """Extremal masks over the channels of a layer: the layer's output is multiplied by the mask."""

    def __init__(self, x: Tensor, module: nn.Module, activations: Tensor, name: str) -> None:
        if activations.dim() != 4:
            raise ValueError(
                f"channels={name!r}: the layer outputs shape {tuple(activations.shape)}; the channel "
                "variant needs a convolutional feature map (B, K, h, w)"
            )
        self.x, self.module, self.activations = x, module, activations
        self.shape = (activations.shape[1],)
        self.constrained = activations.shape[1]
        self.keep: list[Tensor] = []  # the mask the layer's hook applies in the next forward pass

    def ones(self, area: float) -> int:
        return round(area * self.constrained)

    def masks(self, params: Tensor) -> tuple[Tensor, Tensor]:
        return params, params

    def inputs(self, kept: Tensor, img: Tensor) -> Tensor:
        self.keep[:] = [kept]
        return self.x[img]

    def scope(self) -> Any:
        def scale(mod: nn.Module, inputs: Any, out: Tensor) -> Tensor:
            return out * self.keep[0][:, :, None, None].to(out.dtype)

        return hooks(self.module.register_forward_hook(scale))

    def result(self, masks: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        evidence = (masks.sum(1)[:, :, None, None] * self.activations).sum(1)
        return upsample_to(evidence, tuple(self.x.shape[-2:])), {"channels": masks}


@register("extremal_perturbation", category="perturbation", cost=_extremal_cost, checks={
    **OPTIMISER_CHECKS, "area": C.numbers_in(0.0, 1.0, low_open=True),
    "variant": C.one_of("preservation", "deletion", "dual"), "mask_step": C.optional(C.positive_int),
    "mask_sigma": C.optional(C.number(0.0, low_open=True)), "levels": C.int_at_least(2),
    "max_blur": C.optional(C.number(0.0, low_open=True)), "jitter": C.boolean, "channels": C.layer,
})
def extremal_perturbation(
    model: nn.Module, images: Tensor, target: Any, *, area: float | Sequence[float] = 0.1,
    variant: str = "preservation", steps: int = 300, lr: float = 0.01, mask_step: int | None = None,
    mask_sigma: float | None = None, levels: int = 8, max_blur: float | None = None, jitter: bool = True,
    channels: str | None = None, tol: float = 1e-4, patience: int = 20, report: Callable[[dict], Any] | None = None,
    internal_batch: int = 16, progress: bool = False,
) -> Tensor:
    """Extremal perturbation (Fong, Patrick & Vedaldi 2019): smooth fixed-area masks that preserve the target logit most.

    For each `area` a (a float or a list), a smooth mask (`SmoothMask`:
    parameters every `mask_step` pixels (default 7 * min(H, W) / 224),
    smoothing `mask_sigma` (default 3 * mask_step)) is optimised to maximise
    the target logit of the image blurred where the mask is off
    (`variant="preservation"`, default), to minimise it where the mask is on
    ("deletion"), or both ("dual": logit(preserved) - logit(deleted)). The
    blur is a pyramid of `levels` Gaussian blurs up to sigma `max_blur`
    (default 20 * min(H, W) / 224) indexed by the mask. The area is imposed by
    the ranking loss lambda * mean((sort(mask) - r_a)^2), r_a the sorted
    vector with a fraction a of ones; lambda grows from 300 as in TorchRay,
    compressed so that after `steps` it reaches TorchRay's value after 800
    (the paper's steps; default 300 here). SGD with momentum 0.9 (`lr` 0.01)
    from an all-ones parameter grid, clamped to [0, 1]; `jitter` flips the
    image horizontally every other step, on the images for which the model is
    mirror-invariant (checked first: the target's probability on the mirrored
    image within a factor 2; a warning names the others, which go without).
    Deterministic (no seed).
    Map: the sum over areas of the masks (the multi-area summary of TorchRay's
    benchmark), so pixels kept by small areas score highest; with one area it
    is the mask itself. `report` gets {"loss", "steps", "converged", "area"
    (fraction of mask > 0.5), "reward"}, each (B, number of areas).

    Channel attribution (the paper's section on intermediate layers):
    `channels` = the dotted name of a layer. The mask is then one value per
    channel of that layer's output, the perturbation multiplies the output
    by it (a deleted channel is zeroed; no blur, no smoothing) and `area` is
    the fraction of channels kept. The map shows where the kept channels fire:
    sum over areas of sum_k m_k A_k(x), A the layer's activations on the
    image, upsampled bilinearly to (H, W). `report` also gets "channels", the
    masks (B, number of areas, K).
    """
    h, w = images.shape[-2:]
    module = None if channels is None else resolve_layer(model, channels)
    x, t, logits, seen = _prepare_seen(model, images, target, internal_batch, module)
    mirrored = mirror_stable(model, x, t, logits, internal_batch) if jitter and module is None else None
    if module is None:
        problem: SpatialMasks | ChannelMasks = _spatial_masks(x, mask_step, mask_sigma, levels, max_blur)
    else:
        with torch.inference_mode(False):
            problem = ChannelMasks(x, module, torch.cat(seen).clone(), str(channels))
    masks, info, rewards = _extremal_masks(
        model, problem, x, t, _areas(area), variant=variant, steps=steps, lr=lr, jitter=mirrored, tol=tol,
        patience=patience, internal_batch=internal_batch, progress=progress, want_rewards=report is not None,
    )
    out, extra = problem.result(masks)
    if report is not None:
        b, n_areas = masks.shape[:2]
        report({**{k: v.view(b, n_areas) for k, v in info._asdict().items()},
                "area": (masks > 0.5).flatten(2).float().mean(2), "reward": rewards.view(b, n_areas), **extra})
    return out


def _prepare_seen(model: nn.Module, images: Tensor, target: Any, internal_batch: int,
                  module: nn.Module | None) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """`_prepare`'s inputs, targets and logits, and (channel variant) `module`'s activations on the images."""
    seen: list[Tensor] = []
    with hooks() as handles:
        if module is not None:
            handles.append(module.register_forward_hook(lambda mod, inputs, out: seen.append(out.detach())))
        x, t, logits = _prepare(model, images, target, internal_batch)
    return x, t, logits, seen


def _spatial_masks(x: Tensor, mask_step: int | None, mask_sigma: float | None, levels: int,
                   max_blur: float | None) -> SpatialMasks:
    """The spatial variant's masks, their defaults scaled from the paper's 224 pixels to the image's size."""
    scale = min(x.shape[-2:]) / 224.0
    step = max(1, round(7 * scale)) if mask_step is None else mask_step
    sigma = 3.0 * step if mask_sigma is None else float(mask_sigma)
    blur = 20.0 * scale if max_blur is None else float(max_blur)
    return SpatialMasks(x, step, sigma, levels, blur)


def mirror_stable(model: nn.Module, x: Tensor, t: Tensor, logits: Tensor, internal_batch: int) -> Tensor | None:
    """Jitter's assumption, checked on the images at hand: per image, whether the model is mirror-invariant
    for it (the target's probability on the mirrored image within a factor 2 of the original's). Jitter
    stays on for those images only, with a warning naming the others; None when it holds for none."""
    with torch.no_grad():  # a check, not part of any map's graph
        mirrored = forward_logits(model, x.flip(3), internal_batch)
        rows = torch.arange(len(t), device=x.device)
        p, q = logits.softmax(1)[rows, t], mirrored.softmax(1)[rows, t]
    stable = torch.minimum(p, q) >= 0.5 * torch.maximum(p, q)
    if not stable.all():
        worst = int((p - q).abs().argmax())
        warnings.warn(
            f"extremal_perturbation: jitter (mirroring the image every other step) assumes a mirror-invariant model, "
            f"but on {int((~stable).sum())} of {len(t)} images the target's probability changes by more than a factor "
            f"2 when mirrored (image {worst}: {float(p[worst]):.3f} -> {float(q[worst]):.3f}); jitter is off for those "
            "images. Pass jitter=False to turn it off for all", stacklevel=4)
    return stable if stable.any() else None


def _extremal_masks(
    model: nn.Module, problem: SpatialMasks | ChannelMasks, x: Tensor, t: Tensor, areas: list[float], *,
    variant: str, steps: int, lr: float, jitter: Tensor | None, tol: float, patience: int, internal_batch: int,
    progress: bool, want_rewards: bool,
) -> tuple[Tensor, OptimisationReport, Tensor | None]:
    """The optimisation of extremal perturbation: masks (B, areas, *mask shape), the report and,
    when asked, the final rewards (B * areas,). `jitter`: per image (B,), mirror it every other step."""
    b, n_areas = x.shape[0], len(areas)
    with torch.inference_mode(False):
        # Sorted target of the full mask, `ones` ones per area.
        ranks = torch.arange(problem.constrained, device=x.device)
        ones = torch.tensor([problem.ones(a) for a in areas], device=x.device)
        reference_area = (ranks >= problem.constrained - ones[:, None]).to(x.dtype)  # (A, constrained)
    growth = 1.0035 ** (800 / steps)

    def reward(mask: Tensor, img: Tensor, flip: bool) -> Tensor:
        def logit(kept: Tensor) -> Tensor:
            inputs = problem.inputs(kept, img)
            if flip:
                inputs = torch.where(jitter[img].view(-1, 1, 1, 1), inputs.flip(3), inputs)
            return target_score(model(inputs), t[img], "logit")

        if variant == "preservation":
            return logit(mask)
        if variant == "deletion":
            return -logit(1 - mask)
        return logit(mask) - logit(1 - mask)

    def objective(params: Tensor, i: Tensor, step_: int) -> Tensor:
        img, which = i // n_areas, i % n_areas
        full, mask = problem.masks(params)
        regul = area_loss(full.flatten(1), reference_area[which])
        return -reward(mask, img, jitter is not None and step_ % 2 == 0) + 300.0 * growth**step_ * regul

    # Start from the unperturbed image: all kept (preservation, dual, as TorchRay) or nothing deleted
    # (deletion: from TorchRay's all-deleted start, blurred detail has no gradient to come back by).
    initial = 0.0 if variant == "deletion" else 1.0
    start = torch.full((b * n_areas, *problem.shape), initial, dtype=x.dtype, device=x.device)
    per_pass = max(1, internal_batch // (2 if variant == "dual" else 1))
    rewards = None
    with problem.scope():
        params, info = optimise(
            start, objective, steps=steps, lr=lr, method="sgd", tol=tol, patience=patience,
            chunk=per_pass, progress=progress, desc="extremal_perturbation",
        )
        with torch.inference_mode():
            masks = torch.cat([problem.masks(params[part])[1] for part in batched(len(params), internal_batch)])
            if want_rewards:
                img = torch.arange(b, device=x.device).repeat_interleave(n_areas)
                rewards = torch.cat([reward(masks[part], img[part], False) for part in batched(len(masks), per_pass)])
    return masks.view(b, n_areas, *masks.shape[1:]), info, rewards
