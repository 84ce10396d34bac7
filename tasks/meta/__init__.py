"""Meta-evaluation: which method, and which metric, to believe (issue 35). Pure functions over a study's stored
scores (an `xarray.Dataset`), recomputed on demand so they are never stale: rankings with their uncertainty
(`ranking`), the metrics' agreement (`agreement`) and their reliability (`reliability`), handed the scores once
oriented (`scores.oriented`). `rank` gathers them as `saliency-atlas rank --json` prints them."""
from __future__ import annotations

from typing import Any, Sequence

from xai_methods import variants

from .agreement import image_correlation, metric_agreement, tau_b
from .ranking import ALPHA, beats_random, consensus, groups, metric_ranking, nemenyi
from .reliability import RELIABLE, TENTATIVE, internal_consistency, krippendorff_alpha, metric_reliability, raters_alpha, verdict
from .scores import Oriented, boot_means, means, oriented
from .shift import group_shift


def rank(ds: Any, metrics: Sequence[str] | None = None, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The meta-evaluation of a study's scores: the object `saliency-atlas rank --json` prints (its keys are a
    contract: `ranking`, `groups`, `consensus`, `agreement`, `reliability`, `beats_random`; `tests` says which
    test made each metric's groups, at level `ALPHA`)."""
    stored = [str(k) for k in ds.metric.values] if "metric" in ds.coords else []
    o = oriented(ds, metrics or [k for k in stored if not variants.is_variant(k)] or None)
    found, boot = {k: groups(o, k) for k in o.metrics}, boot_means(o, n_boot, seed)
    reliability = metric_reliability(o)
    for k in o.metrics:  # the variants stored beside a metric (`evaluate --variants`): its internal consistency
        own = [v for v in stored if variants.is_variant(v) and variants.base(v) == k and v not in o.metrics]
        if own:
            ov = oriented(ds, [k, *own])
            reliability[k]["internal"] = internal_consistency(ov, boot_means(ov, n_boot, seed))
    return {
        "ranking": {k: metric_ranking(o, k, boot) for k in o.metrics},
        "groups": {k: g["groups"] for k, g in found.items()},
        "consensus": consensus(o),
        "agreement": metric_agreement(o, boot),
        "reliability": reliability,
        "beats_random": {k: beats_random(o, k, n_boot, seed) for k in o.metrics},
        "tests": {k: {"test": g["test"], "p": g["p"], "level": ALPHA} for k, g in found.items()},
    }


def trust(r: dict[str, Any]) -> list[str]:
    """How far to trust a table of scores, in a few lines, from the meta-evaluation `r` (`rank`): what `evaluate`
    prints after its table and the report shows beside it."""
    lines = ["how far to trust this table (`saliency-atlas rank STORE` has the whole of it):"]
    for k, rel in r["reliability"].items():
        alpha = "" if rel["alpha"] is None else f", Krippendorff's alpha {rel['alpha']:.2f}"
        flagged = [m for m, beats in r["beats_random"][k].items() if beats is False]
        tied = [g for g in r["groups"][k] if len(g) > 1]
        internal = rel.get("internal")
        lines.append(f"  {k}: {rel['verdict']}{alpha}"
                     + ("" if internal is None else f"; over its {len(internal['variants'])} parameter variants: "
                        f"{internal['verdict']} (alpha {_alpha(internal['alpha'])})")
                     + (f"; not above random_map: {', '.join(flagged)}" if flagged else "")
                     + (f"; cannot be told apart: {' / '.join('{' + ', '.join(g) + '}' for g in tied)}" if tied else ""))
    taus = [a["tau"] for a in r["agreement"].values() if a["tau"] is not None]
    if taus:
        lines.append(f"  the metrics order the methods alike at a mean Kendall tau of {sum(taus) / len(taus):+.2f} "
                     f"over {len(taus)} pair(s) (1: the same order, 0: unrelated, -1: reversed)")
    return lines


def _alpha(a: float | None) -> str:
    return "-" if a is None else f"{a:.2f}"


__all__ = ["ALPHA", "Oriented", "RELIABLE", "TENTATIVE", "beats_random", "boot_means", "means", "consensus", "group_shift", "groups", "image_correlation",
           "internal_consistency", "krippendorff_alpha", "metric_agreement", "metric_ranking", "metric_reliability", "nemenyi", "oriented",
           "raters_alpha", "rank", "tau_b", "trust", "verdict"]
