"""The method registry and the one public entry point, `attribute`.

A method is a function ``fn(model, images, target, *, <params>)`` registered
with `register`. Its keyword-only parameters with defaults are its `defaults`;
a keyword-only ``layer`` (no default) makes it a layer method and a
keyword-only ``contrast`` a contrastive one. `attribute` validates everything
shared (images, target, layer, contrast, parameter names and shared values),
runs the method inside `untouched(model)` and checks what it returns.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks as C
from ._core import REDUCE_CHOICES, check_baseline, default_layer, resolve_layer, targets, untouched

CATEGORIES = ("gradient", "cam", "perturbation", "contrastive", "baseline")

CostFn = Callable[[Mapping[str, Any], tuple[int, int]], tuple[int, int]]
MethodFn = Callable[..., Tensor]
# (model, (H, W), layer or None) -> None: raises ValueError when the method cannot explain this model,
# warns when its result would silently mean something else.
ModelCheck = Callable[[nn.Module, tuple[int, int], Any], None]
# (pass, model, layer module or None, (H, W), parameters) -> maps: the method's map from the forward and backward
# pass that several methods share (`xai_methods.shared`: its `bp` has inputs, input_grad, activation, grad, logits
# and target), by the same operations on the same numbers as the method's own call.
PassFn = Callable[[Any, nn.Module, Any, tuple[int, int], Mapping[str, Any]], Any]


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of the project needs to know about a method."""

    name: str
    category: str  # one of CATEGORIES
    fn: MethodFn
    defaults: Mapping[str, Any]  # read-only: parameter name -> default value
    needs_layer: bool
    needs_contrast: bool
    cost: CostFn  # (params, (H, W)) -> (forward passes, backward passes) per image
    summary: str  # one line
    checks: Mapping[str, C.Check]  # parameter -> check, beyond SHARED_CHECKS
    assumes: ModelCheck | None = None  # what the method assumes of the model, checked by `check`
    forward_only: bool = False  # no backward pass: may run its forward passes at a lower `precision`
    from_pass: PassFn | None = None  # its map from a shared pass, when it can share one (`xai_methods.shared`)

    def passes(self, size: tuple[int, int], **params: Any) -> tuple[int, int]:
        """(forward, backward) passes per image of size (H, W) with `params` over the defaults."""
        _check_params(self, params, C.Context(size=tuple(size)))
        return self.cost({**self.defaults, **params}, tuple(size))


_REGISTRY: dict[str, MethodSpec] = {}
# the modules whose methods register themselves, imported at the registry's first lookup
MODULES = ("baselines", "cam", "contrastive", "deeplift", "gradient", "perturbation", "perturbation_opt")


def _registered() -> dict[str, MethodSpec]:
    """The registry, with every module of `MODULES` imported (so registered) first."""
    for module in MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return _REGISTRY


