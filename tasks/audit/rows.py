"""Tasks of the dataset audit: per method and class, the means of the study's metric scores
(the share of positive attribution inside a box, outside the ground-truth mask, and any other
metric), the limits they must respect (for every class as well as for the whole dataset), and
the report files.

The scores are the study's own (`score`, computed by its evaluation tasks and read from the
store). The flow (``flows/audit.py``) only composes these tasks and publishes the artifacts.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

import storage  # noqa: E402

from ..drawing.figure import render, save  # noqa: E402
from ..study.spec import BASELINE_MAPS as BASELINES  # noqa: E402 - shown beside the methods; no limit applies to them
from ..study.accuracy import accuracy_warning  # noqa: E402

#: the audit's own measures -> (the flow parameter that limits them, what they measure, in words)
MEASURES: dict[str, tuple[str, str]] = {
    "outside_mask_share": ("max_outside_mask_share", "outside the ground-truth mask"),
    "region_share": ("max_region_share", "inside the region"),
}
ARTIFACT_KEYS = {
    "summary": "dataset-audit-summary",
    "table": "dataset-audit-table",
    "shares_chart": "dataset-audit-shares-chart",
    "samples_figure": "dataset-audit-samples-figure",
    "report": "dataset-audit-atlas",
    "trust": "dataset-audit-trust",
}
ALL = "all"  # the class column of the rows that aggregate every class


def default_report_dir(store: str) -> str:
    """``runs/audit.zarr`` -> ``runs/audit.report`` (beside the store)."""
    return os.path.splitext(store.rstrip("/\\"))[0] + ".report"


def check_region(region: Sequence[int] | None, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Validate a box [y0, x0, y1, x1] (model-input pixels, end-exclusive) against the input size (H, W)."""
    if region is None:
        return None
    h, w = size
    if len(region) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in region):
        raise ValueError(f"region must be 4 integers [y0, x0, y1, x1] in model-input pixels, got {list(region)}")
    y0, x0, y1, x1 = (int(v) for v in region)
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(f"region {list(region)} must satisfy 0 <= y0 < y1 <= {h} and 0 <= x0 < x1 <= {w} "
                         f"(the model's input is {h}x{w} pixels; y1 and x1 are exclusive)")
    return y0, x0, y1, x1


def audit_limits(limits: dict[str, dict[str, float]] | None, max_region_share: float | None,
                 max_outside_mask_share: float | None) -> dict[str, dict[str, float]]:
    """All limits as {metric: {"max": v} and/or {"min": v}}, the shares' own parameters included; checked."""
    from xai_methods import metrics as xmet

    out = {k: dict(v) for k, v in (limits or {}).items()}
    for metric, value in (("region_share", max_region_share), ("outside_mask_share", max_outside_mask_share)):
        if value is not None:
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{MEASURES[metric][0]} is a share of attribution mass, between 0 and 1; got {value!r}")
            out.setdefault(metric, {})["max"] = float(value)
    for metric, bounds in out.items():
        if metric not in xmet.available():
            raise ValueError(f"limits: {metric!r} is not a metric; available: {', '.join(xmet.available())}")
        if not bounds or set(bounds) - {"min", "max"} or not all(isinstance(v, (int, float)) for v in bounds.values()):
            raise ValueError(f"limits: {metric} needs {{'max': number}} and/or {{'min': number}}, got {bounds!r}")
    return out


def true_classes(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per sample: the true class name, whether the prediction is right (NaN where the
    true class is unknown to the model), and the class names in the model's order.

    Labels index the store's `class` coordinate, like predictions (the study matches a
    folder's class names to the model's); -1 is a class the model does not know.
    """
    model_classes = [str(c) for c in ds["class"].values]
    label, prediction = ds.label.values, ds.prediction.values
    known = (label >= 0) & (label < len(model_classes))
    names = np.array([model_classes[k] if ok else "(unknown)" for k, ok in zip(label, known)], dtype=object)
    correct = np.where(known & (prediction >= 0), prediction == label, np.nan)  # -1: not predicted (ingested) yet
    order = [c for c in model_classes if c in set(names)] + (["(unknown)"] if not known.all() else [])
    return names, correct, order


def finite_mean(values: np.ndarray) -> float | None:
    """The mean of the finite values, to 4 decimals (None when there is none)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return round(float(values.mean()), 4) if values.size else None


