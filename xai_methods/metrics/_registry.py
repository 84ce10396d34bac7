"""The metric registry and its entry points, `measure` and `evaluate`.

A metric is ``fn(model, images, maps, target, mask, *, <params>) -> Scores`` registered with
`register`. The registry validates everything shared before any work: images (B, C, H, W),
maps (B, H, W), target, mask (bool (B, H, W), when the metric needs one), the parameters
(with the same `_checks` as the methods). It handles the cases every metric shares: a map
holding NaN/Inf and an empty mask are NaN with their status code, never a silent number,
and the metric runs on the other images only. The model is left exactly as found.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import _checks as C
from .. import variants as V
from .._core import forward_logits, targets, untouched
from .._registry import _check_params as check_params

FAMILIES = ("localisation", "faithfulness", "robustness", "complexity", "audit")

# Why a score is what it is; stored per (method, sample, metric) beside the score.
OK, EMPTY_MASK, NOT_FINITE_MAP, NO_POSITIVE, CONSTANT_MAP, ZERO_MAP, NOT_FINITE_OUTPUT, FAILED_MAP = range(8)
NOT_COMPUTED = -1
STATUS = {
    NOT_COMPUTED: "not computed",
    OK: "scored",
    EMPTY_MASK: "the mask has no pixel: NaN",
    NOT_FINITE_MAP: "the map holds NaN or Inf: NaN",
    NO_POSITIVE: "the map has no positive attribution: NaN",
    CONSTANT_MAP: "the map is constant (no ranking, no maximum)",
    ZERO_MAP: "the map is zero everywhere: NaN",
    NOT_FINITE_OUTPUT: "the model's output is not finite: NaN",
    FAILED_MAP: "the method failed on this image (the study's `failure` says why): NaN, not scored",
}


class Scores(NamedTuple):
    """What a metric measures on a batch."""

    value: Tensor  # (B,) float32, NaN where undefined
    status: Tensor  # (B,) int8: an OK / ... code of `STATUS`
    curve: Tensor | None = None  # (B, points) float32 for curve metrics (deletion, insertion, ROAD)


CostFn = Callable[[Mapping[str, Any], tuple[int, int]], int]
PointsFn = Callable[[Mapping[str, Any]], int]


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """What the rest of the project needs to know about a metric."""

    name: str
    family: str
    fn: Callable[..., Scores]
    defaults: Mapping[str, Any]
    needs_mask: bool
    needs_model: bool  # it runs model passes (faithfulness, robustness)
    needs_method: bool  # it recomputes the method (max_sensitivity)
    higher_is_better: bool
    cost: CostFn  # (params, (H, W)) -> forward passes per image
    points: PointsFn | None  # curve metrics: (params) -> points on the curve; None: no curve
    checks: Mapping[str, C.Check]
    summary: str
    variants: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)  # parameter -> the values `evaluate --variants` tries

    @property
    def curve(self) -> bool:
        return self.points is not None


_REGISTRY: dict[str, MetricSpec] = {}


def register(
    name: str, *, family: str, higher_is_better: bool, needs_mask: bool = False, needs_model: bool = False,
    needs_method: bool = False, cost: CostFn = lambda p, s: 0, points: PointsFn | None = None,
    checks: Mapping[str, C.Check] | None = None, variants: Mapping[str, tuple[Any, ...]] | None = None,
) -> Callable[[Callable[..., Scores]], Callable[..., Scores]]:
    """Decorator registering ``fn(model, images, maps, target, mask, *, ...)`` under `name`; `variants`: the
    parameter values that measure the metric's internal consistency (one parameter changed at a time)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not valid; choose one of {FAMILIES}")

    def decorate(fn: Callable[..., Scores]) -> Callable[..., Scores]:
        if name in _REGISTRY:
            raise ValueError(f"metric {name!r} is already registered")
        params = list(inspect.signature(fn).parameters.values())
        positional = [p.name for p in params if p.kind is not p.KEYWORD_ONLY]
        if positional != ["model", "images", "maps", "target", "mask"]:
            raise TypeError(f"{fn.__qualname__} must take (model, images, maps, target, mask, *, ...)")
        defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        unknown = set(variants or {}) - set(defaults)
        if unknown:
            raise TypeError(f"{name}: variants of {sorted(unknown)}, which are not among its parameters {list(defaults)}")
        _REGISTRY[name] = MetricSpec(
            name=name, family=family, fn=fn, defaults=MappingProxyType(defaults), needs_mask=needs_mask,
            needs_model=needs_model, needs_method=needs_method, higher_is_better=higher_is_better, cost=cost,
            points=points, checks=MappingProxyType(dict(checks or {})),
            summary=(inspect.getdoc(fn) or name).splitlines()[0],
            variants=MappingProxyType({k: tuple(v) for k, v in (variants or {}).items()}),
        )
        return fn

    return decorate


def available() -> list[str]:
    """Names of all registered metrics, sorted."""
    return sorted(_REGISTRY)


