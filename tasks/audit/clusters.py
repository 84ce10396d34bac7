"""The strategies a model uses: spectral relevance analysis (SpRAy) of a study's stored maps.

For each true class, the maps of one method are clustered by their shape (`xai_methods.spray`);
a class decided in two ways (by the object, or by a watermark only some of its images carry)
splits into two clusters. The maps are read lazily and downsampled by Dask chunk by chunk; at most
`CAP` maps of a class are clustered (a seeded sample past it; the others join the cluster of their
nearest clustered map), so memory and time per class stay bounded; the clusters and each class's eigengap
are written into the store (`cluster`, `eigengap`) with the parameters that found them, and are
reused while the store and the parameters stay the same.

>>> ensure("runs/shapes.zarr", "gradcam")                 # computes, or reuses what is stored
>>> cluster_table("runs/shapes.zarr", "gradcam")["square"]    # [{"cluster": 0, "size": 41, ...}, ...]
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import xarray as xr
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage
from xai_methods import spray

from .rows import finite_mean, true_classes
from ..drawing.figure import _display_image, heatmap_style, plt, save

DEFAULTS: dict[str, Any] = {"size": 16, "neighbours": 10, "max_clusters": 8, "clusters": None, "seed": 0}


def _check(ds: xr.Dataset, method: str, params: dict[str, Any]) -> dict[str, Any]:
    methods = [str(m) for m in ds.xai_method.values]
    if method not in methods:
        raise ValueError(f"--method {method!r} is not in the store; it has {', '.join(methods)}")
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown clustering parameters {sorted(unknown)}; valid: {', '.join(DEFAULTS)}")
    done = ds.done.sel(xai_method=method).values
    if not done.any():
        raise ValueError(f"{method} has no finished maps in this store yet (0 of {done.size} blocks done): rerun the "
                         "study that made it, then cluster")
    full = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    side = min(ds.sizes["y"], ds.sizes["x"])
    if not isinstance(full["size"], int) or not 1 <= full["size"] <= side:
        raise ValueError(f"size must be an integer between 1 and the maps' side {side}, got {full['size']!r}")
    return full


CAP = 4096  # maps clustered per class; past it, a seeded sample of CAP is clustered and the rest join the
# cluster of their nearest clustered map, so memory and time stay bounded per class (not O(N) and O(N^2))


def small_maps(ds: xr.Dataset, method: str, size: int, samples: np.ndarray | None = None) -> Any:
    """(sample, size, size) float32 area means of `method`'s maps (of `samples` only, when given), lazy: a Dask
    array computed chunk by chunk (NaN for a map that is NaN anywhere: not computed, or failed)."""
    maps = ds.attribution.sel(xai_method=method)
    if samples is not None:
        maps = maps.isel(sample=np.asarray(samples))
    fy, fx = ds.sizes["y"] // size, ds.sizes["x"] // size
    return maps.coarsen(y=fy, x=fx, boundary="trim").mean().astype(np.float32).data


def _chunks(small: Any, samples: int = 2048) -> Any:
    """(first sample, computed maps) of a lazy `small_maps`, whole chunks of about `samples` maps at a time
    (at least one chunk; computed in parallel by Dask): memory of a group, whatever the study's size."""
    bounds = np.concatenate([[0], np.cumsum(small.chunks[0])])
    start = 0
    while start < bounds[-1]:
        stop = int(bounds[max(np.searchsorted(bounds, start + samples, side="right") - 1, np.searchsorted(bounds, start) + 1)])
        yield start, np.asarray(small[start:stop].compute())
        start = stop


def _sample(ds: xr.Dataset, small: Any, classes: np.ndarray, order: list[str], seed: int) -> tuple[dict, np.ndarray]:
    """One pass over the maps: per class, the usable maps with the CAP smallest seeded keys ({class: (sample
    indices in order, their small maps)}), and which samples are usable at all."""
    keys = np.random.default_rng(seed).random(ds.sizes["sample"])
    kept = {name: (np.zeros(0, np.int64), np.zeros((0, *small.shape[1:]), np.float32)) for name in order}
    usable = np.zeros(ds.sizes["sample"], bool)
    for start, block in _chunks(small):
        idx = np.arange(start, start + len(block))
        usable[idx] = np.isfinite(block).all(axis=(1, 2))
        for name in order:
            here = usable[idx] & (classes[idx] == name)
            if here.any():
                ids, maps = np.concatenate([kept[name][0], idx[here]]), np.concatenate([kept[name][1], block[here]])
                best = np.sort(np.argsort(keys[ids], kind="stable")[:CAP]) if len(ids) > CAP else slice(None)
                kept[name] = (ids[best], maps[best])
    return kept, usable