def audit_rows(scores: xr.DataArray, classes: np.ndarray, correct: np.ndarray | None,
               order: Sequence[str], failure: xr.DataArray | None = None) -> list[dict[str, Any]]:
    """One row per method and class (first the row of all classes): sample count, accuracy, maps
    scored (a finite score for every metric), maps failed (the method found nothing: left out of the
    means, see the store's `failure`), and the mean of each metric over its scored maps."""
    metrics = [str(k) for k in scores.metric.values]
    rows: list[dict[str, Any]] = []
    for method in [str(m) for m in scores.xai_method.values]:
        values = scores.sel(xai_method=method).transpose("sample", "metric").values
        failed = np.zeros(len(classes), bool) if failure is None else failure.sel(xai_method=method).values > 0
        for cls in [ALL, *order]:
            sel = np.ones(len(classes), bool) if cls == ALL else classes == cls
            row: dict[str, Any] = {
                "xai_method": method, "class": cls, "samples": int(sel.sum()),
                "accuracy": None if correct is None else finite_mean(correct[sel]),
                "maps_scored": int(np.isfinite(values[sel]).all(1).sum()),
                "maps_failed": int(failed[sel].sum()),
            }
            row.update({metric: finite_mean(values[sel, k]) for k, metric in enumerate(metrics)})
            rows.append(row)
    return rows


def threshold_violations(rows: list[dict[str, Any]], limits: dict[str, dict[str, float]],
                         region: Sequence[int] | None, per_class: bool = True) -> list[str]:
    """A sentence per (metric, method, class) whose mean crosses its limit: over all classes and, with
    `per_class`, over each class (a shortcut of one class in four is diluted in the dataset's mean).
    The baseline maps are shown beside the methods but never limited."""
    problems = []
    for row in rows:
        if row["xai_method"] in BASELINES or (row["class"] != ALL and not per_class):
            continue
        for metric, bounds in limits.items():
            value = row.get(metric)
            for kind, limit in bounds.items():
                if value is None or (value <= limit if kind == "max" else value >= limit):
                    continue
                where = MEASURES.get(metric, (None, ""))[1]
                where = f" inside the region {list(region)}" if metric == "region_share" else (f" {where}" if where else "")
                subject = "all classes" if row["class"] == ALL else f"class {row['class']!r}"
                problems.append(
                    f"{metric}{where} crossed for method {row['xai_method']!r} on {subject}: the mean is {value:.4f} "
                    f"over {row['maps_scored']} maps, {'above' if kind == 'max' else 'below'} the {kind} {limit}"
                )
    return problems


