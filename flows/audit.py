"""The ``dataset-audit`` flow: where do a model's explanations look, over a whole dataset?

Meant to run on a schedule (see ``prefect.yaml``) over a folder that grows: it runs the
``study`` flow as a subflow over all of the dataset (a store that already holds earlier
samples is reused, so only what is new is computed), then measures, per sample and
method, which share of the map's *positive* attribution mass falls

- outside the ground-truth object (``outside_mask_share``, when the store has ``mask``),
- inside a box ``region`` given by the user (``region_share``), e.g. a corner where a
  watermark or a scanner's label would sit,

aggregates them per method and per true class, clusters each method's maps per class (SpRAy:
the strategies the model uses), renders a report folder with the browsable atlas, publishes
Prefect artifacts (a markdown summary, a table, the figures inline, the atlas's link) and finally
fails, naming the threshold, the method, the measured value and the limit, when a
limit the user set is crossed. The work is in ``tasks/audit.py``; this flow composes it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

import tasks
from flows.study import study
from tasks.drawing.artifacts import publish_figure
from tasks.audit.clusters import cluster_task, render_clusters, strategy_rows, summarize
from tasks.audit.report import report_task
from tasks.audit.rows import (
    ARTIFACT_KEYS,
    BASELINES,
    audit_limits,
    check_region,
    dataset_has_masks,
    default_report_dir,
    measure,
    render_report,
    samples_before,
    summary_markdown,
    threshold_violations,
    write_summary,
)


@flow(name="dataset-audit")
def dataset_audit(
    dataset: str,
    model: str = "shapes-cnn",
    weights: str | None = None,
    methods: list[str] = ["gradcam", "saliency"],  # noqa: B006 (Prefect reads defaults for the UI form)
    store: str = "runs/audit.zarr",
    block_size: int = 64,
    region: list[int] | None = None,
    max_region_share: float | None = None,
    max_outside_mask_share: float | None = None,
    metrics: list[str] = [],  # noqa: B006
    metric_params: dict[str, dict[str, Any]] | None = None,
    limits: dict[str, dict[str, float]] | None = None,
    per_class: bool = True,
    report_dir: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Audit where the model's explanations look over a whole dataset, and fail on a crossed limit.

    Args:
        dataset: a local folder of class sub-folders of images, or "shapes" (built in, with masks).
        model: "shapes-cnn" (built in) or a torchvision architecture name with `weights`.
        weights: a local state-dict file for a torchvision architecture (never downloaded).
        methods: the attribution methods to audit (the baseline maps are studied beside them, unlimited).
        store: the audit's Zarr store; a later run adds the samples new in the dataset and computes only them.
        block_size: samples per block (the unit of work and of Zarr chunks).
        region: a box [y0, x0, y1, x1] in model-input pixels (end-exclusive), e.g. where a watermark would be.
        max_region_share: fail when a method's mean share of positive attribution inside `region` is above this.
        max_outside_mask_share: fail when a method's mean share of positive attribution outside the
            ground-truth mask is above this (needs a dataset with masks, e.g. "shapes").
        metrics: further evaluation metrics to score and report (see `saliency-atlas metrics`).
        metric_params: their parameters, e.g. {"deletion": {"steps": 16}}.
        limits: limits on any metric, e.g. {"pointing_game": {"min": 0.8}, "deletion": {"max": 0.3}}.
        per_class: every limit holds for each true class as well as for the whole dataset.
        report_dir: where the report files go (default: the store path with .report instead of .zarr).
        workers: run the study's block tasks on a local Dask cluster of this many processes.
    """
    log = get_run_logger()
    if max_region_share is not None and region is None:
        raise ValueError("max_region_share is set but region is not: give region as [y0, x0, y1, x1]")
    bounds = audit_limits(limits, max_region_share, max_outside_mask_share)
    box = check_region(region, tasks.load_model(model, weights, "cpu").preprocess.size)
    masks = dataset_has_masks(dataset, model, weights)
    if max_outside_mask_share is not None and not masks:
        raise ValueError(f"max_outside_mask_share is set but the dataset {dataset!r} has no ground-truth masks "
                         "(a folder of images has none); unset it, or audit a region with max_region_share")
    measured_metrics = [*(["region_share"] if box else []), *(["outside_mask_share"] if masks else []),
                        *[m for m in [*metrics, *bounds] if m not in ("region_share", "outside_mask_share")]]
    params = {**(metric_params or {}), **({"region_share": {"region": list(box)}} if box else {})}
    report_dir = report_dir or default_report_dir(store)

    before = samples_before(store)
    summary = study(dataset=dataset, model=model, methods=methods, samples=None, store=store, weights=weights,
                    block_size=block_size, figure=None, workers=workers,
                    metrics=list(dict.fromkeys(measured_metrics)), metric_params=params)
    computed = dict(summary.get("computed_blocks", {}))
    new_samples = max(0, int(summary.get("samples", before)) - before)
    log.info("study of %s: %d samples, %d new; attribution blocks computed: %s",
             dataset, summary.get("samples", 0), new_samples, computed)

    shown = [*methods, *[b for b in BASELINES if b not in methods]] if measured_metrics else list(methods)
    measured = measure(store, shown, list(dict.fromkeys(measured_metrics)))
    violations = threshold_violations(measured["rows"], bounds, box, per_class)
    files = render_report(store, list(methods), measured, bounds, report_dir,
                          f"{model} on {dataset}: {measured['samples']} samples")
    strategies = []
    for method in methods:  # the strategies of each audited method: SpRAy clusters per class
        cluster_task(store, method)
        files[f"clusters_{method}"] = render_clusters(store, method, os.path.join(report_dir, f"clusters.{method}.png"))
        shown_measure = next((k for k in ("region_share", "outside_mask_share") if k in measured_metrics), None)
        if shown_measure:
            strategies += strategy_rows(summarize(store, method), method, shown_measure)
    files["report"] = report_task(store, report_dir, {m: files[f"clusters_{m}"] for m in methods})
    markdown = summary_markdown(dataset=dataset, model=model, store=store, measured=measured,
                                new_samples=new_samples, computed=computed, region=box, limits=bounds,
                                violations=violations, files=files, per_class=per_class, strategies=strategies)
    files["summary"] = write_summary(markdown, report_dir)

    artifacts = {
        "summary": create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEYS["summary"],
                                            description=f"dataset audit of {dataset} with {model}"),
        "table": create_table_artifact(table=measured["rows"], key=ARTIFACT_KEYS["table"],
                                       description="per method and class: samples, accuracy, metric means"),
        "report": create_link_artifact(link=Path(files["report"]).resolve().as_uri(), key=ARTIFACT_KEYS["report"],
                                       link_text=os.path.abspath(files["report"]),
                                       description="the browsable atlas of the audit: open this file in a browser"),
    }
    titles = {"shares_chart": "attribution shares per method and class", "samples_figure": "samples and their maps",
              **{f"clusters_{m}": f"SpRAy clusters of {m} per class" for m in methods}}
    for name, title in titles.items():
        if name in files:
            artifacts[name] = publish_figure(files[name], ARTIFACT_KEYS.get(name, f"dataset-audit-{name}"), title)
    log.info("audit report in %s; the atlas: %s", report_dir, files["report"])

    result = {
        "store": store, "report_dir": report_dir, "samples": measured["samples"], "new_samples": new_samples,
        "accuracy": measured["accuracy"], "rows": measured["rows"], "files": files,
        "artifacts": {k: str(v) for k, v in artifacts.items()}, "violations": violations, "study": summary,
    }
    if violations:  # after the artifacts, so that the UI shows why the run failed
        raise ValueError("dataset audit failed: " + "; ".join(violations))
    return result
