"""Resilience and reactivity of the metrics (MetaQuantus; Hedström et al., TMLR 2023), on the study's own model
and images: does a metric's score stay put under a perturbation that should not change it, and move under one
that should?

Each method's maps are computed and scored by every metric once (`original`), then again after each of four
perturbations, `draws` seeded draws each (`perturbed`, one unit per test and draw):

- input_noise (minor): x + N(0, input_noise) in [0, 1] pixel units; maps and scores on the noisy input.
- weight_noise (minor): every weight times 1 + N(0, weight_noise); maps and scores of that copy.
- random_model (disruptive): every layer re-drawn (`surgery.randomized`); its maps scored by the original model.
- shuffled_maps (disruptive): each image gets another image's original map (a seeded derangement); no method pass.

A minor draw counts only the images whose top-1 class it keeps (`kept`). `tasks.meta.consistency` turns the
stored scores into MetaQuantus's four criteria and its MC score; `cost` is the forward passes it states before
any work (a test counts them).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage
import xai_methods as xm
from xai_methods import metrics as xmet
from xai_methods import surgery
from xai_methods._core import forward_logits

from .common import Inputs, Opened, Stage, UnitReceipt, check_methods, load_inputs, maps_of, open_results, opened
from .specs import ResilienceSpec

TESTS = ("input_noise", "weight_noise", "random_model", "shuffled_maps")
EXPLAINED = ("input_noise", "weight_noise", "random_model")  # the tests that recompute the maps
PREDICTED = ("input_noise", "weight_noise")  # the tests that check the top-1 class is kept


def _check(spec: ResilienceSpec, inputs: Inputs) -> None:
    contrastive = [m for m in spec.methods if ":" not in m and m in xm.available() and xm.spec(m).needs_contrast]
    if contrastive:
        raise ValueError(f"{', '.join(contrastive)} need a contrast class, which the resilience protocol does not give")
    check_methods(spec.methods, spec, inputs.model)
    if len(spec.methods) < 2:
        raise ValueError(f"give two or more methods (the ranking criteria compare them), got {spec.methods}")
    for name, value in (("draws", spec.draws), ("input_noise", spec.input_noise), ("weight_noise", spec.weight_noise)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    for k in spec.metrics or [None]:
        if k is None:
            raise ValueError(f"give one or more metrics; available: {', '.join(xmet.available())}")
        if xmet.spec(k).needs_mask and inputs.masks is None:
            raise ValueError(f"metric {k} needs ground-truth masks; the dataset {spec.dataset!r} has none")
        xmet.check(k, tuple(inputs.images.shape[-2:]), inputs.model)


def open_store(spec: ResilienceSpec) -> Opened:
    """Validate `spec` (methods, metrics and their ground truth), create or reopen the store."""
    inputs = load_inputs(spec)
    _check(spec, inputs)
    n, (h, w) = len(inputs.ids), inputs.images.shape[-2:]
    coords = {"xai_method": spec.methods, "metric": spec.metrics, "sample": list(range(n)), "y": list(range(h)),
              "x": list(range(w)), "test": list(TESTS), "draw": list(range(spec.draws))}
    parts = [storage.Part("original", ("xai_method",), {
                 "original_map": (("xai_method", "sample", "y", "x"), "float32"),
                 "original_score": (("xai_method", "metric", "sample"), "float32")}),
             storage.Part("perturbed", ("test", "draw"), {
                 "score": (("test", "draw", "xai_method", "metric", "sample"), "float32"),
                 "kept": (("test", "draw", "sample"), "bool")})]
    return Opened(open_results(spec, "resilience", inputs, coords, parts), inputs)


def stages(spec: ResilienceSpec, o: Opened) -> list[Stage]:
    """The original maps and scores, one unit per method; then one unit per (test, draw)."""
    return [Stage("original", original, o.store.pending("original")),
            Stage("perturbed", perturbed, o.store.pending("perturbed"))]


def cost(spec: ResilienceSpec | dict[str, Any], n: int, size: tuple[int, int]) -> dict[str, int]:
    """Forward passes of the model (images through it) per stage and test, before any work: one per image to
    predict the classes the maps explain, each method's own per image where maps are made, each metric's per
    image and method (plus one image per call, the class count), one per image where the class is checked; one
    image per call of a method that finds its layer, and per random model to find its layers."""
    get = spec.get if isinstance(spec, dict) else lambda k: getattr(spec, k)
    methods, metrics, draws, params = get("methods"), get("metrics"), get("draws"), get("params") or {}
    probes = -(-n // 64) if get("layer") is None else 0  # a layer method finds its layer: one image a call
    explain = sum(n * xm.spec(m).passes(size, **params.get(m, {}))[0] + probes * xm.spec(m).needs_layer
                  for m in methods)
    score = 0
    for k in metrics:
        s = xmet.spec(k)
        if s.needs_model:
            per = s.cost(dict(s.defaults), size)
            score += sum((n * per + 1) * (xm.spec(m).passes(size, **params.get(m, {}))[0] if s.needs_method else 1)
                         for m in methods)
    out = {"predict": n, "original": explain + score}
    for t in TESTS:
        layers = 1 if t == "random_model" else 0  # one image finds the layers to re-draw, in the order they run
        out[t] = draws * ((explain if t in EXPLAINED else 0) + score + (n if t in PREDICTED else 0) + layers)
    return out


def score_maps(spec: ResilienceSpec, model: torch.nn.Module, images: torch.Tensor, maps: dict[str, np.ndarray],
               inputs: Inputs) -> np.ndarray:
    """(method, metric, sample) scores of `maps` ({method: (N, H, W)}) on `images` by `model`, each map explaining
    the original top-1 class."""
    out = np.full((len(maps), len(spec.metrics), len(images)), np.nan, np.float32)
    for i, m in enumerate(maps):
        for j, k in enumerate(spec.metrics):
            params = spec.recomputed(m) if xmet.spec(k).needs_method else {}  # the method, as it made these maps
            value = xmet.measure(k, model, images, torch.from_numpy(maps[m]).to(images.device), inputs.target,
                                 inputs.masks, **params).value
            out[i, j] = value.cpu().numpy()
    return out


@task(cache_policy=NO_CACHE)
def original(spec: ResilienceSpec, unit: tuple[int], wait: bool = True) -> UnitReceipt:
    """One method's maps of the images and their scores by every metric."""
    o, unit = opened(spec, open_store), tuple(unit)
    store, inputs, name = o.store, o.inputs, spec.methods[unit[0]]
    with store.claim(f"original-{unit[0]}", wait) as mine:
        if not mine or unit not in store.pending("original"):
            return UnitReceipt(unit, deferred=not mine, skipped=mine)
        maps = maps_of(name, inputs.model, inputs.images, inputs.target, spec)
        scores = score_maps(spec, inputs.model, inputs.images, {name: maps}, inputs)[0]
        store.write("original", unit, original_map=maps, original_score=scores)
    return UnitReceipt(unit, f"{name}: maps and scores of the original model")


