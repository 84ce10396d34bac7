"""Figures of a study's aggregate (see :mod:`storage.aggregate`): the mean map per class
and method, and the mean map of correct vs incorrect predictions."""
from __future__ import annotations

import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

import storage  # noqa: E402

from .figure import heatmap_style, save  # noqa: E402


def correct_path(out_png: str) -> str:
    """``means.png`` -> ``means.correct.png``: where the correct-vs-incorrect figure goes."""
    stem, ext = os.path.splitext(out_png)
    return f"{stem}.correct{ext or '.png'}"


def _grid(rows: list[tuple[str, xr.DataArray, xr.DataArray]], methods: list[str], title: str, out: str) -> str:
    """One image per (row, method); ``rows`` are (label, maps (xai_method, y, x), counts (xai_method))."""
    n_rows, n_cols = len(rows), len(methods)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols + 0.6, 1.8 * n_rows + 1.0),
                             squeeze=False, layout="constrained")
    for c, method in enumerate(methods):
        column = np.stack([maps.sel(xai_method=method).values for _, maps, _ in rows]).astype(np.float32)
        style = heatmap_style(method, column)  # one colour scale per method, shared down the column
        cm = plt.get_cmap(style.cmap).with_extremes(bad="0.85")  # no data: light grey
        for r, (label, _, counts) in enumerate(rows):
            ax = axes[r, c]
            im = ax.imshow(column[r], cmap=cm, vmin=style.low, vmax=style.high, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.02, 0.02, f"n={int(counts.sel(xai_method=method))}", transform=ax.transAxes,
                    fontsize=6, color="black", backgroundcolor=(1, 1, 1, 0.6))
            if r == 0:
                ax.set_title(method, fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
        fig.colorbar(im, ax=axes[:, c], orientation="horizontal", fraction=0.05 if n_rows > 2 else 0.08,
                     aspect=15).ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=8)
    return save(fig, out)


def plot_means(agg: xr.Dataset, out_png: str, methods: Sequence[str] | None = None,
               max_classes: int = 24) -> list[str]:
    """Draw the aggregate ``agg`` (from :func:`storage.aggregate`, or ``xr.open_zarr`` of its
    store): rows = classes, columns = methods, each cell the mean map over the counted samples
    of that class, one colour scale and colour bar per method (signed maps diverge around 0).
    When some predictions are wrong, a second file (``<out>.correct.png``) shows the mean map
    of correct vs incorrect predictions.  Returns the paths written."""
    names = [str(m) for m in agg.xai_method.values]
    methods = list(methods or names)
    missing = [m for m in methods if m not in names]
    if missing:
        raise ValueError(f"methods {missing} are not in the aggregate; it has {names}")
    by = agg.attrs.get("grouped_by", "label")
    counts = agg.map_count.sel(xai_method=methods)
    classes = [str(c) for c in agg["class"].values]
    order = np.argsort(-counts.sum("xai_method").values, kind="stable")[:max_classes]  # most frequent first
    shown = sorted(order)  # but in the study's class order
    rows = [(classes[k], agg.map_mean.isel({"class": k}), agg.map_count.isel({"class": k})) for k in shown]
    more = f" ({len(shown)} of {len(classes)} classes, the most frequent)" if len(shown) < len(classes) else ""
    study = os.path.basename(str(agg.attrs.get("aggregate_of", "")))
    title = (f"{agg.attrs.get('model', '?')} on {agg.attrs.get('dataset', '?')} {study}: "
             f"mean attribution map per {by} class{more}; n = maps counted")
    written = [_grid(rows, methods, title, out_png)]

    if "map_mean_by_correct" in agg and int(agg.map_count_by_correct.sel(correct=False, xai_method=methods).sum()) > 0:
        rows = [(f"{name}", agg.map_mean_by_correct.sel(correct=flag), agg.map_count_by_correct.sel(correct=flag))
                for name, flag in (("correct", True), ("incorrect", False))]
        title = (f"{agg.attrs.get('model', '?')} on {agg.attrs.get('dataset', '?')} {study}: "
                 "mean attribution map of correct vs incorrect predictions")
        written.append(_grid(rows, methods, title, correct_path(out_png)))
    return written


@task(cache_policy=NO_CACHE)
def aggregate_study(store: str, out: str | None = None, plot: str | None = None, by: str = "label") -> dict[str, Any]:
    """Prefect task: aggregate the study at ``store`` into ``out`` and, if asked, plot it.
    Returns where things went."""
    out = out or storage.default_out(store)
    agg = storage.aggregate(store, out, by=by)
    result: dict[str, Any] = {"aggregate": out}
    if plot:
        result["plots"] = plot_means(agg, plot)
    return result
