"""Methods users already have, inside a study: `captum:CLASS`, `gradcam:CLASS` (pytorch-grad-cam), `zennit:COMPOSITE`
and `package.module:function`. A method name with a colon is resolved here into a `MethodSpec`, like a registered
method's: its parameters and their defaults come from the peer's own signature (those a command line can give:
numbers, strings, booleans, None), validated before any work; `peer_version` (the installed package's version) is
one of them, so the store records it and refuses to mix maps of two versions. The registry's `attribute` runs
them: target classes, the model left as found (even when the library would not leave it so), a (B, H, W) map.

    captum:CLASS       captum.attr.CLASS(model) (Layer... classes: (model, layer)).attribute(images, target=, ...),
                       the channels summed (`reduce`), a layer's map upsampled to the input.
    gradcam:CLASS      pytorch_grad_cam.CLASS(model, [layer])(images, targets=...): maps scaled to [0, 1] per image,
                       as pytorch-grad-cam scales them.
    zennit:COMPOSITE   zennit.composites.COMPOSITE(canonizers=...) through zennit.attribution.Gradient, the output's
                       relevance started at the target's logit; the relevance of the input summed over channels.
                       `canonizer`: sequential (merge BatchNorm into the layer before it), resnet, vgg or none.
                       EpsilonGammaBox's bounds default to the model's normalised [0, 1] pixel range.
    pkg.module:fn      fn(model, images, target, **params) -> (B, H, W) maps, its keyword-only defaults the parameters.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from importlib.metadata import PackageNotFoundError, version
from types import MappingProxyType
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PEERS = {"captum": ("captum", "captum"), "gradcam": ("pytorch_grad_cam", "grad-cam"), "zennit": ("zennit", "zennit")}
# parameters the adapter supplies itself, never the user's
SUPPLIED = {"self", "inputs", "input", "input_tensor", "target", "targets", "model", "forward_func", "images",
            "layer", "target_layers", "additional_forward_args", "return_convergence_delta", "attribute_to_layer_input",
            "reshape_transform", "layer_map", "first_map", "zero_params", "canonizers", "attr_output", "create_graph",
            "retain_graph", "kwargs", "args"}


def is_peer(name: str) -> bool:
    return isinstance(name, str) and ":" in name


def _installed(module: str, package: str, name: str) -> str:
    """The package's version, or one line saying what to install."""
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"method {name!r} needs the package {package!r}, which is not installed: pip install {package}")
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _simple(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _defaults(*functions: Callable[..., Any]) -> dict[str, Any]:
    """The parameters of `functions` that a user gives: not supplied by the adapter, with a plain default."""
    out: dict[str, Any] = {}
    for fn in functions:
        for p in inspect.signature(fn).parameters.values():
            if p.name not in SUPPLIED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and _simple(p.default):
                out.setdefault(p.name, p.default)
    return out


def _target(model: nn.Module, images: Tensor, target: Any) -> Tensor:
    from ._core import forward_logits, targets

    logits = forward_logits(model, images, 64) if target is None else None
    return targets(logits, target, images.shape[0], images.device)


def _captum(cls_name: str) -> tuple[Callable[..., Tensor], dict[str, Any], bool]:
    import captum.attr as ca

    cls = getattr(ca, cls_name, None)
    if not (inspect.isclass(cls) and hasattr(cls, "attribute")):
        found = sorted(n for n in dir(ca) if inspect.isclass(getattr(ca, n)) and hasattr(getattr(ca, n), "attribute"))
        raise ValueError(f"captum.attr has no attribution class {cls_name!r}; it has {', '.join(found)}")
    init = set(inspect.signature(cls.__init__).parameters)
    layered = "layer" in init

    def fn(model: nn.Module, images: Tensor, target: Any, *, reduce: str = "sum", layer: Any = None,
           **params: Any) -> Tensor:
        from ._core import reduce_channels

        t = _target(model, images, target)
        made = {k: v for k, v in params.items() if k in init}
        explainer = cls(model, layer, **made) if layered else cls(model, **made)
        out = explainer.attribute(images.detach().clone().requires_grad_(), target=t,
                                  **{k: v for k, v in params.items() if k not in init})
        out = out[0] if isinstance(out, tuple) else out
        if out.dim() == 4 and out.shape[-2:] != images.shape[-2:]:  # a layer's map: its channels, then the input size
            out = F.interpolate(out.sum(1, keepdim=True), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return reduce_channels(out, reduce) if out.dim() == 4 else out

    return fn, {**_defaults(cls.__init__, cls.attribute), "reduce": "sum"}, layered


def _gradcam(cls_name: str) -> tuple[Callable[..., Tensor], dict[str, Any], bool]:
    import pytorch_grad_cam as pgc

    cls = getattr(pgc, cls_name, None)
    if not (inspect.isclass(cls) and "target_layers" in inspect.signature(cls.__init__).parameters):
        found = sorted(n for n in dir(pgc) if inspect.isclass(getattr(pgc, n))
                       and "target_layers" in inspect.signature(getattr(pgc, n).__init__).parameters)
        raise ValueError(f"pytorch_grad_cam has no CAM class {cls_name!r}; it has {', '.join(found)}")
    init = set(inspect.signature(cls.__init__).parameters)

    def fn(model: nn.Module, images: Tensor, target: Any, *, layer: Any = None, **params: Any) -> Tensor:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        t = _target(model, images, target)
        made = {k: v for k, v in params.items() if k in init}
        with cls(model=model, target_layers=[layer], **made) as cam:
            maps = cam(input_tensor=images.detach().clone().requires_grad_(), targets=[ClassifierOutputTarget(int(k)) for k in t],
                       **{k: v for k, v in params.items() if k not in init})
        return torch.as_tensor(maps, dtype=torch.float32, device=images.device)

    return fn, _defaults(cls.__init__, cls.__call__), True


CANONIZERS = ("sequential", "resnet", "vgg", "none")


def _zennit(name: str) -> tuple[Callable[..., Tensor], dict[str, Any], bool]:
    import zennit.composites as zc

    known = {c.__name__: c for c in zc.COMPOSITES.values()}
    cls = known.get(name)
    if cls is None:
        raise ValueError(f"zennit has no composite {name!r}; it has {', '.join(sorted(known))}")
    defaults = {**_defaults(cls.__init__), "canonizer": "sequential"}
    bounded = {"low", "high"} <= set(inspect.signature(cls.__init__).parameters)
    if bounded:
        defaults.update(low=None, high=None)  # None: the model's normalised [0, 1] pixel range

    def fn(model: nn.Module, images: Tensor, target: Any, *, canonizer: str = "sequential", **params: Any) -> Tensor:
        from zennit.attribution import Gradient

        t = _target(model, images, target)
        if bounded:
            params = {**params, **_bounds(model, images, params.get("low"), params.get("high"))}
        composite = cls(canonizers=_canonizers(canonizer), **params)
        with Gradient(model=model, composite=composite) as attributor:
            logits, relevance = attributor(images.detach(), lambda out: F.one_hot(t, out.shape[1]).to(out.dtype) * out)
        return relevance.sum(1)

    return fn, defaults, False


def _canonizers(kind: str) -> list[Any]:
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    return {"sequential": [SequentialMergeBatchNorm()], "resnet": [ResNetCanonizer()], "vgg": [VGGCanonizer()],
            "none": []}[kind]


def _bounds(model: nn.Module, images: Tensor, low: Any, high: Any) -> dict[str, Tensor]:
    """zennit's ZBox bounds: the given numbers, or the model's [0, 1] pixels normalised (per channel)."""
    pre, c = getattr(model, "preprocess", None), images.shape[1]
    mean = torch.tensor(pre.mean if pre else [0.0] * c, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std if pre else [1.0] * c, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    out = {}
    for key, value, pixel in (("low", low, 0.0), ("high", high, 1.0)):
        out[key] = torch.full_like(images, float(value)) if value is not None else ((pixel - mean) / std).expand_as(images)
    return out


def _function(path: str) -> tuple[Callable[..., Tensor], dict[str, Any], bool]:
    module_name, _, fn_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"method {path!r}: cannot import {module_name!r} ({err}); give package.module:function "
                         "of a module on the Python path") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"method {path!r}: {module_name} has no function {fn_name!r}")
    positional = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is not p.KEYWORD_ONLY]
    if len(positional) < 3:
        raise ValueError(f"method {path!r}: the function must take (model, images, target, **params), got ({', '.join(positional)})")
    defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                if p.kind is p.KEYWORD_ONLY and _simple(p.default)}

    def call(model: nn.Module, images: Tensor, target: Any, **params: Any) -> Tensor:
        out = fn(model, images, _target(model, images, target), **params)
        return torch.as_tensor(out, dtype=torch.float32, device=images.device)

    return call, defaults, False


