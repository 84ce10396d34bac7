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
limit the user set is crossed. The work is in ``tasks.audit``; this flow composes it, its parameters
the fields of `tasks.audit.spec.AuditSpec` (the UI's form).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

import storage
from tasks import meta
from tasks.audit.clusters import cluster_table, cluster_task, render_clusters, strategy_rows
from tasks.audit.report import report_task
from tasks.audit.rows import (
    ARTIFACT_KEYS,
    BASELINES,
    audit_limits,
    audit_measures,
    check_region,
    dataset_has_masks,
    default_report_dir,
    render_report,
    samples_before,
    summary_markdown,
    threshold_violations,
    write_summary,
)
from tasks.audit.spec import AuditSpec
from tasks.drawing.agreement import plot_agreement, trust_markdown
from tasks.drawing.artifacts import publish_figure
from tasks.loading import model_of
from tasks.spec import RunSpec

from .running import spec_signature
from .study import study


def _checked(spec: AuditSpec) -> dict[str, Any]:
    """The audit's limits, region box, whether the data has masks, and the metrics it measures; refused in
    one line before any work."""
    if spec.max_region_share is not None and spec.region is None:
        raise ValueError("max_region_share is set but region is not: give region as [y0, x0, y1, x1]")
    bounds = audit_limits(spec.limits, spec.max_region_share, spec.max_outside_mask_share)
    box = check_region(spec.region, model_of(spec, "cpu").preprocess.size)
    masks = dataset_has_masks(spec)
    if spec.max_outside_mask_share is not None and not masks:
        raise ValueError(f"max_outside_mask_share is set but the dataset {spec.dataset!r} has no ground-truth masks "
                         "(a folder of images has none); unset it, or audit a region with max_region_share")
    metrics = [*(["region_share"] if box else []), *(["outside_mask_share"] if masks else []),
               *[m for m in [*spec.metrics, *bounds] if m not in ("region_share", "outside_mask_share")]]
    params = {**(spec.metric_params or {}), **({"region_share": {"region": list(box)}} if box else {})}
    return {"bounds": bounds, "box": box, "metrics": list(dict.fromkeys(metrics)), "params": params}


def _strategies(spec: AuditSpec, measured_metrics: list[str], report_dir: str, files: dict[str, str]) -> list:
    """Each audited method's SpRAy clusters per class, drawn into the report folder; their strategy rows."""
    strategies = []
    for method in spec.methods:
        cluster_task(spec.store, method)
        files[f"clusters_{method}"] = render_clusters(spec.store, method,
                                                      os.path.join(report_dir, f"clusters.{method}.png"))
        shown_measure = next((k for k in ("region_share", "outside_mask_share") if k in measured_metrics), None)
        if shown_measure:
            strategies += strategy_rows(cluster_table(spec.store, method), method, shown_measure)
    return strategies


def _publish(spec: AuditSpec, markdown: str, measured: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """The run's artifacts in the Prefect UI: the summary, the table, the atlas's link, the figures inline."""
    artifacts = {
        "summary": create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEYS["summary"],
                                            description=f"dataset audit of {spec.dataset} with {spec.model}"),
        "table": create_table_artifact(table=measured["rows"], key=ARTIFACT_KEYS["table"],
                                       description="per method and class: samples, accuracy, metric means"),
        "report": create_link_artifact(link=Path(files["report"]).resolve().as_uri(), key=ARTIFACT_KEYS["report"],
                                       link_text=os.path.abspath(files["report"]),
                                       description="the browsable atlas of the audit: open this file in a browser"),
    }
    titles = {"shares_chart": "attribution shares per method and class", "samples_figure": "samples and their maps",
              **{f"clusters_{m}": f"SpRAy clusters of {m} per class" for m in spec.methods}}
    for name, title in titles.items():
        if name in files:
            artifacts[name] = publish_figure(files[name], ARTIFACT_KEYS.get(name, f"dataset-audit-{name}"), title)
    if measured["measures"]:  # how far to trust the scores: `saliency-atlas rank`'s lines and the agreement figure
        judged = meta.rank(storage.open_dataset(spec.store), measured["measures"])
        figure = plot_agreement(judged, os.path.join(os.path.dirname(files["summary"]), "agreement.png"))
        artifacts["trust"] = create_markdown_artifact(markdown=trust_markdown(judged, figure), key=ARTIFACT_KEYS["trust"],
                                                      description=f"how far to trust the audit's scores of {spec.store}")
    return artifacts


@flow(name="dataset-audit")
@spec_signature(AuditSpec)
def dataset_audit(**options: Any) -> dict[str, Any]:
    """Audit where the model's explanations look over a whole dataset, and fail on a crossed limit."""
    log, spec = get_run_logger(), AuditSpec(**options)
    checked = _checked(spec)
    report_dir = spec.report_dir or default_report_dir(spec.store)
    before = samples_before(spec.store)
    shared = {f.name: getattr(spec, f.name) for f in dataclasses.fields(RunSpec)}  # model, data, device, workers
    summary = study(**shared, methods=spec.methods, samples=None, store=spec.store, block_size=spec.block_size,
                    figure=None, metrics=checked["metrics"], metric_params=checked["params"])
    computed = dict(summary.get("computed_blocks", {}))
    new_samples = max(0, int(summary.get("samples", before)) - before)
    log.info("study of %s: %d samples, %d new; attribution blocks computed: %s",
             spec.dataset, summary.get("samples", 0), new_samples, computed)

    methods = list(spec.methods)
    shown = [*methods, *[b for b in BASELINES if b not in methods]] if checked["metrics"] else methods
    measured = audit_measures(spec.store, shown, checked["metrics"])
    violations = threshold_violations(measured["rows"], checked["bounds"], checked["box"], spec.per_class)
    files = render_report(spec.store, methods, measured, checked["bounds"], report_dir,
                          f"{spec.model} on {spec.dataset}: {measured['samples']} samples")
    strategies = _strategies(spec, checked["metrics"], report_dir, files)
    files["report"] = report_task(spec.store, report_dir, {m: files[f"clusters_{m}"] for m in methods})
    markdown = summary_markdown(dataset=spec.dataset, model=spec.model, store=spec.store, measured=measured,
                                new_samples=new_samples, computed=computed, region=checked["box"],
                                limits=checked["bounds"], violations=violations, files=files,
                                per_class=spec.per_class, strategies=strategies)
    files["summary"] = write_summary(markdown, report_dir)
    artifacts = _publish(spec, markdown, measured, files)
    log.info("audit report in %s; the atlas: %s", report_dir, files["report"])
    result = {
        "store": spec.store, "report_dir": report_dir, "samples": measured["samples"], "new_samples": new_samples,
        "accuracy": measured["accuracy"], "rows": measured["rows"], "files": files,
        "artifacts": {k: str(v) for k, v in artifacts.items()}, "violations": violations, "study": summary,
    }
    if violations:  # after the artifacts, so that the UI shows why the run failed
        raise ValueError("dataset audit failed: " + "; ".join(violations))
    return result
