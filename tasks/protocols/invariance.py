"""Input invariance (Kindermans et al. 2019): a constant shift of the input, compensated in the
first layer's bias, leaves the model's function unchanged; does it leave the map unchanged?

The shift is given in [0, 1] pixel units (Kindermans et al. moved [0, 1] images to [-1, 0]:
``shift = -1``) and becomes ``shift / std`` per channel in the model's normalised input. With
``baseline="shifted"`` the methods that take a baseline get it shifted too (the reference
moves with the input); with ``"zeros"`` both models use the zero input. A method is called
invariant when the relative L1 change of its maps, summed over the images, is at most
`tolerance`. The default 1e-2 sits between float32 rounding (the compensated first layer
adds and removes a large offset: up to 1.1e-3 measured, IG through a random-weight ResNet-18)
and the changes of methods that are not invariant (above 0.5 on the built-in data).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage
import xai_methods as xm
from xai_methods import surgery

from .common import Opened, Stage, UnitReceipt, check_methods, load_inputs, maps_of, open_results, opened
from .specs import InvarianceSpec

SHOWN = 4
VARIANTS = ("original", "shifted")


def shift_of(model: torch.nn.Module, shift: float, device: torch.device) -> torch.Tensor:
    """The pixel shift in the model's normalised input space: shift / std, one value per channel."""
    std = torch.tensor(model.preprocess.std, dtype=torch.float32, device=device)
    return (shift / std).view(1, -1, 1, 1)


def open_store(spec: InvarianceSpec) -> Opened:
    """Validate `spec` (the first layer must compensate the shift), create or reopen the store; its
    `extra` is the shift-compensated copy of the model."""
    if spec.tolerance <= 0:
        raise ValueError(f"tolerance must be > 0, got {spec.tolerance}")
    inputs = load_inputs(spec)
    check_methods(spec.methods, spec, inputs.model)
    c = shift_of(inputs.model, spec.shift, inputs.images.device)
    shifted = surgery.shift_compensated(inputs.model, inputs.images, c)
    n, (h, w) = len(inputs.ids), inputs.images.shape[-2:]
    coords = {"xai_method": spec.methods, "sample": list(range(n)), "variant": list(VARIANTS),
              "shown": list(range(min(SHOWN, n))), "y": list(range(h)), "x": list(range(w))}
    parts = [storage.Part("maps", ("xai_method",), {
        "l1_change": (("xai_method", "sample"), "float64"), "l1_norm": (("xai_method", "sample"), "float64"),
        "example": (("xai_method", "variant", "shown", "y", "x"), "float32")})]
    return Opened(open_results(spec, "invariance", inputs, coords, parts), inputs, shifted)


def stages(spec: InvarianceSpec, o: Opened) -> list[Stage]:
    """One unit per method."""
    return [Stage("invariance", compare_method, o.store.pending("maps"))]


@task(cache_policy=NO_CACHE)
def compare_method(spec: InvarianceSpec, unit: tuple[int], wait: bool = True) -> UnitReceipt:
    """One method's maps on the model and on its shift-compensated copy (the copy's input is x + shift)."""
    o, unit = opened(spec, open_store), tuple(unit)
    store, inputs, name = o.store, o.inputs, o.store.coord("xai_method")[unit[0]]
    with store.claim(f"maps-{unit[0]}", wait) as mine:
        if not mine or unit not in store.pending("maps"):
            return UnitReceipt(unit, deferred=not mine, skipped=mine)
        c = shift_of(inputs.model, spec.shift, inputs.images.device)
        takes_baseline = "baseline" in xm.spec(name).defaults
        extra = {"baseline": c} if takes_baseline and spec.baseline == "shifted" else {}
        m1 = maps_of(name, inputs.model, inputs.images, inputs.target, spec)
        m2 = maps_of(name, o.extra, inputs.images + c, inputs.target, spec, **extra)
        diff = np.abs(m2.astype(np.float64) - m1).reshape(len(m1), -1).sum(1)
        norm = np.abs(m1.astype(np.float64)).reshape(len(m1), -1).sum(1)
        k = len(store.coord("shown"))
        store.write("maps", unit, l1_change=diff, l1_norm=norm, example=np.stack([m1[:k], m2[:k]]))
    change = float(diff.sum() / norm.sum())
    return UnitReceipt(unit, f"{name}: relative L1 change of the maps {change:.3g}", values={"change": change})


def summary(path: str) -> dict[str, Any]:
    """The `--json` shape: per method, the relative L1 change of its maps and whether it is within tolerance."""
    store = storage.ResultStore(path, mode="r")
    ds, tol = store.dataset(), store.identity["tolerance"]
    out = {}
    for m in ds.xai_method.values.tolist():
        norm = float(ds.l1_norm.sel(xai_method=m).sum())
        change = float(ds.l1_change.sel(xai_method=m).sum()) / norm if norm > 0 else float("nan")
        out[m] = {"change": change, "invariant": bool(change <= tol)}
    return out
