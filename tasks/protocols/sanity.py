"""Sanity checks (Adebayo et al. 2018): do the maps change when the model or the labels are randomised?

Model-parameter randomisation re-initialises the layers with parameters, from the logits down
in the order they execute: cascading (every layer down to this one) and independent (this
one alone), each layer with its own initialiser and its own seed. Data randomisation
retrains the model from scratch on permuted labels. Each randomised map is compared with the
original by `xai_methods.metrics.similarity`'s measures. One unit of work is one
(method, randomisation, layer): a rerun computes only what is missing.
"""
from __future__ import annotations

import copy
import json
import time
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage
import zoo
from xai_methods import surgery
from xai_methods.metrics.similarity import MEASURES, similarities
from zoo.training import accuracy, fit, train_test

from .common import Opened, Stage, UnitReceipt, check_methods, load_inputs, maps_of, nanmean, open_results, opened
from .specs import SanitySpec

KINDS = ("cascading", "independent")
SHOWN = 4  # samples whose randomised maps are kept for the figure


def weights_vector(model: torch.nn.Module) -> np.ndarray:
    """Every floating-point state-dict entry of `model`, flattened in key order."""
    sd = model.state_dict()
    return np.concatenate([sd[k].detach().cpu().reshape(-1).float().numpy() for k in sorted(sd) if sd[k].is_floating_point()])


def load_weights_vector(model: torch.nn.Module, vector: np.ndarray) -> torch.nn.Module:
    sd, at = model.state_dict(), 0
    for k in sorted(sd):
        if sd[k].is_floating_point():
            n = sd[k].numel()
            sd[k] = torch.from_numpy(np.ascontiguousarray(vector[at:at + n])).reshape(sd[k].shape).to(sd[k])
            at += n
    model.load_state_dict(sd)
    return model.eval()


def layout(spec: SanitySpec) -> tuple[dict[str, Any], list[storage.Part], Any]:
    """Validate `spec`; the store's coordinates and parts, and the inputs."""
    inputs = load_inputs(spec)
    check_methods(spec.methods, spec, inputs.model)
    if spec.study is not None and storage.Store(spec.study, mode="r").attrs.get("model_fingerprint") != \
            zoo.model_fingerprint(inputs.model):
        raise ValueError(f"study {spec.study!r} was made with another model (or weights) than this sanity check")
    layers = surgery.execution_order(inputs.model, inputs.images)[::-1]  # from the logits down
    n, (h, w) = len(inputs.ids), inputs.images.shape[-2:]
    coords: dict[str, Any] = {"xai_method": spec.methods, "randomization": list(KINDS), "layer": layers,
                              "sample": list(range(n)), "measure": list(MEASURES), "shown": list(range(min(SHOWN, n))),
                              "y": list(range(h)), "x": list(range(w))}
    parts = [
        storage.Part("original", ("xai_method",), {"original": (("xai_method", "sample", "y", "x"), "float32")}),
        storage.Part("change", ("randomization", "layer"), {"output_change": (("randomization", "layer"), "float64")}),
        storage.Part("step", ("xai_method", "randomization", "layer"), {
            "similarity": (("xai_method", "randomization", "layer", "sample", "measure"), "float64"),
            "example": (("xai_method", "randomization", "layer", "shown", "y", "x"), "float32")}),
    ]
    if spec.data_randomization:
        params = len(weights_vector(inputs.model))
        coords.update(retrain=[0], split=["train", "test"], param=list(range(params)))
        parts += [
            storage.Part("label_model", ("retrain",), {"label_weights": (("retrain", "param"), "float32"),
                                                       "label_accuracy": (("retrain", "split"), "float64")}),
            storage.Part("label", ("xai_method",), {
                "label_similarity": (("xai_method", "sample", "measure"), "float64"),
                "label_example": (("xai_method", "shown", "y", "x"), "float32")}),
        ]
    return coords, parts, inputs


def open_store(spec: SanitySpec) -> Opened:
    """Validate `spec`, create or reopen its store."""
    coords, parts, inputs = layout(spec)
    return Opened(open_results(spec, "sanity", inputs, coords, parts), inputs)


