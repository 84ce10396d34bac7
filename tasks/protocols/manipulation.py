"""Manipulation (Dombrowski et al. 2019): an imperceptible change of the input moves the map
to a target map while the output stays, and beta-smoothing (explaining through a softplus copy
of the model with a small beta) defends against it.

The target map of each image is another image's map (the next one's, ``other``) or a square in
the corner that is farthest from the map's mass (``corner``). The defence is measured twice:
the smoothed map of the images the attack on the model's own map made (``transfer``: an
attacker who does not know the defence) and the same attack aimed at the smoothed map itself,
with the same budget (``defended``: one who does). Its cost is ``fidelity``: how well the
smoothed map agrees with the model's own map on the clean images. Similarity is the Pearson
correlation of the maps.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage
import xai_methods as xm
from xai_methods import manipulation as M
from xai_methods.metrics.similarity import similarity

from .common import Opened, Stage, UnitReceipt, check_methods, load_inputs, open_results, opened
from .specs import ManipulateSpec, TARGET_MAPS

STAGES = ("before", "after", "defended_before", "defended_after", "defended_transfer")
MAPS = ("original", "manipulated", "target", "defended_original", "defended_manipulated", "defended_target")


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


def open_store(spec: ManipulateSpec) -> Opened:
    check(spec)
    inputs = load_inputs(spec)
    check_methods([spec.method], spec, inputs.model, M.DIFFERENTIABLE)
    n, (c, h, w) = len(inputs.ids), inputs.images.shape[1:]
    coords = {"sample": list(range(n)), "stage": list(STAGES), "map": list(MAPS), "channel": list(range(c)),
              "y": list(range(h)), "x": list(range(w))}
    parts = [storage.Part("attack", ("sample",), {
        "target_similarity": (("sample", "stage"), "float64"), "output_change": (("sample", "stage"), "float64"),
        "linf": (("sample", "stage"), "float64"), "l2": (("sample", "stage"), "float64"),
        "fidelity": (("sample",), "float64"),
        "maps": (("sample", "map", "y", "x"), "float32"), "delta": (("sample", "channel", "y", "x"), "float32"),
        "image": (("sample", "channel", "y", "x"), "float32")})]
    return Opened(open_results(spec, "manipulate", inputs, coords, parts), inputs)


def stages(spec: ManipulateSpec, o: Opened) -> list[Stage]:
    """One unit: every pending image attacked together (the "other" target map needs them all)."""
    return [Stage("manipulate", attack, [(0,)] if o.store.pending("attack") else [])]


def _attack(spec: ManipulateSpec, inputs: Any, beta: float, explain: Any) -> dict[str, torch.Tensor]:
    """Attack `explain`'s maps (through the softplus copy of `beta`); the maps before and after, the norms."""
    x, t, model = inputs.images, inputs.target, inputs.model
    original = explain(x)
    goal = target_of(spec.target_map, original)
    res = M.manipulate(spec.method, model, x, goal, preprocess=model.preprocess, target=t, layer=spec.layer,
                       steps=spec.steps, lr=spec.lr, beta=beta, gamma=spec.gamma, epsilon=spec.epsilon)
    return {"original": original, "goal": goal, "after": explain(res.images), "images": res.images,
            "delta": res.delta, "change": M.output_change(model, x, res.images)}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return similarity("pearson", a.cpu().numpy(), b.cpu().numpy())


def _stages(plain: dict[str, torch.Tensor], defended: dict[str, torch.Tensor],
            transfer: torch.Tensor) -> dict[str, tuple[np.ndarray, ...]]:
    """Per stage of STAGES: (target similarity, output change, L-inf, L2) per image."""
    zero = np.zeros(len(plain["delta"]))

    def attacked(r: dict[str, torch.Tensor], maps: torch.Tensor) -> tuple[np.ndarray, ...]:
        d = r["delta"].flatten(1)
        return (_pearson(maps, r["goal"]), r["change"].cpu().numpy(), d.abs().amax(1).cpu().numpy(),
                d.norm(dim=1).cpu().numpy())

    return {"before": (_pearson(plain["original"], plain["goal"]), zero, zero, zero),
            "after": attacked(plain, plain["after"]),
            "defended_before": (_pearson(defended["original"], defended["goal"]), zero, zero, zero),
            "defended_after": attacked(defended, defended["after"]),
            "defended_transfer": (_pearson(transfer, defended["goal"]), *attacked(plain, plain["after"])[1:])}