def draw_seed(seed: int, test: str, draw: int) -> int:
    """The seed of one draw of one test: the same every run, different for every (test, draw)."""
    return int(np.random.SeedSequence([seed, TESTS.index(test), draw]).generate_state(1)[0])


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) that moves every index (identity for n < 2)."""
    rng = np.random.default_rng(seed)
    if n < 2:
        return np.arange(n)
    while True:
        p = rng.permutation(n)
        if (p != np.arange(n)).all():
            return p


def perturbation(test: str, spec: ResilienceSpec, inputs: Inputs, seed: int) -> tuple[torch.Tensor, torch.nn.Module,
                                                                                   torch.nn.Module]:
    """(images, the model explained, the model that scores) of one draw of `test`."""
    model, images = inputs.model, inputs.images
    if test == "input_noise":
        g = torch.Generator().manual_seed(seed)
        std = torch.tensor(model.preprocess.std, dtype=images.dtype).view(1, -1, 1, 1)
        noise = torch.randn(images.shape, generator=g, dtype=images.dtype) * spec.input_noise / std
        return images + noise.to(images.device), model, model
    if test == "weight_noise":
        copy = surgery.weight_noise(model, spec.weight_noise, seed)
        return images, copy, copy
    if test == "random_model":
        return images, surgery.randomized(model, surgery.execution_order(model, images), seed), model
    return images, model, model


@task(cache_policy=NO_CACHE)
def perturbed(spec: ResilienceSpec, unit: tuple[int, int], wait: bool = True) -> UnitReceipt:
    """One draw of one test: the maps (recomputed, or shuffled), their scores, the images the draw counts."""
    o, unit = opened(spec, open_store), tuple(unit)
    store, inputs = o.store, o.inputs
    test, draw = TESTS[unit[0]], unit[1]
    with store.claim(f"perturbed-{unit[0]}-{draw}", wait) as mine:
        if not mine or unit not in store.pending("perturbed"):
            return UnitReceipt(unit, deferred=not mine, skipped=mine)
        seed = draw_seed(spec.seed, test, draw)
        images, explained, scorer = perturbation(test, spec, inputs, seed)
        kept = np.ones(len(images), bool)
        if test in PREDICTED:
            kept = (forward_logits(explained, images, 64).argmax(1) == inputs.target).cpu().numpy()
        if test == "shuffled_maps":
            order = derangement(len(images), seed)
            maps = {m: store.read("original_map", (i,))[order] for i, m in enumerate(spec.methods)}
        else:
            maps = {m: maps_of(m, explained, images, inputs.target, spec) for m in spec.methods}
        store.write("perturbed", unit, score=score_maps(spec, scorer, images, maps, inputs), kept=kept)
    return UnitReceipt(unit, f"{test} draw {draw}: scored, {int(kept.sum())} of {len(kept)} images counted")


def summary(path: str) -> dict[str, Any]:
    """The `--json` shape: {"metrics": {metric: {"input": {IAC_NR, IAC_AR, IEC_NR, IEC_AR, MC}, "model": {...},
    "MC"}}, "kept": {test: share of the images a minor draw counted}, "cost": forward passes per stage}."""
    from ..meta.consistency import meta_consistency

    store = storage.ResultStore(path, mode="r")
    ds, identity = store.dataset(), store.identity
    metrics = [str(k) for k in ds.metric.values]
    found = meta_consistency(ds.original_score.values, ds.score.values, ds.kept.values, [str(t) for t in ds.test.values],
                             metrics, {k: xmet.spec(k).higher_is_better for k in metrics})
    kept = {t: round(float(ds.kept.sel(test=t).mean()), 4) for t in PREDICTED}
    return {"metrics": found, "kept": kept, "cost": cost(identity, ds.sizes["sample"], (ds.sizes["y"], ds.sizes["x"]))}
