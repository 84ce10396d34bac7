"""The hand-off of every meta-evaluation: a study's scores as one array, oriented so that higher is better."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from xai_methods import catalogue


@dataclass(frozen=True)
class Oriented:
    """Scores (xai_method, sample, metric), float64, NaN where undefined or not computed; a metric where lower is
    better is negated, so that higher is better everywhere (`higher_is_better` keeps the stored sense)."""

    values: np.ndarray
    methods: list[str]
    metrics: list[str]
    families: dict[str, str]  # metric -> its family (localisation, faithfulness...)
    higher_is_better: dict[str, bool]

    def metric(self, name: str) -> np.ndarray:
        """(xai_method, sample) of one metric."""
        return self.values[:, :, self.metrics.index(name)]

    def complete(self, name: str) -> np.ndarray:
        """(complete images, xai_method): the images every method of `name` has a finite score on."""
        m = self.metric(name).T
        return m[np.isfinite(m).all(axis=1)]


def oriented(ds: Any, metrics: Sequence[str] | None = None) -> Oriented:
    """The `Oriented` scores of a study's `xarray.Dataset` (its `score`), of `metrics` (None: all of them)."""
    if "score" not in ds:
        raise ValueError("this study has no scores yet: evaluate it with metrics first (saliency-atlas evaluate)")
    stored = [str(k) for k in ds.metric.values]
    chosen = list(metrics or stored)
    missing = [k for k in chosen if k not in stored]
    if missing:
        raise ValueError(f"metric(s) {missing} are not scored in this study; it has {', '.join(stored)}")
    rows = {k: catalogue.metric(k) for k in chosen}  # a variant: its base's row
    score = ds["score"].sel(metric=chosen).transpose("xai_method", "sample", "metric").values.astype(np.float64)
    sign = np.array([1.0 if rows[k]["higher_is_better"] else -1.0 for k in chosen])
    return Oriented(score * sign, [str(m) for m in ds.xai_method.values], chosen,
                    {k: rows[k]["family"] for k in chosen}, {k: rows[k]["higher_is_better"] for k in chosen})


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks of finite values along the last axis: 1 = the highest, ties sharing their mean rank."""
    from scipy.stats import rankdata

    return rankdata(-values, axis=-1, method="average")


def means(o: Oriented) -> np.ndarray:
    """(xai_method, metric) means, each metric's over the images every method scored on it (NaN: none)."""
    complete = np.isfinite(o.values).all(axis=0)  # (sample, metric)
    with np.errstate(invalid="ignore"):
        return np.where(complete[None], o.values, 0.0).sum(1) / complete.sum(0)


def boot_means(o: Oriented, n_boot: int = 1000, seed: int = 0, chunk: int | None = None) -> np.ndarray:
    """(resample, xai_method, metric): `means` of `n_boot` seeded bootstrap resamples of the images (the same
    resamples for every metric, so two metrics' rankings vary together). A resample is its images' counts, and
    its means a product of those counts with the scores: memory of `chunk` resamples at a time, any image count.
    Past `BOOTSTRAP_MAX` images, draws from the normal distribution of the means instead (`normal_means`)."""
    from storage.scores import BOOTSTRAP_MAX

    n_methods, n, k = o.values.shape
    if n > BOOTSTRAP_MAX:
        return normal_means(o, n_boot, seed)
    chunk = chunk or max(1, min(50, 2**23 // max(n, 1)))  # about 64 MB of counts per chunk
    complete = np.isfinite(o.values).all(axis=0).astype(np.float64)  # (sample, metric)
    x = np.where(complete[None] > 0, o.values, 0.0).transpose(1, 0, 2).reshape(n, n_methods * k)
    rng, out = np.random.default_rng(seed), []
    for start in range(0, n_boot, chunk):
        c = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(c, n)) + np.arange(c)[:, None] * n
        counts = np.bincount(idx.ravel(), minlength=c * n).reshape(c, n).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append((counts @ x).reshape(c, n_methods, k) / (counts @ complete)[:, None, :])
    return np.concatenate(out) if out else np.empty((0, n_methods, k))


def normal_means(o: Oriented, n_draws: int = 1000, seed: int = 0) -> np.ndarray:
    """(draw, xai_method, metric): seeded draws of `means` from their joint normal distribution, what the
    bootstrap's distribution of the means is past `storage.scores.BOOTSTRAP_MAX` images (as `storage.interval`
    takes it; tested against the bootstrap), at a cost of one pass over the scores instead of one per resample.
    The covariance of two means is the sum over the images both count of the products of their deviations,
    over the product of their counts (each metric's means are over its own complete images)."""
    n_methods, n, k = o.values.shape
    complete = np.isfinite(o.values).all(axis=0)  # (sample, metric)
    centre = means(o)
    deviations = np.where(complete[None], o.values - centre[:, None, :], 0.0).transpose(1, 0, 2).reshape(n, -1)
    counts = np.broadcast_to(complete.sum(0), (n_methods, k)).reshape(-1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = (deviations.T @ deviations) / np.outer(counts, counts)
    cov = np.nan_to_num(cov)
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    root = vectors * np.sqrt(np.clip(values, 0, None))
    draws = np.random.default_rng(seed).standard_normal((n_draws, len(cov))) @ root.T
    return centre[None] + draws.reshape(n_draws, n_methods, k)