@functools.lru_cache(maxsize=None)
def resolve(name: str) -> dict[str, Any]:
    """What the registry makes a peer method `name`'s `MethodSpec` of: `fn`, `defaults`, `needs_layer`, `checks`
    (ValueError in one line when the package, the class or the function is not there)."""
    kind, _, what = name.partition(":")
    if not what:
        raise ValueError(f"method {name!r}: write captum:CLASS, gradcam:CLASS, zennit:COMPOSITE or package.module:function")
    if kind in PEERS:
        module, package = PEERS[kind]
        installed = _installed(module, package, name)
        fn, defaults, layered = {"captum": _captum, "gradcam": _gradcam, "zennit": _zennit}[kind](what)
    else:
        installed = _installed(kind.split(".")[0], kind.split(".")[0], name)
        fn, defaults, layered = _function(name)

    def run(model: nn.Module, images: Tensor, target: Any, *, peer_version: str = installed, **params: Any) -> Tensor:
        return fn(model, images, target, **params)

    return {"fn": run, "defaults": MappingProxyType({**defaults, "peer_version": installed}), "needs_layer": layered,
            "checks": MappingProxyType({"peer_version": _same_version(installed)})}


def _same_version(installed: str) -> Callable[..., None]:
    def check(name: str, value: Any, ctx: Any) -> None:
        if value != installed:
            raise ValueError(f"peer_version is the installed package's ({installed}), not a parameter; got {value!r}")
    return check
