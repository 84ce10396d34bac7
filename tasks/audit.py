"""Tasks of the dataset audit: the share of each map's positive attribution inside a box or
outside the ground-truth mask, per method and class, the report files and the limits.

The shares are computed lazily from the store with xarray/Dask, block by block. The flow
(``flows/audit.py``) only composes these tasks and publishes the artifacts.
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

from .figure import render, save  # noqa: E402

#: share column -> (the flow parameter that limits it, what it measures, in words)
MEASURES: dict[str, tuple[str, str]] = {
    "outside_mask_share": ("max_outside_mask_share", "outside the ground-truth mask"),
    "region_share": ("max_region_share", "inside the region"),
}
ARTIFACT_KEYS = {
    "summary": "dataset-audit-summary",
    "table": "dataset-audit-table",
    "shares_chart": "dataset-audit-shares-chart",
    "samples_figure": "dataset-audit-samples-figure",
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


def check_limits(limits: dict[str, float | None]) -> None:
    for name, limit in limits.items():
        if limit is not None and not (isinstance(limit, (int, float)) and 0.0 <= limit <= 1.0):
            raise ValueError(f"{name} is a share of attribution mass, between 0 and 1; got {limit!r}")


def attribution_shares(ds: xr.Dataset, methods: Sequence[str],
                       region: tuple[int, int, int, int] | None = None) -> xr.Dataset:
    """Lazy (xai_method, sample) shares of each map's positive attribution mass.

    ``positive_mass`` is the sum of the map's positive values; ``outside_mask_share`` (when
    ``ds`` has ``mask``) and ``region_share`` (when ``region`` is given) divide the positive
    mass outside the mask, or inside the box, by it.  A map without positive mass, or not
    computed yet (NaN), has NaN shares.
    """
    pos = ds.attribution.sel(xai_method=list(methods)).astype("float64").clip(min=0)  # NaN stays NaN
    total = pos.sum(("y", "x"), skipna=False)
    denominator = total.where(total > 0)
    out = {"positive_mass": total}
    if "mask" in ds:
        out["outside_mask_share"] = pos.where(~ds["mask"], 0.0).sum(("y", "x"), skipna=False) / denominator
    if region is not None:
        y0, x0, y1, x1 = region
        out["region_share"] = pos.isel(y=slice(y0, y1), x=slice(x0, x1)).sum(("y", "x"), skipna=False) / denominator
    return xr.Dataset(out)


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
    correct = np.where(known, prediction == label, np.nan)
    order = [c for c in model_classes if c in set(names)] + (["(unknown)"] if not known.all() else [])
    return names, correct, order


def _mean(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return round(float(values.mean()), 4) if values.size else None


def audit_rows(shares: xr.Dataset, classes: np.ndarray, correct: np.ndarray | None,
              order: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method and class (first the row of all classes): sample count, accuracy,
    maps with positive mass, and the mean of each share over the maps that have one."""
    measures = [m for m in MEASURES if m in shares]
    rows: list[dict[str, Any]] = []
    for method in [str(m) for m in shares.xai_method.values]:
        s = shares.sel(xai_method=method)
        for cls in [ALL, *order]:
            sel = np.ones(len(classes), bool) if cls == ALL else classes == cls
            row: dict[str, Any] = {
                "xai_method": method,
                "class": cls,
                "samples": int(sel.sum()),
                "accuracy": None if correct is None else _mean(correct[sel]),
                "maps_with_positive_mass": int((s.positive_mass.values[sel] > 0).sum()),
            }
            for m in measures:
                row[m] = _mean(s[m].values[sel])
            rows.append(row)
    return rows