def stages(spec: SanitySpec, o: Opened) -> list[Stage]:
    """The unrandomised maps, then each randomised model (cascading and independent, per layer: independent
    units), then the label-randomised model and its maps."""
    s = o.store
    steps = sorted({(k, l) for _, k, l in s.pending("step")} | set(s.pending("change")))
    out = [Stage("original maps", original_maps, s.pending("original")),
           Stage("randomised models", randomized_step, steps)]
    if spec.data_randomization:
        out += [Stage("label-randomised model", label_randomized_model, [(0,)]),
                Stage("label-randomised maps", label_randomized_maps, s.pending("label"))]
    return out


def _study_maps(spec: SanitySpec, method: str, inputs: Any) -> np.ndarray | None:
    """The unrandomised maps from `spec.study`, when it holds them for these images, this model and
    these parameters (None otherwise: they are computed)."""
    if spec.study is None:
        return None
    s = storage.Store(spec.study, mode="r")
    n = len(inputs.ids)
    if method not in s.methods() or s.sample_ids()[:n] != inputs.ids:
        return None
    if json.dumps(s.attrs["params"].get(method), sort_keys=True) != json.dumps(spec.method_params(method), sort_keys=True):
        return None
    maps = np.concatenate([s.read_maps(method, b) for b in range(storage.n_blocks(n, s.block_size))])[:n]
    return maps if np.isfinite(maps).all() else None


@task(cache_policy=NO_CACHE)
def original_maps(spec: SanitySpec, unit: tuple[int], wait: bool = True) -> UnitReceipt:
    """One method's maps of the unrandomised model (reused from the study when it has them)."""
    o, unit = opened(spec, open_store), tuple(unit)
    (m,), name = unit, o.store.coord("xai_method")[unit[0]]
    with o.store.claim(f"original-{m}", wait) as mine:
        if not mine or unit not in o.store.pending("original"):
            return UnitReceipt(unit, deferred=not mine, skipped=mine)
        maps = _study_maps(spec, name, o.inputs)
        reused = maps is not None
        if maps is None:
            maps = maps_of(name, o.inputs.model, o.inputs.images, o.inputs.target, spec)
        o.store.write("original", unit, original=maps)
    return UnitReceipt(unit, f"{name}: unrandomised maps " + (f"reused from the study {spec.study}" if reused else
                                                          "computed"), values={"reused": reused})


def randomized_model(model: torch.nn.Module, layers: list[str], kind: str, index: int, seed: int) -> torch.nn.Module:
    """Cascading step `index`: layers[0..index] re-initialised; independent: layers[index] alone."""
    chosen = layers[:index + 1] if kind == "cascading" else [layers[index]]
    return surgery.randomized(model, chosen, seed)


@task(cache_policy=NO_CACHE)
def randomized_step(spec: SanitySpec, unit: tuple[int, int], wait: bool = True) -> UnitReceipt:
    """One randomised model: its output change, and every pending method's similarity to the original."""
    t0, o, unit = time.perf_counter(), opened(spec, open_store), tuple(unit)
    (kind, layer), store, inputs = unit, o.store, o.inputs
    layers, methods = store.coord("layer"), store.coord("xai_method")
    with store.claim(f"step-{kind}-{layer}", wait) as mine:
        todo = [m for m, k, l in store.pending("step") if (k, l) == unit] if mine else []
        if not mine or not todo and unit not in store.pending("change"):
            return UnitReceipt(unit, deferred=not mine, skipped=mine)
        model = randomized_model(inputs.model, layers, KINDS[kind], layer, spec.seed)
        with torch.no_grad():
            before, after = inputs.model(inputs.images), model(inputs.images)
        change = float((after - before).norm() / before.norm())
        if unit in store.pending("change"):
            store.write("change", unit, output_change=np.float64(change))
        for m in todo:
            maps = maps_of(methods[m], model, inputs.images, inputs.target, spec)
            sim = similarities(store.read("original", (m,)), maps)
            store.write("step", (m, kind, layer), similarity=sim, example=maps[:len(store.coord("shown"))])
    return UnitReceipt(unit, f"{KINDS[kind]} {layers[layer]}: output changed by {change:.3g} (relative L2)",
                   "warning" if change < 1e-6 else "info", {"output_change": change},
                   seconds=time.perf_counter() - t0)


