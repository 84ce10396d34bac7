"""Is a metric resilient to what should not change its scores, and reactive to what should? MetaQuantus's
meta-consistency (Hedström et al., TMLR 2023), over the scores the `resilience` protocol stores: a metric's
scores of the original maps against its scores after a minor perturbation (small input noise, a tiny weight
perturbation that keeps the predictions) and after a disruptive one (a randomised model, maps shuffled across
images).

Per perturbation family (input: noise against shuffled maps; model: weight noise against a random model):

- IAC_NR (intra-consistency, noise resilience): the Wilcoxon signed-rank p-value of each method's original
  against its perturbed scores (two-sided, zero differences split), averaged over methods and draws: high when a
  minor perturbation leaves the scores where they were.
- IAC_AR (adversary reactivity): 1 - that p-value under the disruptive perturbation: high when they move.
- IEC_NR (inter-consistency): the share of (image, place) at which the methods' order by score is the same after
  a minor perturbation: the ranking survives.
- IEC_AR: the share of (method, image) whose score gets worse under the disruptive perturbation.
- MC: the mean of the four, in [0, 1]; the metric's MC is the mean over the families.

Only images whose top-1 class a minor perturbation keeps count for it (`kept`); every image counts for a
disruptive one, scored by the original model.
"""
from __future__ import annotations

from typing import Any

import numpy as np

MINOR = ("input_noise", "weight_noise")
DISRUPTIVE = ("random_model", "shuffled_maps")
FAMILIES = {"input": ("input_noise", "shuffled_maps"), "model": ("weight_noise", "random_model")}
CRITERIA = ("IAC_NR", "IAC_AR", "IEC_NR", "IEC_AR")


def wilcoxon_p(q: np.ndarray, q_hat: np.ndarray) -> float:
    """The two-sided Wilcoxon signed-rank p-value of paired scores (NaN pairs left out, zero differences split
    between the signs); 1.0 when nothing differs (no evidence of a change), NaN with no pair."""
    from scipy.stats import wilcoxon

    both = np.isfinite(q) & np.isfinite(q_hat)
    if not both.any():
        return float("nan")
    d = q_hat[both] - q[both]
    if not d.any():
        return 1.0
    return float(wilcoxon(q[both], q_hat[both], zero_method="zsplit").pvalue)


def order_kept(q: np.ndarray, q_hat: np.ndarray) -> float:
    """IEC_NR of one draw: (methods, images) scores before and after; the share of (image, place) where the
    methods sorted by score (stable) are the same, over the images every method scored both times."""
    both = np.isfinite(q).all(0) & np.isfinite(q_hat).all(0)
    if not both.any():
        return float("nan")
    a, b = np.argsort(q[:, both], axis=0, kind="stable"), np.argsort(q_hat[:, both], axis=0, kind="stable")
    return float((a == b).mean())


def got_worse(q: np.ndarray, q_hat: np.ndarray, higher_is_better: bool) -> float:
    """IEC_AR of one draw: the share of (method, image) pairs, both finite, whose perturbed score is worse."""
    both = np.isfinite(q) & np.isfinite(q_hat)
    if not both.any():
        return float("nan")
    worse = q_hat < q if higher_is_better else q_hat > q
    return float(worse[both].mean())


def criteria(original: np.ndarray, minor: np.ndarray, kept: np.ndarray, disruptive: np.ndarray,
             higher_is_better: bool) -> dict[str, float | None]:
    """The four criteria and MC of one metric and one family: `original` (methods, images); `minor` and
    `disruptive` (draws, methods, images); `kept` (draws, images): the images a minor draw counts."""
    masked = np.where(kept[:, None, :], minor, np.nan)
    iac_nr = [wilcoxon_p(original[m], masked[k, m]) for k in range(len(minor)) for m in range(len(original))]
    iac_ar = [1 - wilcoxon_p(original[m], disruptive[k, m]) for k in range(len(disruptive)) for m in range(len(original))]
    values = {"IAC_NR": _mean(iac_nr), "IAC_AR": _mean(iac_ar),
              "IEC_NR": _mean([order_kept(original, d) for d in masked]),
              "IEC_AR": _mean([got_worse(original, d, higher_is_better) for d in disruptive])}
    known = [v for v in values.values() if v is not None]
    return {**values, "MC": round(float(np.mean(known)), 4) if len(known) == len(CRITERIA) else None}


def meta_consistency(original: np.ndarray, perturbed: np.ndarray, kept: np.ndarray, tests: list[str],
                     metrics: list[str], higher_is_better: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """{metric: {"input": criteria, "model": criteria, "MC": mean of the families' MC}} from the protocol's
    arrays: `original` (methods, metrics, images), `perturbed` (tests, draws, methods, metrics, images), `kept`
    (tests, draws, images), `tests` naming the first axis."""
    out: dict[str, dict[str, Any]] = {}
    for j, k in enumerate(metrics):
        fams = {}
        for family, (minor, disruptive) in FAMILIES.items():
            a, b = tests.index(minor), tests.index(disruptive)
            fams[family] = criteria(original[:, j], perturbed[a, :, :, j], kept[a], perturbed[b, :, :, j],
                                    higher_is_better[k])
        mcs = [f["MC"] for f in fams.values() if f["MC"] is not None]
        out[k] = {**fams, "MC": round(float(np.mean(mcs)), 4) if len(mcs) == len(fams) else None}
    return out


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return round(float(np.mean(finite)), 4) if finite else None
