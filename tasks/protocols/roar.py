"""Remove and retrain (ROAR, Hooker et al. 2019): does accuracy fall faster when the pixels a
method ranks highest are removed from every train and test image, and the model retrained from
scratch, than when random pixels are?

The maps come from the trained model (one unit per method, over the train and test images);
a removed pixel takes the per-channel mean of the training images in every channel; ties in a
map are broken by one seeded permutation. Each (method, fraction, seed) retrain is one unit, so
retrains run in parallel on Dask and a rerun does only the missing ones. The random ranking is
the coordinate ``random``: a fresh uniform map per image and seed.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage
from xai_methods._core import forward_logits
from xai_methods import surgery
from xai_methods.metrics.faithfulness import ranks
from zoo.training import accuracy, fit, train_test

from .common import Opened, Stage, UnitReceipt, check_methods, load_inputs, maps_of, open_results, opened
from .specs import RoarSpec

RANDOM = "random"


def check(spec: RoarSpec) -> None:
    bad = [f for f in spec.fractions if not 0 <= f < 1]
    if bad or not spec.fractions:
        raise ValueError(f"fractions must be in [0, 1) (0: the unmodified images), got {bad or spec.fractions}")
    for name in ("seeds", "train_samples", "test_samples", "epochs", "batch_size"):
        if getattr(spec, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(spec, name)}")
    if RANDOM in spec.methods:
        raise ValueError(f"{RANDOM!r} is always included (the random ranking); name attribution methods only")


@functools.lru_cache(maxsize=2)
def _data(dataset: str, size: tuple[int, int], train: int, test: int, seed: int) -> tuple[Any, Any]:
    return train_test(dataset, size, train, test, seed)


def open_store(spec: RoarSpec) -> Opened:
    """Validate `spec`, create or reopen its store; its `extra` is the (train, test) images."""
    check(spec)
    inputs = load_inputs(spec)
    check_methods(spec.methods, spec, inputs.model)
    pre = inputs.model.preprocess
    train, test = _data(spec.dataset, tuple(pre.size), spec.train_samples, spec.test_samples, spec.seed)
    n, (h, w) = len(train.labels) + len(test.labels), pre.size
    coords = {"xai_method": [*spec.methods, RANDOM], "fraction": list(spec.fractions), "seed": list(range(spec.seeds)),
              "image": list(range(n)), "y": list(range(h)), "x": list(range(w))}
    parts = [storage.Part("ranking", ("xai_method",), {"ranking_map": (("xai_method", "image", "y", "x"), "float32")}),
             storage.Part("retrain", ("xai_method", "fraction", "seed"), {
                 "accuracy": (("xai_method", "fraction", "seed"), "float64"),
                 "train_accuracy": (("xai_method", "fraction", "seed"), "float64")})]
    return Opened(open_results(spec, "roar", inputs, coords, parts), inputs, (train, test))


def stages(spec: RoarSpec, o: Opened) -> list[Stage]:
    """Each method's rankings, then every (method, fraction, seed) retrain: independent units."""
    return [Stage("rankings", ranking_maps, o.store.pending("ranking")),
            Stage("roar", retrain, o.store.pending("retrain"))]


@task(cache_policy=NO_CACHE)
def ranking_maps(spec: RoarSpec, unit: tuple[int], wait: bool = True) -> UnitReceipt:
    """One method's maps of every train and test image, from the trained model (the random ranking: uniform noise)."""
    t0, o, unit = time.perf_counter(), opened(spec, open_store), tuple(unit)
    (train, test), name = o.extra, o.store.coord("xai_method")[unit[0]]
    with o.store.claim(f"ranking-{unit[0]}", wait) as mine:
        if not mine or unit not in o.store.pending("ranking"):
            return UnitReceipt(unit, deferred=not mine, skipped=mine)
        images01 = np.concatenate([train.images, test.images])
        if name == RANDOM:
            gen = torch.Generator().manual_seed(spec.seed)
            maps = torch.rand((len(images01), *images01.shape[2:]), generator=gen).numpy()
        else:
            x = o.inputs.model.preprocess(torch.from_numpy(images01)).to(o.inputs.images.device)
            maps = maps_of(name, o.inputs.model, x, forward_logits(o.inputs.model, x, 256).argmax(1).clone(), spec)
        o.store.write("ranking", unit, ranking_map=maps)
    seconds = time.perf_counter() - t0
    return UnitReceipt(unit, f"rankings of {name} computed in {seconds:.1f} s", seconds=seconds)


def remove_top(images01: np.ndarray, maps: np.ndarray, fraction: float, fill: np.ndarray, seed: int) -> np.ndarray:
    """`images01` with the `fraction` of each image's pixels ranked highest by `maps` set to `fill` (per channel)."""
    order = ranks(torch.from_numpy(np.ascontiguousarray(maps)), seed).numpy()  # 0 = ranked first
    removed = (order < round(fraction * order.shape[1])).reshape(maps.shape)
    return np.where(removed[:, None], fill[None, :, None, None], images01).astype(images01.dtype)


@task(cache_policy=NO_CACHE)
def retrain(spec: RoarSpec, unit: tuple[int, int, int], wait: bool = True) -> UnitReceipt:
    """Remove the top `fraction` of one method's ranking from every image, retrain from scratch, test."""
    t0, o, unit = time.perf_counter(), opened(spec, open_store), tuple(unit)
    (m, f, s), (train, test) = unit, o.extra
    name, fraction = o.store.coord("xai_method")[m], o.store.coord("fraction")[f]
    with o.store.claim(f"retrain-{m}-{f}-{s}", wait) as mine:
        if not mine or unit not in o.store.pending("retrain"):
            return UnitReceipt(unit, deferred=not mine, skipped=mine)
        maps = o.store.read("ranking_map", (m,))
        fill = train.images.mean(axis=(0, 2, 3))
        n = len(train.labels)
        images = remove_top(np.concatenate([train.images, test.images]), maps, fraction, fill, seed=s)
        model = surgery.randomized(o.inputs.model, surgery.execution_order(o.inputs.model, o.inputs.images),
                                   seed=1000 + s)
        pre = o.inputs.model.preprocess
        fit(model, images[:n], train.labels, pre, epochs=spec.epochs, batch_size=spec.batch_size, seed=s)
        acc, train_acc = accuracy(model, images[n:], test.labels, pre), accuracy(model, images[:n], train.labels, pre)
        o.store.write("retrain", unit, accuracy=np.float64(acc), train_accuracy=np.float64(train_acc))
    seconds = time.perf_counter() - t0
    return UnitReceipt(unit, f"{name} at {fraction:.2f}, seed {s}: test accuracy {acc:.3f} ({seconds:.0f} s)",
                   values={"accuracy": acc}, seconds=seconds)


def summary(path: str) -> dict[str, Any]:
    """The `--json` shape: {xai_method: {fraction: [test accuracy per seed]}, "random": {...}}."""
    ds = storage.ResultStore(path, mode="r").dataset()
    return {m: {f"{f:g}": [float(a) for a in ds.accuracy.sel(xai_method=m, fraction=f).values]
                for f in ds.fraction.values.tolist()} for m in ds.xai_method.values.tolist()}
