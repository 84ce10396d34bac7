"""Do the metrics agree? Kendall's tau between two metrics' orderings of the methods (with a bootstrap interval
over images), and, within each method, the Spearman correlation of two metrics over images."""
from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from .scores import Oriented, means


def tau_b(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between the last axes of `a` and `b` (..., methods): the pairs' signs agree, ties count
    as neither (as scipy.stats.kendalltau's default); NaN where either side ties everything."""
    i, j = np.triu_indices(a.shape[-1], 1)
    sa, sb = np.sign(a[..., i] - a[..., j]), np.sign(b[..., i] - b[..., j])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sa * sb).sum(-1) / np.sqrt((sa * sa).sum(-1) * (sb * sb).sum(-1))


def metric_agreement(o: Oriented, boot: np.ndarray, level: float = 0.95) -> dict[str, dict[str, Any]]:
    """{"a|b": {"tau", "low", "high"}} for every pair of metrics: tau between the methods' mean scores on the
    two metrics (each over the images every method scored on it; both oriented so that higher is better), and
    its percentile interval over the bootstrap resamples `boot` (`scores.boot_means`: the same images resampled
    for both). None where a metric ties every method or scored no image."""
    point, out = means(o), {}
    for (i, a), (j, b) in combinations(enumerate(o.metrics), 2):
        drawn = tau_b(boot[:, :, i], boot[:, :, j])
        drawn = drawn[np.isfinite(drawn)]
        low, high = np.percentile(drawn, [50 * (1 - level), 50 * (1 + level)]) if drawn.size else (np.nan, np.nan)
        out[f"{a}|{b}"] = {"tau": _num(tau_b(point[:, i], point[:, j])), "low": _num(low), "high": _num(high)}
    return out


def image_correlation(o: Oriented) -> dict[str, dict[str, float | None]]:
    """{"a|b": {method: Spearman's rho of a and b over the images both scored}}: do two metrics call the same
    images good for one method?"""
    from scipy.stats import spearmanr

    out: dict[str, dict[str, float | None]] = {}
    for a, b in combinations(o.metrics, 2):
        out[f"{a}|{b}"] = {}
        for i, m in enumerate(o.methods):
            xa, xb = o.metric(a)[i], o.metric(b)[i]
            both = np.isfinite(xa) & np.isfinite(xb)
            rho = spearmanr(xa[both], xb[both]).statistic if both.sum() > 2 and np.ptp(xa[both]) and np.ptp(xb[both]) else np.nan
            out[f"{a}|{b}"][m] = _num(rho)
    return out


def _num(x: Any) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)
