"""The strategies a model uses: spectral relevance analysis (SpRAy) of a study's stored maps.

For each true class, the maps of one method are clustered by their shape (`xai_methods.spray`);
a class decided in two ways (by the object, or by a watermark only some of its images carry)
splits into two clusters. The maps are read lazily and downsampled by Dask chunk by chunk, so
only (samples x size x size) numbers are ever in memory; the clusters and each class's eigengap
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


def small_maps(ds: xr.Dataset, method: str, size: int) -> np.ndarray:
    """(sample, size, size) area means of `method`'s maps, computed by Dask chunk by chunk, in float32
    (1 KB per map at the default size: all of a study's are held at once; NaN for a map that is NaN
    anywhere: not computed, or failed)."""
    maps = ds.attribution.sel(xai_method=method)
    fy, fx = ds.sizes["y"] // size, ds.sizes["x"] // size
    return maps.coarsen(y=fy, x=fx, boundary="trim").reduce(np.mean).astype(np.float32).values  # NaN stays NaN


def compute(store: str, method: str, **params: Any) -> dict[str, Any]:
    """Cluster `method`'s maps in every true class and write them into the store; returns the record."""
    ds = storage.open_dataset(store)
    full = _check(ds, method, params)
    small = small_maps(ds, method, full["size"])
    classes, _, order = true_classes(ds)
    usable = np.isfinite(small).all(axis=(1, 2))
    labels = np.full(ds.sizes["sample"], -1, np.int64)
    model_classes = [str(c) for c in ds["class"].values]
    gaps = np.full(len(model_classes), np.nan)
    for name in order:
        members = np.flatnonzero((classes == name) & usable)
        if not members.size:
            continue
        found = spray.analyse(small[members], size=full["size"], neighbours=full["neighbours"],
                              max_clusters=full["max_clusters"], clusters=full["clusters"], seed=full["seed"])
        labels[members] = found.labels
        if name in model_classes:
            gaps[model_classes.index(name)] = found.eigengap
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


def _nearest(small: np.ndarray, members: np.ndarray, count: int) -> np.ndarray:
    """The `count` members whose unit-norm downsampled maps lie nearest their cluster's mean."""
    x = spray.features(small[members], small.shape[-1])
    return members[np.argsort(((x - x.mean(0)) ** 2).sum(1), kind="stable")[:count]]


def render_clusters(store: str, method: str, out: str, only: Sequence[str] | None = None, nearest: int = 4) -> str:
    """One row per (class, cluster): the cluster's mean map, then its `nearest` most typical samples."""
    ds = storage.open_dataset(store)
    params = storage.Store(store, mode="r").cluster_params()[method]
    found = cluster_table(store, method, only)
    small = small_maps(ds, method, params["size"])
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
        for j, s in enumerate(_nearest(small, members, nearest), start=1):
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
