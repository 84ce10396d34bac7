"""`AuditSpec`: what a user asks of a dataset audit, the parameters of the ``dataset-audit`` flow (and its
form in the Prefect UI). The model, its preprocessing, the data and the device are `RunSpec`'s, as a
study's and a protocol's are."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import RunSpec, option


@dataclass(frozen=True)
class AuditSpec(RunSpec):
    """Where do a model's explanations look over a whole dataset, and which limit do they cross?"""

    methods: list[str] = option(["gradcam", "saliency"], "the attribution methods to audit (the baseline maps are "
                                                         "studied beside them, unlimited)", type="names")
    store: str = option("runs/audit.zarr", "the audit's Zarr store; a later run adds the samples new in the dataset "
                                           "and computes only them")
    block_size: int = option(64, "samples per block (the unit of work and of Zarr chunks)")
    region: list[int] | None = option(None, "a box [y0, x0, y1, x1] in model-input pixels (end-exclusive), e.g. "
                                            "where a watermark would be", type="ints")
    max_region_share: float | None = option(None, "fail when a method's mean share of positive attribution inside "
                                                  "`region` is above this", type="float")
    max_outside_mask_share: float | None = option(None, "fail when a method's mean share of positive attribution "
                                                        "outside the ground-truth mask is above this (needs a dataset "
                                                        "with masks, e.g. shapes)", type="float")
    metrics: list[str] = option([], "further evaluation metrics to score and report (see `saliency-atlas metrics`)",
                                type="names")
    metric_params: dict[str, dict[str, Any]] | None = option(None, "their parameters, e.g. {\"deletion\": "
                                                                   "{\"steps\": 16}}", flag="--metric-param",
                                                             type="param")
    limits: dict[str, dict[str, float]] | None = option(None, "limits on any metric, e.g. {\"pointing_game\": "
                                                              "{\"min\": 0.8}, \"deletion\": {\"max\": 0.3}}")
    per_class: bool = option(True, "every limit holds for each true class as well as for the whole dataset")
    report_dir: str | None = option(None, "where the report files go (default: the store path with .report "
                                          "instead of .zarr)")
