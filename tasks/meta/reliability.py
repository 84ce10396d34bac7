"""Can a metric be trusted here? Its reliability as Tomsett et al. (AAAI 2020) measure it, with Krippendorff's
alpha at the interval level: inter-rater (images as raters of the methods: does every image rank the methods
alike?) and inter-method (the metrics of one family as raters of each image's methods)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .scores import Oriented, ranks

# Krippendorff (2004, Content Analysis, 12.4): alpha >= 0.800 supports conclusions; 0.667 <= alpha < 0.800
# tentative ones only; below 0.667 the data do not support conclusions.
RELIABLE, TENTATIVE = 0.800, 0.667


def krippendorff_alpha(data: np.ndarray) -> float:
    """Krippendorff's alpha at the interval level of `data` (raters x units; NaN: no rating). Units rated
    fewer than twice are left out; NaN when the pairable values do not vary."""
    rated = np.isfinite(data)
    m = rated.sum(0)
    keep = m >= 2
    v, m = np.where(rated, data, 0.0)[:, keep], m[keep].astype(np.float64)
    s1, s2 = v.sum(0), (v * v).sum(0)
    n = m.sum()
    if n < 2:
        return float("nan")
    observed = (2 * (m * s2 - s1 * s1) / (m - 1)).sum() / n
    expected = 2 * (n * s2.sum() - s1.sum() ** 2) / (n * (n - 1))
    return float(1 - observed / expected) if expected > 0 else float("nan")


def verdict(alpha: float | None) -> str:
    if alpha is None or not np.isfinite(alpha):
        return "unknown here (too few images scored by every method)"
    if alpha >= RELIABLE:
        return "reliable here"
    return "tentative here" if alpha >= TENTATIVE else "not reliable here"


def raters_alpha(o: Oriented, raters: list[str]) -> float | None:
    """Krippendorff's alpha with the metrics `raters` as raters of every (image, method), each rating an image's
    ranks of the methods, over the images every rater scored for every method (None: no such image)."""
    per_image = [o.metric(k).T for k in raters]  # images x methods, each
    complete = np.logical_and.reduce([np.isfinite(x).all(1) for x in per_image])
    if not complete.sum():
        return None
    return _num(krippendorff_alpha(np.stack([ranks(x[complete]).reshape(-1) for x in per_image])))


def metric_reliability(o: Oriented) -> dict[str, dict[str, Any]]:
    """Per metric: `alpha` (images as raters of the methods, each image's ranks of the methods), its `verdict`,
    `family_alpha` (the metrics of its family as raters of every (image, method), each image's ranks) and the
    images counted."""
    out = {}
    for k in o.metrics:
        x = o.complete(k)
        alpha = krippendorff_alpha(ranks(x)) if len(x) >= 2 and len(o.methods) >= 2 else float("nan")
        family = [f for f in o.metrics if o.families[f] == o.families[k]]
        out[k] = {"alpha": _num(alpha), "verdict": verdict(alpha),
                  "family_alpha": raters_alpha(o, family) if len(family) > 1 else None,
                  "family": o.families[k], "images": int(len(x))}
    return out


def internal_consistency(o: Oriented, boot: np.ndarray) -> dict[str, Any]:
    """Internal consistency (Tomsett et al. 2020) of the metric `o.metrics[0]` over its parameter variants,
    `o.metrics[1:]` (``deletion[substrate=blur]``...): `alpha`, the base and its variants as raters of every
    (image, method) (as `family_alpha`), its `verdict` at the same thresholds, and per variant the Kendall tau
    between its ordering of the methods and the base's (`tau`, `low`, `high`; `boot`: `scores.boot_means` of
    `o`)."""
    from .agreement import metric_agreement

    base, agreed = o.metrics[0], metric_agreement(o, boot)
    alpha = raters_alpha(o, o.metrics)
    return {"alpha": alpha, "verdict": verdict(alpha),
            "variants": {v: agreed[f"{base}|{v}"] for v in o.metrics[1:]}}


def _num(x: float) -> float | None:
    return round(float(x), 4) if np.isfinite(x) else None