@task(cache_policy=NO_CACHE)
def audit_measures(store: str, methods: list[str], metrics: list[str]) -> dict[str, Any]:
    """The audit's table rows from the study's stored scores, and the samples its figure shows."""
    ds = storage.open_dataset(store)
    if metrics:
        scores = ds.score.sel(xai_method=list(methods), metric=list(metrics)).compute()
    else:  # nothing to measure (no mask, no region, no metric): the table still counts samples and accuracy
        scores = xr.DataArray(np.zeros((len(methods), ds.sizes["sample"], 0)), dims=("xai_method", "sample", "metric"),
                              coords={"xai_method": list(methods), "metric": []})
    classes, correct, order = true_classes(ds)
    failure = ds.failure.sel(xai_method=list(methods)).compute() if "failure" in ds else None
    rows = audit_rows(scores, classes, correct, order, failure)
    # the samples the report shows: those whose maps put the most mass where they should not
    shown = next((m for m in ("region_share", "outside_mask_share") if m in metrics), None)
    if shown:
        score = scores.sel(metric=shown).max("xai_method", skipna=True).fillna(-1).values
        figure_samples = [int(i) for i in np.argsort(-score, kind="stable")[:4]]
        why = f"the samples whose maps put the most positive attribution {MEASURES[shown][1]}"
    else:
        figure_samples, why = list(range(min(4, ds.sizes["sample"]))), "the first samples"
    return {
        "rows": rows,
        "measures": list(metrics),
        "figure_why": why,
        "samples": int(ds.sizes["sample"]),
        "accuracy": finite_mean(correct),
        "accuracy_warning": accuracy_warning(store),
        "figure_samples": figure_samples,
        "figure_sample_ids": [str(ds.sample_id.values[i]) for i in figure_samples],
    }


def render_share_chart(rows: list[dict[str, Any]], measures: Sequence[str], limits: dict[str, dict[str, float]],
                       out: str, title: str) -> str:
    """Grouped bars: per metric one panel, classes along x, one bar per method, limits dashed."""
    methods = list(dict.fromkeys(r["xai_method"] for r in rows))
    classes = list(dict.fromkeys(r["class"] for r in rows))
    width_in = min(24.0, 1.2 + 0.55 * len(classes) * len(methods) * len(measures))
    fig, axes = plt.subplots(1, len(measures), figsize=(max(width_in, 4.0), 3.4), squeeze=False)
    width = 0.8 / len(methods)
    for ax, measure_name in zip(axes[0], measures):
        for k, method in enumerate(methods):
            values = [next((r[measure_name] for r in rows if r["xai_method"] == method and r["class"] == c), None)
                      for c in classes]
            ax.bar(np.arange(len(classes)) + (k - (len(methods) - 1) / 2) * width,
                   [np.nan if v is None else v for v in values], width, label=method)
        for kind, limit in limits.get(measure_name, {}).items():
            ax.axhline(limit, color="black", linestyle="--", linewidth=1, label=f"{kind} {limit}")
        ax.set_xticks(np.arange(len(classes)), classes, rotation=30, ha="right", fontsize=8)
        values = [r[measure_name] for r in rows if r.get(measure_name) is not None]
        if all(0 <= v <= 1 for v in values):
            ax.set_ylim(0, 1.25)  # room for the legend above the bars
            ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel("mean", fontsize=8)
        where = MEASURES.get(measure_name, (None, ""))[1]
        ax.set_title(f"{measure_name}: positive attribution {where}" if where else measure_name, fontsize=9)
        ax.legend(fontsize=7, loc="upper left", ncol=len(methods) + 1, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, out, dpi=120)


