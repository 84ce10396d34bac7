"""Similarity of two maps of the same images (Adebayo et al. 2018's sanity-check measures).

Each measure takes two (B, H, W) arrays and returns (B,) float64, NaN where it is undefined
(a constant map has no ranks to correlate, no structure to compare):

- ``spearman_abs``: Spearman rank correlation of the absolute values (ties share their mean rank).
- ``spearman``: the same on the signed values.
- ``ssim``: structural similarity (scikit-image) of the absolute maps, each scaled to [0, 1]
  by its maximum, data range 1.
- ``hog``: Pearson correlation of the HOG features (scikit-image) of those scaled maps.
- ``pearson``: Pearson correlation of the signed values (the manipulation's target measure).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata
from skimage.feature import hog as _hog
from skimage.metrics import structural_similarity

MEASURES = ("spearman_abs", "spearman", "ssim", "hog")


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1.0), np.nan)


def _flat(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {a.shape}")
    return a.reshape(a.shape[0], -1)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _pearson_rows(_flat(a), _flat(b))


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _pearson_rows(rankdata(_flat(a), axis=1), rankdata(_flat(b), axis=1))


def spearman_abs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return spearman(np.abs(a), np.abs(b))


def _unit(a: np.ndarray) -> np.ndarray:
    """|a| / max |a| per map; NaN for a map without a positive maximum (or with NaN)."""
    a = np.abs(np.asarray(a, dtype=np.float64))
    top = a.reshape(a.shape[0], -1).max(1)[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(top > 0, a / np.where(top > 0, top, 1.0), np.nan)


def _constant(a: np.ndarray) -> bool:
    return not np.isfinite(a).all() or float(a.max() - a.min()) == 0.0


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ua, ub = _unit(a), _unit(b)
    return np.array([np.nan if _constant(x) or _constant(y) else structural_similarity(x, y, data_range=1.0)
                     for x, y in zip(ua, ub)])


def _hog_features(a: np.ndarray) -> np.ndarray:
    cell = max(2, min(a.shape) // 8)  # 8x8 cells whatever the map's size
    return _hog(a, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), feature_vector=True)


def hog(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ua, ub = _unit(a), _unit(b)
    out = []
    for x, y in zip(ua, ub):
        if _constant(x) or _constant(y):
            out.append(np.nan)
            continue
        out.append(_pearson_rows(_hog_features(x)[None], _hog_features(y)[None])[0])
    return np.array(out)


SIMILARITIES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "spearman_abs": spearman_abs, "spearman": spearman, "ssim": ssim, "hog": hog, "pearson": pearson,
}


def similarity(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) similarity `name` of maps `a` and `b` (both (B, H, W)); NaN where undefined."""
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; valid: {', '.join(SIMILARITIES)}")
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"maps to compare must have the same shape, got {a.shape} and {b.shape}")
    return SIMILARITIES[name](a, b)


def similarities(a: np.ndarray, b: np.ndarray, names: tuple[str, ...] = MEASURES) -> np.ndarray:
    """(B, len(names)): every measure of `names`, in that order."""
    return np.stack([similarity(n, a, b) for n in names], axis=1)