def register(
    name: str, *, category: str, cost: CostFn, checks: Mapping[str, C.Check] | None = None, summary: str | None = None,
    assumes: ModelCheck | None = None, forward_only: bool = False, from_pass: PassFn | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator that registers ``fn(model, images, target, *, ...)`` under `name`.

    `checks`: how the method's own parameters are validated (see `_checks`), run by `check`
    before any work; parameters of `SHARED_CHECKS` are checked without being listed.
    `assumes`: a check of what the method assumes of the model (its activations, its head),
    also run by `check`: an error when the method cannot explain the model, a warning when
    the map would silently mean something else.
    `summary` defaults to the first line of the function's docstring.
    `forward_only`: the method runs forward passes only; it gets a `precision` parameter ("float32", or
    autocast to "bfloat16" / "float16" for its forward passes), which `attribute` applies.
    `from_pass`: the method's map from the pass several methods share (`PassFn`); with it, `attribute_many`
    and a study compute the method in that one pass beside the others.
    """
    if category not in CATEGORIES:
        raise ValueError(f"category={category!r} is not valid; choose one of {CATEGORIES}")

    def decorate(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        params = list(inspect.signature(fn).parameters.values())
        positional = [p.name for p in params if p.kind is not p.KEYWORD_ONLY]
        if positional != ["model", "images", "target"]:
            raise TypeError(f"{fn.__qualname__} must take (model, images, target, *, ...), got {positional}")
        keyword = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        defaults = {k: v for k, v in keyword.items() if k not in ("layer", "contrast")}
        if forward_only:
            defaults["precision"] = "float32"
        missing = [k for k, v in defaults.items() if v is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"{fn.__qualname__}: parameters {missing} need defaults")
        unknown = set(checks or {}) - set(defaults)
        if unknown:
            raise TypeError(f"{fn.__qualname__}: checks for parameters it does not have: {sorted(unknown)}")
        line = summary or (inspect.getdoc(fn) or name).splitlines()[0]
        _REGISTRY[name] = MethodSpec(
            name=name,
            category=category,
            fn=fn,
            defaults=MappingProxyType(defaults),
            needs_layer="layer" in keyword,
            needs_contrast="contrast" in keyword,
            cost=cost,
            summary=line,
            checks=MappingProxyType(dict(checks or {})),
            assumes=assumes,
            forward_only=forward_only,
            from_pass=from_pass,
        )
        return fn

    return decorate


def available() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_registered())


def of_category(category: str) -> list[str]:
    """The methods of one category, in the order they were registered (e.g. the baseline maps)."""
    return [name for name, s in _registered().items() if s.category == category]


def spec(name: str) -> MethodSpec:
    """The `MethodSpec` of method `name` (a registered method, or a peer's: `captum:CLASS`... `peers`)."""
    if isinstance(name, str) and ":" in name:
        return _peer(name)
    try:
        return _registered()[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(available())} (or a peer's: "
                         "captum:CLASS, gradcam:CLASS, zennit:COMPOSITE, package.module:function)") from None


@functools.lru_cache(maxsize=None)
def _peer(name: str) -> MethodSpec:
    """The `MethodSpec` of a peer's method (`peers.resolve`): category "peer", one forward and one backward pass."""
    from . import peers

    found = peers.resolve(name)
    return MethodSpec(name=name, category="peer", fn=found["fn"], defaults=found["defaults"],
                      needs_layer=found["needs_layer"], needs_contrast=False, cost=lambda p, s: (1, 1),
                      summary=f"{name} (a peer's method, run through its own library)", checks=found["checks"])


# --------------------------------------------------------------------------- validation


def _check_reduce(name: str, value: Any, ctx: C.Context) -> None:
    if value not in REDUCE_CHOICES:
        raise ValueError(f"reduce={value!r} is not valid; choose one of {REDUCE_CHOICES}")


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def precision(device: torch.device, name: str) -> Any:
    """The autocast of a forward-only method's forward passes at precision `name` (float32: none)."""
    if PRECISIONS[name] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[name])


# Shared parameter names are checked the same way in every method that has them; a method's
# own table (`register(checks=...)`) adds its other parameters or overrides these.
SHARED_CHECKS: dict[str, C.Check] = {
    "reduce": _check_reduce,
    "upsample": C.boolean,
    "relu": C.boolean,
    "progress": C.boolean,
    "internal_batch": C.positive_int,
    "steps": C.positive_int,
    "samples": C.positive_int,
    "seed": C.seed,
    "baseline": check_baseline,
    "report": C.callable_or_none,
    "precision": C.one_of(*PRECISIONS),
}


def _check_params(s: Any, params: Mapping[str, Any], ctx: C.Context | None = None) -> None:
    """Unknown names, then every value (given or default) against the shared and the spec's own checks;
    `s` is a method's or a metric's spec (its name, defaults and checks)."""
    for key in params:
        if key not in s.defaults:
            valid = ", ".join(s.defaults) or "none"
            raise TypeError(f"{s.name}() got an unknown parameter {key!r}; valid parameters: {valid}")
    merged = {**s.defaults, **params}
    ctx = ctx or C.Context(size=(0, 0))
    ctx = C.Context(size=ctx.size, model=ctx.model, params=merged)
    C.run({**{k: v for k, v in SHARED_CHECKS.items() if k in s.defaults}, **s.checks}, merged, ctx)


def _check_images(images: Any) -> None:
    expected = "a float tensor of shape (B, C, H, W)"
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be {expected}, got {type(images).__name__}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be {expected}, got dtype {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images must be {expected}, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image, got an empty batch")


def _check_result(s: MethodSpec, out: Any, images: Tensor, params: Mapping[str, Any]) -> Tensor:
    b, c, h, w = images.shape
    if params.get("reduce", "") is None:
        expected: tuple[int | None, ...] = (b, c, h, w)
    elif params.get("upsample", True) is False:
        expected = (b, None, None)
    else:
        expected = (b, h, w)
    ok = (
        isinstance(out, Tensor)
        and out.dim() == len(expected)
        and all(e is None or e == n for e, n in zip(expected, out.shape))
        and out.device == images.device
        and out.dtype.is_floating_point
    )
    if not ok:
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, Tensor) else type(out).__name__
        raise RuntimeError(f"method {s.name!r} returned {got}; expected shape {expected} on {images.device}")
    return out.detach().to(torch.float32)


# --------------------------------------------------------------------------- entry point


def check(
    name: str, model: nn.Module, size: tuple[int, int], /, layer: str | nn.Module | None = None, **params: Any
) -> tuple[int, int]:
    """Validate a call of method `name` on images of `size` (H, W) without running it:
    parameter names and values, and the layer. Returns (forward, backward) passes per
    image. Pipelines call it to refuse a bad study before any work starts."""
    s = spec(name)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_params(s, params, C.Context(size=tuple(size), model=model))
    if layer is not None and not s.needs_layer:
        raise TypeError(f"{name}() takes no layer (it works on the input); pass layer=None, got layer={layer!r}")
    if layer is not None:
        resolve_layer(model, layer)
    if s.assumes is not None:
        s.assumes(model, tuple(size), layer)
    return s.cost({**s.defaults, **params}, tuple(size))


def attribute(
    name: str,
    model: nn.Module,
    images: Tensor,
    target: int | Tensor | list[int] | None = None,
    layer: str | nn.Module | None = None,
    contrast: int | Tensor | list[int] | None = None,
    **params: Any,
) -> Tensor:
    """Attribution maps of method `name` for `images` (B, C, H, W), already normalised.

    target: class explained per image (int, or (B,) indices); None = top-1 prediction.
    layer: dotted module name or module, for layer methods; None = `default_layer`.
    contrast: class (B,) to contrast against, for contrastive methods only.
    params: method parameters (see ``spec(name).defaults``).

    Returns a detached float32 tensor (B, H, W) on ``images.device`` (B, C, H, W
    with ``reduce=None``; the layer grid with ``upsample=False``), larger =
    more evidence for the target, not rescaled. The model is left as found
    (mode, requires_grad, in-place flags, hooks). Attribution is meant for
    eval mode: in train mode the method's forward passes update BatchNorm
    running statistics and batch statistics couple the images of a batch.
    """
    s = spec(name)
    _check_images(images)
    check(name, model, tuple(images.shape[-2:]), layer, **params)
    if contrast is not None and not s.needs_contrast:
        raise TypeError(f"{name}() is not contrastive and takes no contrast class; pass contrast=None")
    batch, device = images.shape[0], images.device
    if target is not None:
        targets(None, target, batch, device)  # type and shape now; class range after the forward pass
    if contrast is not None:
        targets(None, contrast, batch, device, name="contrast")

    kwargs = {**s.defaults, **params}
    autocast = precision(images.device, kwargs.pop("precision", "float32"))
    with untouched(model), autocast:
        extra: dict[str, Any] = {}
        if s.needs_layer:
            extra["layer"] = resolve_layer(model, layer if layer is not None else default_layer(model, images))
        if s.needs_contrast:
            extra["contrast"] = contrast
        out = s.fn(model, images, target, **kwargs, **extra)
    return _check_result(s, out.float() if isinstance(out, Tensor) else out, images, kwargs)