def threshold_violations(rows: list[dict[str, Any]], limits: dict[str, float | None],
                         region: Sequence[int] | None) -> list[str]:
    """A sentence per (threshold, method) whose mean share over all classes is above its limit."""
    problems = []
    for row in (r for r in rows if r["class"] == ALL):
        for measure, (name, where) in MEASURES.items():
            limit, value = limits.get(name), row.get(measure)
            if limit is None or value is None or value <= limit:
                continue
            where = f"inside the region {list(region)}" if measure == "region_share" else where
            problems.append(
                f"{name} crossed for method {row['xai_method']!r}: the mean share of positive attribution "
                f"{where} is {value:.4f} over {row['maps_with_positive_mass']} maps, above the limit {limit}"
            )
    return problems


@task(cache_policy=NO_CACHE)
def measure(store: str, methods: list[str], region: list[int] | None) -> dict[str, Any]:
    """Per-sample shares (computed with Dask from the store), aggregated into table rows."""
    ds = storage.open_dataset(store)
    shares = attribution_shares(ds, methods, tuple(region) if region else None).compute()
    classes, correct, order = true_classes(ds)
    rows = audit_rows(shares, classes, correct, order)
    # the samples the report shows: those whose maps put the most mass where they should not
    shown = next((m for m in ("region_share", "outside_mask_share") if m in shares), None)
    if shown:
        score = shares[shown].max("xai_method", skipna=True).fillna(-1).values
        figure_samples = [int(i) for i in np.argsort(-score, kind="stable")[:4]]
        why = f"the samples whose maps put the most positive attribution {MEASURES[shown][1]}"
    else:
        figure_samples, why = list(range(min(4, ds.sizes["sample"]))), "the first samples"
    return {
        "rows": rows,
        "measures": [m for m in MEASURES if m in shares],
        "figure_why": why,
        "samples": int(ds.sizes["sample"]),
        "accuracy": _mean(correct),
        "figure_samples": figure_samples,
        "figure_sample_ids": [str(ds.sample_id.values[i]) for i in figure_samples],
    }


def render_share_chart(rows: list[dict[str, Any]], measures: Sequence[str], limits: dict[str, float | None],
                       out: str, title: str) -> str:
    """Grouped bars: per measure one panel, classes along x, one bar per method, limits dashed."""
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
        limit_name, where = MEASURES[measure_name]
        if limits.get(limit_name) is not None:
            ax.axhline(limits[limit_name], color="black", linestyle="--", linewidth=1, label=f"{limit_name}")
        ax.set_xticks(np.arange(len(classes)), classes, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.25)  # room for the legend above the bars
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel("mean share", fontsize=8)
        ax.set_title(f"positive attribution {where}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", ncol=len(methods) + 1, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, out, dpi=120)


@task(cache_policy=NO_CACHE)
def render_report(store: str, methods: list[str], measured: dict[str, Any], limits: dict[str, float | None],
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
                     limits: dict[str, float | None], violations: list[str], files: dict[str, str]) -> str:
    lines = [
        f"# Dataset audit: `{dataset}` with `{model}`",
        "",
        f"- store: `{os.path.abspath(store)}`",
        f"- samples: {measured['samples']} ({new_samples} new in this run; attribution blocks computed: "
        + ", ".join(f"{m} {n}" for m, n in computed.items()) + ")",
        f"- model accuracy: {_fmt(measured['accuracy'])}",
        f"- region: {list(region) if region else 'none'} (y0, x0, y1, x1 in model-input pixels)",
        "- limits: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in limits.items()),
        "",
    ]
    if not measured["measures"]:
        lines += ["No share was measured: the dataset has no ground-truth masks and no region was given.", ""]
    cols = ["xai_method", "samples", "accuracy", "maps_with_positive_mass", *measured["measures"]]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in (r for r in measured["rows"] if r["class"] == ALL):
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    lines += ["", "Shares are means over the maps that have positive attribution; per class in the table artifact "
              f"`{ARTIFACT_KEYS['table']}` and in `table.csv`.", ""]
    if violations:
        lines += ["## Thresholds crossed", ""] + [f"- {v}" for v in violations] + [""]
    elif any(v is not None for v in limits.values()):
        lines += ["All thresholds respected.", ""]
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
def has_masks(store: str) -> bool:
    return storage.Store(store, mode="r").has("mask")