def spec(name: str) -> MetricSpec:
    """The `MetricSpec` of metric `name`; of a variant (``deletion[substrate=blur]``, `variants`), its base's
    with the variant's parameters as its defaults."""
    base, overrides = V.parse(name) if isinstance(name, str) else (name, {})
    try:
        s = _REGISTRY[base]
    except (KeyError, TypeError):
        raise ValueError(f"unknown metric {name!r}; available metrics: {', '.join(available())} (and their "
                         "variants, e.g. deletion[substrate=blur])") from None
    unknown = sorted(set(overrides) - set(s.defaults))
    if unknown:
        raise ValueError(f"metric {name!r}: {base} has no parameter {', '.join(unknown)}; valid: {', '.join(s.defaults)}")
    return dataclasses.replace(s, name=name, defaults=MappingProxyType({**s.defaults, **overrides})) if overrides else s


def variants(name: str) -> list[str]:
    """The standard variant names of metric `name` (one registered parameter value changed at a time)."""
    return V.standard(name, {k: list(v) for k, v in spec(name).variants.items()})


def check(name: str, size: tuple[int, int], model: nn.Module | None = None, **params: Any) -> int:
    """Validate a call of metric `name` on images of `size` without running it; returns forward
    passes per image. Pipelines call it to refuse a bad evaluation before any work."""
    s = spec(name)  # a variant's parameters are its defaults: checked with the rest
    check_params(s, params, C.Context(size=tuple(size), model=model))
    return s.cost({**s.defaults, **params}, tuple(size))


def _check_inputs(s: MetricSpec, images: Any, maps: Any, mask: Any) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.dtype.is_floating_point:
        raise ValueError(f"images must be a float tensor (B, C, H, W), got {getattr(images, 'shape', images)!r}")
    b, _, h, w = images.shape
    if not isinstance(maps, Tensor) or tuple(maps.shape) != (b, h, w) or not maps.dtype.is_floating_point:
        raise ValueError(f"maps must be a float tensor ({b}, {h}, {w}) (one map per image, the images' size), "
                         f"got {tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}")
    if s.needs_mask and mask is None:
        raise ValueError(f"{s.name} needs the ground-truth mask: pass mask= (bool, ({b}, {h}, {w}))")
    if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != (b, h, w)
                             or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor ({b}, {h}, {w}), got "
                         f"{(mask.dtype, tuple(mask.shape)) if isinstance(mask, Tensor) else type(mask).__name__}")


def measure(
    name: str, model: nn.Module | None, images: Tensor, maps: Tensor, target: Any = None,
    mask: Tensor | None = None, **params: Any,
) -> Scores:
    """Score `maps` (B, H, W) of `images` (B, C, H, W, normalised) with metric `name`.

    target: the class each map explains (int or (B,)); None = the model's top-1 class (metrics
    that run the model only). mask: bool (B, H, W) ground truth, for the localisation metrics.
    Returns `Scores` (value, status, curve); see `STATUS` for what each code means.
    """
    s = spec(name)
    _check_inputs(s, images, maps, mask)
    if s.needs_model and not isinstance(model, nn.Module):
        raise TypeError(f"{name} runs the model: pass model= (a torch.nn.Module)")
    check(name, tuple(images.shape[-2:]), model, **params)
    b = images.shape[0]
    status = torch.full((b,), OK, dtype=torch.int8, device=images.device)
    status[~torch.isfinite(maps).flatten(1).all(1)] = NOT_FINITE_MAP
    if s.needs_mask:
        status[(status == OK) & ~mask.flatten(1).any(1)] = EMPTY_MASK
    value = torch.full((b,), float("nan"), dtype=torch.float32, device=images.device)
    points = s.points({**s.defaults, **params}) if s.points else None
    curve = torch.full((b, points), float("nan"), device=images.device) if points else None
    todo = (status == OK).nonzero()[:, 0]
    if todo.numel() == 0:
        return Scores(value, status, curve)
    with untouched(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
        t = None
        if s.needs_model:  # the top-1 class needs every image's logits; a given target only the class count
            probe = images[todo] if target is None else images[todo[:1]]
            logits = forward_logits(model, probe.detach(), params.get("internal_batch", 64))
            given = None if target is None else targets(None, target, b, images.device)[todo]
            t = targets(logits if target is None else logits.expand(len(todo), -1), given, len(todo), images.device)
        sub = s.fn(model, images[todo].detach(), maps[todo].detach().float(), t,
                   None if mask is None else mask[todo], **{**s.defaults, **params})
    value[todo], status[todo] = sub.value.float(), sub.status.to(torch.int8)
    if curve is not None and sub.curve is not None:
        curve[todo] = sub.curve.float()
    return Scores(value, status, curve)


def evaluate(
    name: str, model: nn.Module | None, images: Tensor, maps: Tensor, target: Any = None,
    mask: Tensor | None = None, **params: Any,
) -> Tensor:
    """One score per image (B,) float32, NaN where undefined (`measure` also says why)."""
    return measure(name, model, images, maps, target, mask, **params).value
