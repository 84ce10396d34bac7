"""Several methods from one pass: the methods that need the same forward and backward pass on the
same images share it.

``saliency`` and ``input_x_gradient`` need the gradient w.r.t. the input; ``gradcam``,
``gradcam_pp``, ``hirescam``, ``layercam`` and ``xgradcam`` the activation of a layer and the
gradient w.r.t. it; ``cam`` and ``eigencam`` only the activation (and the logits). One forward
pass with the layer captured and one backward pass that yields both gradients serve them all;
each map is bit-identical to its method's own call (the same operations on the same numbers).
Each of them declares its map from the shared pass where it is registered (``from_pass``), so a new
method joins the shared pass with one argument. Other methods are computed by `attribute`, one after
the other.

>>> maps = xm.attribute_many(["saliency", "gradcam", "gradcam_pp", "occlusion"], model, images,
...                          target=labels, params={"occlusion": {"window": 8}})
>>> maps["gradcam"]                     # the same tensor as xm.attribute("gradcam", ...)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ._core import backprop, default_layer, resolve_layer, targets, untouched
from ._registry import _check_images, _check_result, attribute, check, spec


def shares_pass(name: str, params: Mapping[str, Any]) -> bool:
    """Whether `name` with `params` is computed from the shared pass: it declared its form there when it was
    registered (`register(..., from_pass=...)`), and no custom `reshape` is given."""
    return spec(name).from_pass is not None and params.get("reshape") is None


def _one_pass(names: list[str], model: nn.Module, images: Tensor, target: Any, layer: Any,
              params: Mapping[str, Mapping[str, Any]]) -> dict[str, Tensor]:
    """The maps of `names` (all sharing a pass, layer methods on `layer`) from one forward and one backward."""
    size = tuple(images.shape[2:])
    with untouched(model):
        module = None
        if any(spec(n).needs_layer for n in names):
            module = resolve_layer(model, layer if layer is not None else default_layer(model, images))
        inputs = any(not spec(n).needs_layer for n in names)  # the input's gradient
        bp = backprop(model, images, target, layer=module, both=inputs and module is not None)
        if module is None:  # the input's gradient only
            bp = bp._replace(input_grad=bp.grad)
        out = {}
        for n in names:
            kw = {**spec(n).defaults, **params.get(n, {})}
            out[n] = _check_result(spec(n), spec(n).from_pass(bp, model, module, size, kw), images, kw)
    return out


def attribute_many(
    methods: Sequence[str],
    model: nn.Module,
    images: Tensor,
    target: int | Tensor | list[int] | None = None,
    layer: str | nn.Module | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    contrast: int | Tensor | list[int] | None = None,
) -> dict[str, Tensor]:
    """``{name: maps}`` for each of `methods`, as `attribute` gives them, sharing passes where they can.

    `layer`: for the layer methods (a method's own ``params[name]["layer"]`` overrides it; each distinct
    layer is one shared pass). `params`: per method, its parameters. `contrast`: for contrastive
    methods. Every call is validated before any work, as `attribute` does.
    """
    params = {m: dict(p) for m, p in (params or {}).items()}
    unknown = set(params) - set(methods)
    if unknown:
        raise ValueError(f"params given for {sorted(unknown)}, which are not among methods {list(methods)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct, got {list(methods)}")
    _check_images(images)
    layers = {m: params[m].pop("layer", layer) if m in params else layer for m in methods}
    for m in methods:
        check(m, model, tuple(images.shape[-2:]), layers[m] if spec(m).needs_layer else None, **params.get(m, {}))
    if target is not None:
        targets(None, target, images.shape[0], images.device)
    shared = [m for m in methods if shares_pass(m, params.get(m, {}))]
    groups: dict[Any, list[str]] = {}
    for m in shared:  # input-gradient methods join the first layer's pass (or make their own)
        key = layers[m] if spec(m).needs_layer else next((layers[n] for n in shared if spec(n).needs_layer), None)
        groups.setdefault(id(key) if isinstance(key, nn.Module) else key, []).append(m)
    out: dict[str, Tensor] = {}
    for names in groups.values():
        first_layer = next((layers[n] for n in names if spec(n).needs_layer), None)
        out.update(_one_pass(names, model, images, target, first_layer, params))
    for m in methods:
        if m not in out:
            extra = {"layer": layers[m]} if spec(m).needs_layer else {}
            if spec(m).needs_contrast:
                extra["contrast"] = contrast
            out[m] = attribute(m, model, images, target, **extra, **params.get(m, {}))
    return {m: out[m] for m in methods}