@task(cache_policy=NO_CACHE)
def label_randomized_model(spec: SanitySpec, unit: tuple[int] = (0,), wait: bool = True) -> UnitReceipt:
    """Retrain a re-initialised copy of the model on permuted labels (once; its weights are stored)."""
    o, unit = opened(spec, open_store), tuple(unit)
    store, inputs = o.store, o.inputs
    with store.claim("label_model", wait) as mine:
        if not mine:
            return UnitReceipt(unit, deferred=True)
        if store.pending("label_model"):
            pre = inputs.model.preprocess
            train, test = train_test(spec.dataset, pre.size, spec.train_samples, 500, seed=spec.seed)
            permuted = np.random.default_rng(spec.seed).permutation(train.labels)
            model = surgery.randomized(inputs.model, surgery.execution_order(inputs.model, inputs.images), spec.seed + 1)
            fit(model, train.images, permuted, pre, epochs=spec.epochs, batch_size=spec.batch_size, seed=spec.seed)
            acc = [accuracy(model, train.images, permuted, pre), accuracy(model, test.images, test.labels, pre)]
            store.write("label_model", (0,), label_weights=weights_vector(model), label_accuracy=np.array(acc))
    train_acc, test_acc = (float(a) for a in store.read("label_accuracy", (0,)))
    with torch.no_grad():
        chance = 1 / int(inputs.model(inputs.images[:1]).shape[1])
    return UnitReceipt(unit, f"label-randomised model: train accuracy {train_acc:.3f} on its permuted labels, test "
                         f"accuracy {test_acc:.3f} (chance {chance:.3f})" +
                   ("" if test_acc < chance + 0.1 else " — NOT near chance"),
                   values={"train_accuracy": train_acc, "test_accuracy": test_acc, "chance": chance})


@task(cache_policy=NO_CACHE)
def label_randomized_maps(spec: SanitySpec, unit: tuple[int], wait: bool = True) -> UnitReceipt:
    """One method's maps of the label-randomised model, compared with the original ones."""
    o, unit = opened(spec, open_store), tuple(unit)
    store, (m,) = o.store, unit
    with store.claim(f"label-{m}", wait) as mine:
        if not mine or unit not in store.pending("label"):
            return UnitReceipt(unit, deferred=not mine, skipped=mine)
        model = load_weights_vector(copy.deepcopy(o.inputs.model), store.read("label_weights", (0,)))
        maps = maps_of(store.coord("xai_method")[m], model, o.inputs.images, o.inputs.target, spec)
        store.write("label", unit, label_similarity=similarities(store.read("original", unit), maps),
                    label_example=maps[:len(store.coord("shown"))])
    return UnitReceipt(unit, f"{store.coord('xai_method')[m]}: maps of the label-randomised model compared")


def summary(path: str) -> dict[str, Any]:
    """The `--json` shape: per method, the mean similarity per randomised layer (layers top-down),
    with the output change and how many images' similarity was undefined (a constant map)."""
    ds = storage.ResultStore(path, mode="r").dataset()
    out: dict[str, Any] = {}
    for m in ds.xai_method.values.tolist():
        entry: dict[str, Any] = {}
        for kind in KINDS:
            rows = []
            for layer in ds.layer.values.tolist():
                sim = ds.similarity.sel(xai_method=m, randomization=kind, layer=layer).values
                mean, undefined = nanmean(sim)
                rows.append({"layer": layer, **{k: float(v) for k, v in zip(MEASURES, mean)},
                             "output_change": float(ds.output_change.sel(randomization=kind, layer=layer)),
                             "undefined": int(undefined.max())})
            entry[f"{kind}_randomization"] = rows
        if "label_similarity" in ds:
            mean, undefined = nanmean(ds.label_similarity.sel(xai_method=m).values)
            acc = ds.label_accuracy.isel(retrain=0).values
            entry["label_randomization"] = {**{k: float(v) for k, v in zip(MEASURES, mean)},
                                            "train_accuracy": float(acc[0]), "test_accuracy": float(acc[1]),
                                            "undefined": int(undefined.max())}
        out[m] = entry
    return out
