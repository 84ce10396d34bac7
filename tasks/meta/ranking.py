"""Which method is best on a metric, and how sure that is: ranks with bootstrap intervals over images, the
probability of being first, the groups the data cannot tell apart, whether a method beats the random map,
and the consensus across metrics (LATEC's scheme, Klein et al. 2024)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .scores import Oriented, means, ranks

ALPHA = 0.05  # the level of the Friedman and Nemenyi tests (the usual one; stated in every output)


def metric_ranking(o: Oriented, metric: str, boot: np.ndarray, level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Per method: its rank by mean score (1 = best) over the images every method scored, the percentile
    interval of that rank over the bootstrap resamples `boot` (`scores.boot_means`), and the share of resamples
    in which it is first (a tie for first shares it)."""
    k, n = o.metrics.index(metric), int(np.isfinite(o.metric(metric)).all(axis=0).sum())
    if n == 0:
        return {m: {"rank": None, "low": None, "high": None, "p_first": None, "n": 0} for m in o.methods}
    point, drawn = ranks(means(o)[:, k]), ranks(boot[:, :, k])
    best = drawn == drawn.min(axis=1, keepdims=True)
    first = (best / best.sum(axis=1, keepdims=True)).mean(0)
    low, high = np.percentile(drawn, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return {m: {"rank": float(point[i]), "low": float(low[i]), "high": float(high[i]),
                "p_first": round(float(first[i]), 4), "n": n} for i, m in enumerate(o.methods)}


def nemenyi(x: np.ndarray) -> np.ndarray:
    """(methods, methods) p-values of the Nemenyi test after Friedman's, from each image's ranks of the methods
    (x: images x methods): the studentized range of the mean-rank differences (as scikit-posthocs computes)."""
    from scipy.stats import studentized_range

    n, k = x.shape
    mean_ranks = ranks(x).mean(0)
    q = np.abs(mean_ranks[:, None] - mean_ranks[None, :]) / np.sqrt(k * (k + 1) / (6.0 * n))
    p = studentized_range.sf(q * np.sqrt(2.0), k, np.inf)
    np.fill_diagonal(p, 1.0)
    return p


def groups(o: Oriented, metric: str, alpha: float = ALPHA) -> dict[str, Any]:
    """The methods the data cannot tell apart on `metric`: Friedman's test over images, then (if it rejects)
    Nemenyi's pairwise test, which controls the family-wise error over all pairs. Groups are the maximal runs
    of methods, in order of mean rank, whose every pair Nemenyi does not separate at `alpha` (the bars of a
    critical-difference diagram); a method alone is a group of one. Two methods: Wilcoxon's signed-rank test."""
    from scipy.stats import friedmanchisquare, wilcoxon

    x = o.complete(metric)
    k = x.shape[1]
    if len(x) < 2 or k < 2 or np.ptp(x) == 0:
        return {"groups": [list(o.methods)], "test": "none (too few images or identical scores)", "p": None}
    if k == 2:
        d = x[:, 0] - x[:, 1]
        p = 1.0 if not d.any() else float(wilcoxon(d).pvalue)
        order = list(np.argsort(-x.mean(0), kind="stable"))
        split = [[o.methods[i]] for i in order] if p < alpha else [[o.methods[i] for i in order]]
        return {"groups": split, "test": "Wilcoxon signed-rank", "p": p}
    with np.errstate(invalid="ignore", divide="ignore"):  # all ties: NaN, handled below
        p = float(friedmanchisquare(*x.T).pvalue)
    order = list(np.argsort(ranks(x).mean(0), kind="stable"))
    if np.isnan(p):  # every image ties every method: nothing to tell apart
        return {"groups": [[o.methods[i] for i in order]], "test": "Friedman (every image ties every method)", "p": None}
    if not p < alpha:
        return {"groups": [[o.methods[i] for i in order]], "test": "Friedman", "p": p}
    pairs = nemenyi(x)
    runs: list[list[int]] = []
    for start in range(k):
        end = start
        while end + 1 < k and pairs[order[start], order[end + 1]] >= alpha:
            end += 1
        if not runs or end > runs[-1][-1]:
            runs.append(list(range(start, end + 1)))
    return {"groups": [[o.methods[order[i]] for i in run] for run in runs], "test": "Friedman, then Nemenyi",
            "p": p}


def beats_random(o: Oriented, metric: str, n_boot: int = 1000, seed: int = 0) -> dict[str, bool | None]:
    """Per method: True when its mean paired difference from `random_map` on `metric`, oriented so that higher is
    better, has a bootstrap interval above 0; False when it does not; None for random_map itself, or when the
    study has no random_map or no image both scored."""
    from storage.scores import interval

    if "random_map" not in o.methods:
        return {m: None for m in o.methods}
    values, out = o.metric(metric), {}
    chance = values[o.methods.index("random_map")]
    for i, m in enumerate(o.methods):
        both = np.isfinite(values[i]) & np.isfinite(chance)
        if m == "random_map" or not both.any():
            out[m] = None
            continue
        out[m] = bool(interval(values[i][both] - chance[both], n_boot=n_boot, seed=seed)[0] > 0)
    return out


def consensus(o: Oriented) -> dict[str, dict[str, Any]]:
    """Per method: its mean rank over the metrics and the spread (standard deviation) of those ranks, the
    metrics' disagreement about it; and its mean rank within each family. A metric's ranks come from LATEC's
    scheme: its scores over every method and image clipped to their 2.5% and 97.5% quantiles, normalised to
    [0, 1], then each method's median."""
    per_metric: dict[str, np.ndarray] = {}
    for k in o.metrics:
        values = o.metric(k)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            continue
        low, high = np.quantile(finite, [0.025, 0.975])
        scaled = (np.clip(values, low, high) - low) / (high - low if high > low else 1.0)
        medians = np.array([np.nanmedian(row) if np.isfinite(row).any() else -np.inf for row in scaled])
        per_metric[k] = ranks(medians)
    out = {}
    for i, m in enumerate(o.methods):
        own = np.array([r[i] for r in per_metric.values()])
        families = {f: float(np.mean([r[i] for k, r in per_metric.items() if o.families[k] == f]))
                    for f in dict.fromkeys(o.families[k] for k in per_metric)}
        out[m] = {"mean_rank": round(float(own.mean()), 4) if own.size else None,
                  "spread": round(float(own.std()), 4) if own.size else None, "by_family": families}
    return out


__all__ = ["ALPHA", "beats_random", "consensus", "groups", "metric_ranking", "nemenyi"]