@task(cache_policy=NO_CACHE)
def render_report(store: str, methods: list[str], measured: dict[str, Any], limits: dict[str, dict[str, float]],
                  report_dir: str, title: str) -> dict[str, str]:
    """Write the report folder: table.csv, shares.png (when a share was measured), samples.png."""
    os.makedirs(report_dir, exist_ok=True)
    files: dict[str, str] = {}
    table = os.path.join(report_dir, "table.csv")
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(measured["rows"][0]))
        writer.writeheader()
        writer.writerows(measured["rows"])
    files["table"] = table
    if measured["measures"]:
        files["shares_chart"] = render_share_chart(measured["rows"], measured["measures"], limits,
                                                   os.path.join(report_dir, "shares.png"), title)
    files["samples_figure"] = render(store, os.path.join(report_dir, "samples.png"),
                                           measured["figure_samples"], methods)
    return files


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_markdown(*, dataset: str, model: str, store: str, measured: dict[str, Any],
                     new_samples: int, computed: dict[str, int], region: Sequence[int] | None,
                     limits: dict[str, dict[str, float]], violations: list[str], files: dict[str, str],
                     per_class: bool = True, strategies: Sequence[dict[str, Any]] = ()) -> str:
    lines = [
        f"# Dataset audit: `{dataset}` with `{model}`",
        "",
        f"- store: `{os.path.abspath(store)}`",
        f"- samples: {measured['samples']} ({new_samples} new in this run; attribution blocks computed: "
        + ", ".join(f"{m} {n}" for m, n in computed.items()) + ")",
        f"- model accuracy: {_fmt(measured['accuracy'])}"
        + (f" — **warning:** {measured['accuracy_warning']}" if measured.get("accuracy_warning") else ""),
        f"- region: {list(region) if region else 'none'} (y0, x0, y1, x1 in model-input pixels)",
        "- limits: " + (", ".join(f"{m} {kind} {v}" for m, b in limits.items() for kind, v in b.items()) or "none")
        + (" (each holds for every class and for all classes)" if per_class and limits else ""),
        "",
    ]
    if not measured["measures"]:
        lines += ["No share was measured: the dataset has no ground-truth masks and no region was given.", ""]
    cols = ["xai_method", "samples", "accuracy", "maps_scored", "maps_failed", *measured["measures"]]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in (r for r in measured["rows"] if r["class"] == ALL):
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    lines += ["", "Means over the maps each metric could score (a map without positive attribution has no share); "
              f"the baseline maps ({', '.join(BASELINES)}) are chance levels, never limited. Per class in the table "
              f"artifact `{ARTIFACT_KEYS['table']}` and in `table.csv`.", ""]
    if violations:
        lines += ["## Thresholds crossed", ""] + [f"- {v}" for v in violations] + [""]
    elif limits:
        lines += ["All thresholds respected.", ""]
    if strategies:
        measure = next(k for k in MEASURES if k in strategies[0])
        lines += ["## Strategies: per class, the SpRAy cluster with the most attribution "
                  f"{MEASURES[measure][1]}", "",
                  f"| xai_method | class | clusters | cluster | maps | {measure} in it | class mean | eigengap | e.g. |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['xai_method']} | {r['class']} | {r['clusters']} | {r['cluster']} | {r['size']} of {r['of']} | "
                  f"{_fmt(r[measure])} | {_fmt(r['class_mean'])} | {_fmt(r['eigengap'])} | "
                  + ", ".join(f"`{i}`" for i in r["sample_ids"][:3]) + " |" for r in strategies]
        lines += ["", "A cluster far above its class's mean is a strategy only some of the class's images get (a "
                  "watermark, a background): its mean map and typical samples are in `clusters.<method>.png`.", ""]
    lines += [f"`samples.png` shows {measured['figure_why']}: "
              + ", ".join(f"`{i}`" for i in measured["figure_sample_ids"]) + ".", ""]
    lines += ["## Files", ""] + [f"- [{name}]({Path(p).resolve().as_uri()}) `{os.path.abspath(p)}`"
                                 for name, p in files.items()]
    return "\n".join(lines) + "\n"


@task(cache_policy=NO_CACHE)
def write_summary(markdown: str, report_dir: str) -> str:
    """The report's summary.md."""
    path = os.path.join(report_dir, "summary.md")
    with open(path, "w") as f:
        f.write(markdown)
    return path


@task(cache_policy=NO_CACHE)
def samples_before(store: str) -> int:
    """How many samples the store holds before this run (0 when there is no store yet)."""
    return storage.Store(store, mode="r").n_samples if storage.exists(store) else 0


@task(cache_policy=NO_CACHE)
def dataset_has_masks(spec: Any) -> bool:
    """Whether the dataset carries ground-truth masks (the built-in one does; a folder of images does not)."""
    from ..loading import load_dataset, model_of

    return load_dataset(spec.dataset, None, model_of(spec, "cpu").preprocess.size, spec.masks).has_masks
