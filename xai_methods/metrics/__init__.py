"""Evaluation metrics for attribution maps, in pure PyTorch (no Prefect, no Zarr).

Usage::

    from xai_methods import metrics as xmet
    xmet.available()                     # ['average_drop', 'deletion', ..., 'sparseness']
    xmet.spec("deletion")                # family, defaults, needs a mask / the model / the method, curve or not
    scores = xmet.evaluate("pointing_game", model, images, maps, target, mask=masks)   # (B,) float
    s = xmet.measure("deletion", model, images, maps, target, steps=16)
    s.value, s.status, s.curve          # (B,), (B,) codes of xmet.STATUS, (B, 17)

A score is NaN where it is undefined, and `status` says why (an empty mask, a map with NaN,
no positive mass...). Families: localisation (pointing_game, relevance_mass, relevance_rank,
outside_mask_share), faithfulness (deletion, insertion, average_drop,
increase_in_confidence, road_morf, road_lerf), robustness (max_sensitivity), complexity
(sparseness), audit (region_share). Baseline maps to read a score against chance are
methods of category "baseline": random_map, centre_map, edge_map.
"""
from . import faithfulness, localisation, robustness  # noqa: F401  (registers the metrics)
from ._registry import FAILED_MAP, NOT_COMPUTED, STATUS, MetricSpec, Scores, available, check, evaluate, measure, spec, variants

__all__ = ["FAILED_MAP", "NOT_COMPUTED", "STATUS", "MetricSpec", "Scores", "available", "check", "evaluate", "measure", "spec", "variants"]