def _assign(small: Any, classes: np.ndarray, usable: np.ndarray, labels: np.ndarray, clustered: dict,
            size: int) -> None:
    """A second pass for classes of more than CAP maps: each usable map not clustered takes the label of the
    clustered map of its class nearest to it (unit-norm features, as the graph's)."""
    for start, block in _chunks(small):
        idx = np.arange(start, start + len(block))
        for name, (ids, feats) in clustered.items():
            rest = np.flatnonzero(usable[idx] & (classes[idx] == name) & (labels[idx] < 0))
            height = max(1, spray.SLAB // max(len(ids), 1))  # distances held at once: about spray.SLAB
            for part in (rest[i:i + height] for i in range(0, len(rest), height)):
                x = spray.features(block[part], size)
                dist = (x * x).sum(1)[:, None] - 2 * x @ feats.T + (feats * feats).sum(1)[None]
                labels[idx[part]] = labels[ids][np.argmin(dist, axis=1)]


def compute(store: str, method: str, **params: Any) -> dict[str, Any]:
    """Cluster `method`'s maps in every true class and write them into the store; returns the record."""
    ds = storage.open_dataset(store)
    full = _check(ds, method, params)
    small = small_maps(ds, method, full["size"])
    classes, _, order = true_classes(ds)
    kept, usable = _sample(ds, small, classes, order, full["seed"])
    labels = np.full(ds.sizes["sample"], -1, np.int64)
    model_classes = [str(c) for c in ds["class"].values]
    gaps, sampled = np.full(len(model_classes), np.nan), {}
    for name in order:
        ids, maps = kept[name]
        if not len(ids):
            continue
        found = spray.analyse(maps, size=full["size"], neighbours=full["neighbours"],
                              max_clusters=full["max_clusters"], clusters=full["clusters"], seed=full["seed"])
        labels[ids] = found.labels
        if name in model_classes:
            gaps[model_classes.index(name)] = found.eigengap
        if (usable & (classes == name)).sum() > len(ids):
            sampled[name] = (ids, found.features)
    if sampled:
        _assign(small, classes, usable, labels, sampled, full["size"])
    record = {**full, "samples": int(ds.sizes["sample"]), "maps": int(usable.sum())}
    storage.Store(store).write_clusters(method, labels, gaps, record)
    return record


def _check_classes(ds: xr.Dataset, only: Sequence[str] | None) -> list[str]:
    """The true classes to show: `only`, each checked to be one of the study's, or all of them."""
    _, _, order = true_classes(ds)
    unknown = sorted(set(only or []) - set(order))
    if unknown:
        raise ValueError(f"--class {', '.join(unknown)} is not a class of this study; it has {', '.join(order)}")
    return list(only or order)


def ensure(store: str, method: str, recompute: bool = False, only: Sequence[str] | None = None,
           **params: Any) -> dict[str, Any]:
    """The stored clusters' record when they match `params` and the store as it is now, else `compute`
    (`only`: the classes the caller will show, checked before any work)."""
    ds = storage.open_dataset(store)
    full = _check(ds, method, params)
    _check_classes(ds, only)
    stored = storage.Store(store, mode="r").cluster_params().get(method)
    if "failure" in ds:  # usable maps from the small failure codes, not by reading every map
        usable = int((ds.failure.sel(xai_method=method) == 0).sum())
    else:
        usable = int(np.isfinite(ds.attribution.sel(xai_method=method).isel(y=0, x=0)).sum())
    expected = {**full, "samples": int(ds.sizes["sample"]), "maps": usable}
    if not recompute and stored == expected:
        return stored
    with storage.claim(store, ("clusters", method), wait=True):
        return compute(store, method, **params)


def cluster_table(store: str, method: str, only: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """``{class: [{"cluster", "size", "sample_ids", "accuracy", "scores", "eigengap"}, ...]}`` from the stored
    clusters, largest first; `scores`: the mean of each stored metric over the cluster's maps."""
    ds = storage.open_dataset(store)
    if method not in storage.Store(store, mode="r").cluster_params():
        raise ValueError(f"{method} has no clusters in {store} yet: run `saliency-atlas clusters {store} --method {method}`")
    classes, correct, _ = true_classes(ds)
    shown = _check_classes(ds, only)
    labels = ds.cluster.sel(xai_method=method).values
    ids = ds.sample_id.values
    model_classes = [str(c) for c in ds["class"].values]
    gaps = ds.eigengap.sel(xai_method=method).values
    scores = ds.score.sel(xai_method=method).compute() if "score" in ds else None
    out: dict[str, list[dict[str, Any]]] = {}
    for name in shown:
        gap = float(gaps[model_classes.index(name)]) if name in model_classes else float("nan")
        rows = []
        for k in sorted(set(labels[(classes == name) & (labels >= 0)].tolist())):
            members = np.flatnonzero((classes == name) & (labels == k))
            right = correct[members]
            rows.append({
                "cluster": int(k), "size": int(members.size), "sample_ids": [str(i) for i in ids[members]],
                "accuracy": None if np.isnan(right).all() else round(float(np.nanmean(right)), 4),
                "scores": {} if scores is None else {
                    str(metric): finite_mean(scores.sel(metric=metric).values[members]) for metric in scores.metric.values},
                "eigengap": None if np.isnan(gap) else round(gap, 4),
            })
        out[name] = rows
    return out


def _nearest(ds: xr.Dataset, method: str, size: int, members: np.ndarray, count: int) -> np.ndarray:
    """The `count` members (of the first CAP) whose unit-norm downsampled maps lie nearest their cluster's mean."""
    members = members[:CAP]
    x = spray.features(np.asarray(small_maps(ds, method, size, members).compute()), size)
    return members[np.argsort(((x - x.mean(0)) ** 2).sum(1), kind="stable")[:count]]


def render_clusters(store: str, method: str, out: str, only: Sequence[str] | None = None, nearest: int = 4) -> str:
    """One row per (class, cluster): the cluster's mean map, then its `nearest` most typical samples."""
    ds = storage.open_dataset(store)
    params = storage.Store(store, mode="r").cluster_params()[method]
    found = cluster_table(store, method, only)
    classes, _, _ = true_classes(ds)
    labels = ds.cluster.sel(xai_method=method).values
    rows = [(name, c) for name, clusters in found.items() for c in clusters]
    if not rows:
        raise ValueError(f"{method} has no clustered maps to draw")
    fig, axes = plt.subplots(len(rows), 1 + nearest, figsize=(1.7 * (1 + nearest), 1.8 * len(rows)), squeeze=False)
    mean_, std_ = ds.attrs["image_mean"], ds.attrs["image_std"]
    for r, (name, c) in enumerate(rows):
        members = np.flatnonzero((classes == name) & (labels == c["cluster"]))
        average = ds.attribution.sel(xai_method=method).isel(sample=members).mean("sample").values
        style = heatmap_style(method, average)
        im = axes[r, 0].imshow(average, cmap=style.cmap, vmin=style.low, vmax=style.high)
        fig.colorbar(im, ax=axes[r, 0], fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
        scores = [f"{k} {v:.2f}" for k, v in c["scores"].items() if v is not None][:2]
        axes[r, 0].set_title(f"{name}: cluster {c['cluster']} ({c['size']} maps)\n"
                             + ", ".join([f"accuracy {c['accuracy']}", *scores]), fontsize=5.5)
        for j, s in enumerate(_nearest(ds, method, params["size"], members, nearest), start=1):
            sample = ds.isel(sample=int(s))
            m = sample.attribution.sel(xai_method=method).values
            if "image" in sample:
                axes[r, j].imshow(_display_image(sample.image.values, mean_, std_))
            style = heatmap_style(method, m)
            axes[r, j].imshow(m, cmap=style.cmap, vmin=style.low, vmax=style.high, alpha=0.55)
            axes[r, j].set_title(str(sample.sample_id.values), fontsize=6)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
    fig.suptitle(f"SpRAy clusters of {method} maps per true class: mean map (own colour bar) and the most "
                 f"typical samples", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / len(rows)))
    return save(fig, out)


@task(cache_policy=NO_CACHE)
def cluster_task(store: str, method: str, **params: Any) -> dict[str, Any]:
    """Prefect task around `ensure` (the audit's)."""
    return ensure(store, method, **params)


def strategy_rows(found: dict[str, list[dict[str, Any]]], method: str, measure: str) -> list[dict[str, Any]]:
    """Per class, the cluster whose maps put the most attribution where `measure` (a share, e.g.
    region_share) looks, beside the class's mean: a strategy only some images of a class use."""
    rows = []
    for name, clusters in found.items():
        scored = [c for c in clusters if c["scores"].get(measure) is not None]
        if not scored:
            continue
        top = max(scored, key=lambda c: c["scores"][measure])
        total = sum(c["size"] for c in scored)
        rows.append({"xai_method": method, "class": name, "clusters": len(clusters), "cluster": top["cluster"],
                     "size": top["size"], "of": total, measure: top["scores"][measure],
                     "class_mean": round(sum(c["scores"][measure] * c["size"] for c in scored) / total, 4),
                     "eigengap": top["eigengap"], "sample_ids": top["sample_ids"][:5]})
    return rows
