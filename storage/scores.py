"""Reading a study's scores: means with bootstrap intervals, per class, and paired comparisons.

>>> ds = storage.open_dataset("runs/shapes.zarr")
>>> storage.score_table(ds)                                   # one row per (metric, method)
>>> storage.compare(ds, "pointing_game", "gradcam", "saliency")  # paired: the same images

Only finite scores count: a score that is NaN (not computed, or undefined: an empty mask, a map
with NaN...) is left out of the mean and counted under `undefined` with its status codes. The
intervals are percentile bootstraps over images, seeded, so a table is reproducible.
"""
from __future__ import annotations

from statistics import NormalDist
from typing import Any, Sequence

import numpy as np
import xarray as xr

LEVEL = 0.95
BOOTSTRAP_MAX = 10_000  # values past which `interval` is the normal interval of the mean


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement) of `values`, in chunks (bounded memory)."""
    rng = np.random.default_rng(seed)
    out, n = [], len(values)
    for start in range(0, n_boot, 100):
        idx = rng.integers(0, n, size=(min(100, n_boot - start), n), dtype=np.int64)
        out.append(values[idx].mean(1))
    return np.concatenate(out)


def interval(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` (NaN, NaN when empty). Past `BOOTSTRAP_MAX`
    values, the normal interval of the mean (mean +- z s / sqrt(n)): there the bootstrap's distribution of the
    mean is normal within its own resampling error (tested), and resampling costs n x n_boot (a million
    scores: a billion draws per row of the table)."""
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) > BOOTSTRAP_MAX:
        v = np.asarray(values, np.float64)
        half = NormalDist().inv_cdf(0.5 + level / 2) * v.std(ddof=1) / np.sqrt(len(v))
        return float(v.mean() - half), float(v.mean() + half)
    means = _bootstrap_means(np.asarray(values, np.float64), n_boot, seed)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def _scores(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    if "score" not in ds:
        raise ValueError("this study has no scores yet: evaluate it with metrics first")
    score = ds["score"].transpose("xai_method", "sample", "metric")
    status = ds["score_status"].transpose("xai_method", "sample", "metric")
    methods = [str(m) for m in ds.xai_method.values if str(m)]
    metrics = [str(m) for m in ds.metric.values if str(m)]
    return score.values[: len(methods), :, : len(metrics)], status.values[: len(methods), :, : len(metrics)], methods, metrics


def score_table(ds: xr.Dataset, *, by: str | None = None, n_boot: int = 1000, seed: int = 0,
                level: float = LEVEL) -> list[dict[str, Any]]:
    """One row per (metric, method) and, with ``by="label"`` or ``"prediction"``, per class: the number
    of images scored, the mean, its bootstrap interval and the undefined scores by status code."""
    score, status, methods, metrics = _scores(ds)
    groups: list[tuple[str, np.ndarray]] = [("all", np.ones(score.shape[1], bool))]
    if by is not None:
        key, names = ds[by].values, [str(c) for c in ds["class"].values]
        groups += [(names[c], key == c) for c in range(len(names)) if (key == c).any()]
    rows = []
    for k, metric in enumerate(metrics):
        for m, method in enumerate(methods):
            for group, sel in groups:
                v, st = score[m, sel, k], status[m, sel, k]
                finite = v[np.isfinite(v)]
                low, high = interval(finite, n_boot=n_boot, seed=seed, level=level)
                undefined = {int(c): int((st == c).sum()) for c in np.unique(st[~np.isfinite(v) & (st > 0)])}
                rows.append({"metric": metric, "xai_method": method, "class": group, "n": int(len(finite)),
                             "mean": float(finite.mean()) if len(finite) else float("nan"), "low": low, "high": high,
                             "undefined": undefined, "not_computed": int((st < 0).sum())})
    return rows


def means(ds: xr.Dataset) -> dict[str, dict[str, float | None]]:
    """``{metric: {xai_method: mean over the images scored}}`` (None where nothing is scored): `evaluate --json`."""
    out: dict[str, dict[str, float | None]] = {}
    for row in score_table(ds, n_boot=1):
        value = row["mean"]
        out.setdefault(row["metric"], {})[row["xai_method"]] = None if np.isnan(value) else round(value, 6)
    return out


def compare(ds: xr.Dataset, metric: str, a: str, b: str, *, n_boot: int = 1000, seed: int = 0,
            level: float = LEVEL) -> dict[str, Any]:
    """Paired comparison of methods `a` and `b` on `metric` over the images both scored: the mean
    difference a - b, its paired bootstrap interval and the Wilcoxon signed-rank p-value (scipy)."""
    from scipy.stats import wilcoxon  # storage's one use of scipy: the reference implementation of the test

    score, _, methods, metrics = _scores(ds)
    for name, valid in (("metric", metrics), ("method", methods)):
        for value in ([metric] if name == "metric" else [a, b]):
            if value not in valid:
                raise ValueError(f"{name} {value!r} is not in this study; it has {', '.join(valid)}")
    x, y = score[methods.index(a), :, metrics.index(metric)], score[methods.index(b), :, metrics.index(metric)]
    both = np.isfinite(x) & np.isfinite(y)
    d = (x - y)[both].astype(np.float64)
    low, high = interval(d, n_boot=n_boot, seed=seed, level=level)
    p = float("nan") if len(d) == 0 else (1.0 if not d.any() else float(wilcoxon(d).pvalue))
    return {"metric": metric, "a": a, "b": b, "n": int(len(d)), "difference": float(d.mean()) if len(d) else float("nan"),
            "low": low, "high": high, "p": p}


def group_difference(inside: np.ndarray, outside: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                     level: float = LEVEL) -> dict[str, Any]:
    """Two groups of images (not paired): the difference of their mean scores, inside - outside, NaN left out;
    its percentile bootstrap interval (each group resampled on its own; past `BOOTSTRAP_MAX` values in a group,
    the normal interval), and the Mann-Whitney U p-value (scipy)."""
    from scipy.stats import mannwhitneyu

    x, y = (np.asarray(v, np.float64)[np.isfinite(v)] for v in (inside, outside))
    out = {"n_inside": int(len(x)), "n_outside": int(len(y)), "difference": float("nan"), "low": float("nan"),
           "high": float("nan"), "p": float("nan")}
    if len(x) < 2 or len(y) < 2:
        return out
    tail = (1 - level) / 2
    if max(len(x), len(y)) > BOOTSTRAP_MAX:
        half = NormalDist().inv_cdf(1 - tail) * np.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
        low, high = x.mean() - y.mean() - half, x.mean() - y.mean() + half
    else:
        drawn = _bootstrap_means(x, n_boot, seed) - _bootstrap_means(y, n_boot, seed + 1)
        low, high = np.percentile(drawn, [100 * tail, 100 * (1 - tail)])
    p = 1.0 if np.ptp(np.concatenate([x, y])) == 0 else float(mannwhitneyu(x, y).pvalue)
    return {**out, "difference": float(x.mean() - y.mean()), "low": float(low), "high": float(high), "p": p}


def describe_comparison(c: dict[str, Any]) -> str:
    """"gradcam - saliency on pointing_game: +0.182 [0.121, 0.245], p = 3.1e-07 (n = 256)"."""
    return (f"{c['a']} - {c['b']} on {c['metric']}: {c['difference']:+.3f} [{c['low']:.3f}, {c['high']:.3f}], "
            f"p = {c['p']:.2g} (n = {c['n']})")


def comparisons(ds: xr.Dataset, pairs: Sequence[tuple[str, str]], **kwargs: Any) -> list[dict[str, Any]]:
    """`compare` for every metric of the study and each (a, b) of `pairs`."""
    _, _, _, metrics = _scores(ds)
    return [compare(ds, k, a, b, **kwargs) for k in metrics for a, b in pairs]
