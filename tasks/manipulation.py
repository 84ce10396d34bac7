"""Manipulation (Dombrowski et al. 2019): an imperceptible change of the input moves the map
to a target map while the output stays, and beta-smoothing (explaining through a softplus copy
of the model with a small beta) defends against it.

The target map of each image is another image's map (the next one's, ``other``) or a square in
the corner that is farthest from the map's mass (``corner``). The defence is measured by the
same attack aimed at the smoothed explanation (an attacker who knows the defence), with the
same budget. Similarity to the target is the Pearson correlation of the maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage
import xai_methods as xm
from xai_methods import manipulation as M
from xai_methods.metrics.similarity import similarity

from .protocol import ProtocolSpec, check_methods, load_inputs
from .study import option

TARGET_MAPS = ("other", "corner")
STAGES = ("before", "after", "defended_before", "defended_after")
MAPS = ("original", "manipulated", "target", "defended_original", "defended_manipulated", "defended_target")


@dataclass(frozen=True)
class ManipulateSpec(ProtocolSpec):
    method: str = option("saliency", f"the method attacked: {', '.join(M.DIFFERENTIABLE)}")
    store: str = option("runs/manipulate.zarr", "the protocol's Zarr store; rerun to resume")
    samples: int = option(8, "how many images of the dataset (its first ones) are attacked")
    target_map: str = option("other", "the map to move to: other (the next image's map) or corner (a square in "
                                      "the corner farthest from the map's mass)", choices=TARGET_MAPS)
    steps: int = option(200, "optimisation steps of the attack")
    lr: float = option(1e-3, "Adam step size of the perturbation, in [0, 1] pixel units", type="float")
    beta: float = option(10.0, "softplus beta of the copy the attack differentiates through", type="float")
    defence_beta: float = option(2.0, "softplus beta of the defended (smoothed) explanation", type="float")
    gamma: float = option(1e3, "weight of keeping the output in the attack's loss", type="float")
    epsilon: float = option(0.05, "largest change of a pixel (L-inf budget, [0, 1] units; 0.05 is about 13/255)",
                            type="float")


def corner_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per map, ones on the quarter-side square in the corner with the least of the map's absolute mass."""
    b, h, w = maps.shape
    sh, sw = max(1, h // 4), max(1, w // 4)
    out = torch.zeros_like(maps)
    corners = [(slice(0, sh), slice(0, sw)), (slice(0, sh), slice(w - sw, w)),
               (slice(h - sh, h), slice(0, sw)), (slice(h - sh, h), slice(w - sw, w))]
    for i in range(b):
        mass = [float(maps[i][r, c].abs().sum()) for r, c in corners]
        r, c = corners[int(np.argmin(mass))]
        out[i, r, c] = 1.0
    return out


def target_of(kind: str, maps: torch.Tensor) -> torch.Tensor:
    if kind == "other":
        if maps.shape[0] < 2:
            raise ValueError("target_map 'other' needs at least 2 samples (each image's target is the next one's map)")
        return maps.roll(-1, 0)
    return corner_maps(maps)


def check(spec: ManipulateSpec) -> None:
    if spec.method not in M.DIFFERENTIABLE:
        raise ValueError(f"method {spec.method!r} cannot be manipulated here; valid: {', '.join(M.DIFFERENTIABLE)}")
    if spec.target_map not in TARGET_MAPS:
        raise ValueError(f"target_map must be one of {', '.join(TARGET_MAPS)}, got {spec.target_map!r}")
    for name in ("steps", "lr", "beta", "defence_beta"):
        if not getattr(spec, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(spec, name)}")
    if spec.gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {spec.gamma}")
    if not 0 < spec.epsilon <= 1:
        raise ValueError(f"epsilon must be in (0, 1] (a pixel change in [0, 1] units), got {spec.epsilon}")


def open_store(spec: ManipulateSpec) -> tuple[storage.ResultStore, Any]:
    check(spec)
    inputs = load_inputs(spec)
    check_methods([spec.method], spec, inputs.model, M.DIFFERENTIABLE)
    n, (c, h, w) = len(inputs.ids), inputs.images.shape[1:]
    coords = {"sample": list(range(n)), "stage": list(STAGES), "map": list(MAPS), "channel": list(range(c)),
              "y": list(range(h)), "x": list(range(w))}
    parts = [storage.Part("attack", ("sample",), {
        "target_similarity": (("sample", "stage"), "float64"), "output_change": (("sample", "stage"), "float64"),
        "linf": (("sample", "stage"), "float64"), "l2": (("sample", "stage"), "float64"),
        "maps": (("sample", "map", "y", "x"), "float32"), "delta": (("sample", "channel", "y", "x"), "float32"),
        "image": (("sample", "channel", "y", "x"), "float32")})]
    identity = spec.identity(inputs.model, inputs.dataset, inputs.ids)
    store, _ = storage.ResultStore.open_or_create(spec.store, "manipulate", identity, coords, parts)
    return store, inputs


def _attack(spec: ManipulateSpec, inputs: Any, beta: float, explain: Any) -> dict[str, torch.Tensor]:
    """Attack `explain`'s maps (through the softplus copy of `beta`); the maps before and after, the norms."""
    x, t, model = inputs.images, inputs.target, inputs.model
    original = explain(x)
    goal = target_of(spec.target_map, original)
    res = M.manipulate(spec.method, model, x, goal, preprocess=model.preprocess, target=t, layer=spec.layer,
                       steps=spec.steps, lr=spec.lr, beta=beta, gamma=spec.gamma, epsilon=spec.epsilon)
    return {"original": original, "goal": goal, "after": explain(res.images), "delta": res.delta,
            "change": M.output_change(model, x, res.images)}


@task(cache_policy=NO_CACHE)
def attack(spec: ManipulateSpec) -> dict[str, Any]:
    """Attack every pending image, undefended then defended, and write one unit per image."""
    store, inputs = open_store(spec)
    todo = [i for (i,) in store.pending("attack")]
    if not todo:
        return {"attacked": 0}
    sub = inputs._replace(images=inputs.images[todo], target=inputs.target[todo])
    if spec.target_map == "other" and len(todo) < len(inputs.ids):  # the next image's map needs every image
        sub = inputs
        todo = list(range(len(inputs.ids)))
    params = {k: v for k, v in spec.method_params(spec.method).items() if k == "layer"}

    def plain(x: torch.Tensor) -> torch.Tensor:
        return xm.attribute(spec.method, inputs.model, x, target=sub.target, **params).detach()

    def smoothed(x: torch.Tensor) -> torch.Tensor:
        return M.smoothed_explanation(spec.method, inputs.model, x, sub.target, spec.defence_beta, spec.layer)

    runs = [_attack(spec, sub, spec.beta, plain), _attack(spec, sub, spec.defence_beta, smoothed)]
    images01 = inputs.model.preprocess.invert(sub.images).cpu().numpy()  # [0, 1], for the figure

    def sim(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        return similarity("pearson", a.cpu().numpy(), b.cpu().numpy())

    for j, i in enumerate(todo):
        rows = [(sim(r["original"], r["goal"])[j], 0.0, 0.0, 0.0) if before else
                (sim(r["after"], r["goal"])[j], float(r["change"][j]), float(r["delta"][j].abs().max()),
                 float(r["delta"][j].norm())) for r in runs for before in (True, False)]
        maps = [r[k][j] for r in runs for k in ("original", "after", "goal")]
        store.write("attack", (i,), target_similarity=np.array([r[0] for r in rows]),
                    output_change=np.array([r[1] for r in rows]), linf=np.array([r[2] for r in rows]),
                    l2=np.array([r[3] for r in rows]), maps=torch.stack(maps).cpu().numpy(),
                    delta=runs[0]["delta"][j].cpu().numpy(), image=images01[j])
    return {"attacked": len(todo)}


def summary(path: str) -> dict[str, Any]:
    """The `--json` shape: mean target similarity before and after the attack, the output change and
    the perturbation's norms, undefended and defended."""
    ds = storage.ResultStore(path, mode="r").dataset()

    def stage(name: str, norms: bool) -> dict[str, float]:
        row = {"target_similarity": float(ds.target_similarity.sel(stage=name).mean())}
        if norms:
            row.update(output_change=float(ds.output_change.sel(stage=name).mean()),
                       linf=float(ds.linf.sel(stage=name).max()), l2=float(ds.l2.sel(stage=name).mean()))
        return row

    return {"before": stage("before", False), "after": stage("after", True),
            "defended": {"before": stage("defended_before", False), **stage("defended_after", True)}}