@task(cache_policy=NO_CACHE)
def attack(spec: ManipulateSpec, unit: tuple[int] = (0,), wait: bool = True) -> UnitReceipt:
    """Attack every pending image: the model's own map, then the defended (smoothed) map under its own
    attack; the smoothed map of the first attack's images (transfer); one unit written per image."""
    o, unit = opened(spec, open_store), tuple(unit)
    with o.store.claim("attack", wait) as mine:
        todo = [i for (i,) in o.store.pending("attack")] if mine else []
        if not todo:
            return UnitReceipt(unit, deferred=not mine, skipped=mine)
        _attack_images(spec, o, todo)
    return UnitReceipt(unit, f"attacked {len(todo)} images", values={"attacked": len(todo)})


def _attack_images(spec: ManipulateSpec, o: Opened, todo: list[int]) -> None:
    store, inputs = o.store, o.inputs
    if spec.target_map == "other":  # each image's target is the next image's map: attack them all
        todo = list(range(len(inputs.ids)))
    sub = inputs._replace(images=inputs.images[todo], target=inputs.target[todo])
    layer = {"layer": spec.layer} if xm.spec(spec.method).needs_layer else {}

    def plain(x: torch.Tensor) -> torch.Tensor:
        return xm.attribute(spec.method, inputs.model, x, target=sub.target, **layer).detach()

    def smoothed(x: torch.Tensor) -> torch.Tensor:
        return M.smoothed_explanation(spec.method, inputs.model, x, sub.target, spec.defence_beta, spec.layer)

    undefended, defended = _attack(spec, sub, spec.beta, plain), _attack(spec, sub, spec.defence_beta, smoothed)
    stages = _stages(undefended, defended, smoothed(undefended["images"]))
    fidelity = _pearson(defended["original"], undefended["original"])  # what the smoothing costs
    images01 = inputs.model.preprocess.invert(sub.images).cpu().numpy()  # [0, 1], for the figure
    maps = torch.stack([r[k] for r in (undefended, defended) for k in ("original", "after", "goal")], 1).cpu().numpy()
    for j, i in enumerate(todo):
        rows = np.array([[v[j] for v in stages[s]] for s in STAGES])  # (stage, 4)
        store.write("attack", (i,), target_similarity=rows[:, 0], output_change=rows[:, 1], linf=rows[:, 2],
                    l2=rows[:, 3], fidelity=np.float64(fidelity[j]), maps=maps[j],
                    delta=undefended["delta"][j].cpu().numpy(), image=images01[j])


def summary(path: str) -> dict[str, Any]:
    """The `--json` shape: mean target similarity before and after the attack, the output change and the
    perturbation's norms (largest L-inf, mean L2), undefended and defended; for the defence also its
    `transfer` (the smoothed map of the undefended attack's images) and its `fidelity` (Pearson of the
    smoothed map with the model's own map on the clean images)."""
    ds = storage.ResultStore(path, mode="r").dataset()

    def stage(name: str, norms: bool = True) -> dict[str, float]:
        row = {"target_similarity": float(ds.target_similarity.sel(stage=name).mean())}
        if norms:
            row.update(output_change=float(ds.output_change.sel(stage=name).mean()),
                       linf=float(ds.linf.sel(stage=name).max()), l2=float(ds.l2.sel(stage=name).mean()))
        return row

    return {"before": stage("before", False), "after": stage("after"),
            "defended": {"before": stage("defended_before", False), **stage("defended_after"),
                         "transfer": stage("defended_transfer", False), "fidelity": float(ds.fidelity.mean())}}
