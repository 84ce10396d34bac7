"""Figures of a study's evaluation: the deletion / insertion / ROAD curves per method (mean and
the band between the 25th and 75th percentiles), and the score distributions per method and class."""
from __future__ import annotations

import json
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from xai_methods import metrics as xmet  # noqa: E402

from .figure import save  # noqa: E402
from ..study.spec import BASELINE_MAPS  # noqa: E402


def _methods(ds: xr.Dataset) -> list[str]:
    return [str(m) for m in ds.xai_method.values if str(m)]


def curve_axis(metric: str, params: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The x values of a metric's curve and their label."""
    if "fractions" in params:
        return np.asarray(params["fractions"], float), "fraction of pixels imputed"
    points = xmet.spec(metric).points(params)
    return np.linspace(0, 1, points), "fraction of pixels " + ("deleted" if metric == "deletion" else "inserted")


def plot_curves(ds: xr.Dataset, out: str) -> str | None:
    """One panel per curve metric of the study; None when it has none."""
    params = json.loads(ds.attrs.get("metric_params", "{}"))
    metrics = [str(k) for k in ds.metric.values if str(k) in params and xmet.spec(str(k)).curve]
    if not metrics or "curve" not in ds:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        x, label = curve_axis(metric, params[metric])
        curves = ds.curve.sel(metric=metric).values[..., : len(x)]  # (method, sample, points)
        for m, method in enumerate(_methods(ds)):
            rows = curves[m][np.isfinite(curves[m]).all(1)]
            if not len(rows):
                continue
            style = "--" if method in BASELINE_MAPS else "-"
            ax.plot(x, rows.mean(0), style, label=f"{method} (n={len(rows)})", linewidth=1.4)
            ax.fill_between(x, *np.percentile(rows, [25, 75], axis=0), alpha=0.15)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("target probability", fontsize=8)
        ax.set_title(f"{metric} ({'higher' if xmet.spec(metric).higher_is_better else 'lower'} area is better)",
                     fontsize=9)
        ax.legend(fontsize=6, frameon=False)
    fig.suptitle(f"{ds.attrs.get('model')} on {ds.attrs.get('dataset')}: mean curve, band = 25th-75th percentile",
                 fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def plot_scores(ds: xr.Dataset, out: str) -> str | None:
    """Box plots of every metric's scores per method, for all images and per true class."""
    if "score" not in ds:
        return None
    metrics = [str(k) for k in ds.metric.values if str(k)]
    classes = [str(c) for c in ds["class"].values]
    label = ds.label.values
    groups = [("all", np.ones(len(label), bool))] + [(c, label == i) for i, c in enumerate(classes) if (label == i).any()]
    methods = _methods(ds)
    score = ds.score.transpose("xai_method", "sample", "metric").values
    fig, axes = plt.subplots(len(metrics), len(groups), figsize=(2.2 + 1.9 * len(groups), 1.2 + 2.0 * len(metrics)),
                             squeeze=False, sharey="row")
    for r, metric in enumerate(metrics):
        for c, (group, sel) in enumerate(groups):
            ax = axes[r][c]
            data = [v[np.isfinite(v)] for v in score[: len(methods), sel, r]]
            ax.boxplot([d if len(d) else [np.nan] for d in data], showfliers=False)
            ax.set_xticks(range(1, len(methods) + 1), methods, rotation=60, ha="right", fontsize=6)
            ax.tick_params(axis="y", labelsize=6)
            if r == 0:
                ax.set_title(group, fontsize=8)
            if c == 0:
                ax.set_ylabel(metric, fontsize=8)
    fig.suptitle("score distributions per method and true class", fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def plot_evaluation(ds: xr.Dataset, prefix: str) -> list[str]:
    """Both figures, ``PREFIX.curves.png`` (when there is a curve metric) and ``PREFIX.scores.png``."""
    if "score" not in ds or not ds.sizes.get("metric"):  # a study without metrics
        return []
    made = [plot_curves(ds, f"{prefix}.curves.png"), plot_scores(ds, f"{prefix}.scores.png")]
    return [p for p in made if p]


@task(cache_policy=NO_CACHE)
def render_evaluation(store: str, prefix: str) -> list[str]:
    """Prefect task around `plot_evaluation` for a study's store; returns the figures' paths."""
    import storage

    return plot_evaluation(storage.open_dataset(store), prefix)
