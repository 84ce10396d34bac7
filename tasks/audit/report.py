"""The atlas: one self-contained HTML page that shows a study (no server, no network).

Everything is inline (images as ``data:`` URIs, the filter script in the page), so the file can
be mailed, archived or opened from a CI artifact. The page has:

- the study's identity (model, data, preprocessing, accuracy and its warning);
- the metrics table, mean and bootstrap interval per method, the baseline maps beside the methods;
- the evaluation curves and score distributions (`evaluation_plot`);
- a grid of samples (rows) by methods (columns), each map over its image with its value range,
  filtered in the page by true class, correct or incorrect prediction and a metric's range;
- the SpRAy clusters stored by ``saliency-atlas clusters`` (their table and figure);
- the figures of protocol stores (sanity, invariance, manipulate, roar) given with ``protocols``.
"""
from __future__ import annotations

import html
import io
import json
import os
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage

from .rows import BASELINES, true_classes
from .. import meta
from ..drawing.agreement import plot_agreement
from ..drawing.artifacts import data_uri
from ..drawing.figure import _display_image, captions, heatmap_style
from ..study.accuracy import accuracy_warning

TILE = 112  # pixels of a tile's longer side in the grid


def file_uri(path: str) -> str:
    """A figure file as a data URI (PNG, JPEG or SVG by its extension)."""
    ext = os.path.splitext(path)[1].lower()
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}[ext]
    with open(path, "rb") as f:
        return data_uri(f.read(), mime)


def tile(image: np.ndarray | None, m: np.ndarray, cmap: str, low: float, high: float) -> str:
    """A map coloured with `cmap` on [low, high] and laid over the (H, W, 3) image, as a JPEG data URI."""
    colours = colormaps[cmap]((np.clip(m, low, high) - low) / ((high - low) or 1.0))[..., :3]
    colours[~np.isfinite(m)] = 0.85  # no map: light grey
    return jpeg(colours if image is None else 0.4 * image + 0.6 * colours)


def jpeg(rgb: np.ndarray) -> str:
    """An (H, W, 3) picture in [0, 1] as a JPEG data URI, its longer side at most `TILE` pixels."""
    picture = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    scale = TILE / max(picture.size)
    if scale < 1:
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BILINEAR)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=88)
    return data_uri(buf.getvalue(), "image/jpeg")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def metrics_table(ds: Any) -> str:
    """Methods by metrics: mean [bootstrap interval] (n); baseline maps in italics, below the methods."""
    if "score" not in ds:
        return "<p>No scores yet: <code>saliency-atlas evaluate STORE --metrics ...</code> adds them.</p>"
    rows = storage.score_table(ds)
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    methods = list(dict.fromkeys(r["xai_method"] for r in rows))
    methods = [m for m in methods if m not in BASELINES] + [m for m in methods if m in BASELINES]
    cell = {(r["xai_method"], r["metric"]): r for r in rows}
    head = "".join(f"<th>{html.escape(k)}</th>" for k in metrics)
    body = []
    for m in methods:
        name = f"<i>{m}</i> (baseline)" if m in BASELINES else m
        cells = "".join(
            f"<td>{_fmt(c['mean'])} <small>[{_fmt(c['low'])}, {_fmt(c['high'])}] n={c['n']}</small></td>"
            for k in metrics for c in [cell[(m, k)]])
        body.append(f"<tr><th>{name}</th>{cells}</tr>")
    return (f"<table class='metrics'><tr><th>method</th>{head}</tr>{''.join(body)}</table>"
            "<p><small>mean over the images with a defined score, 95% percentile-bootstrap interval over images, "
            "n images.</small></p>")


def _shown(n: int, max_samples: int) -> list[int]:
    """Up to `max_samples` sample positions spread evenly over 0..n-1."""
    if n <= max_samples:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, max_samples)})


def sample_grid(ds: Any, samples: Sequence[int], shared_scale: bool) -> tuple[str, dict[str, Any]]:
    """The grid's table (one row per sample, data attributes for the filters) and what the filters offer."""
    methods = [str(m) for m in ds.xai_method.values]
    names, correct, order = true_classes(ds)
    model_classes = [str(c) for c in ds["class"].values]
    sel = ds.isel(sample=list(samples)).compute()
    maps = sel.attribution.transpose("xai_method", "sample", "y", "x").values.astype(np.float32)
    scores = sel.score.transpose("xai_method", "sample", "metric").values if "score" in sel else None
    metrics = [str(k) for k in sel.metric.values] if scores is not None else []
    shared = {m: heatmap_style(m, maps[i]) for i, m in enumerate(methods)}
    head = "".join(f"<th>{html.escape(m)}{' <i>(baseline)</i>' if m in BASELINES else ''}<br><small>"
                   f"{'shared scale [' + _fmt(shared[m].low, 3) + ', ' + _fmt(shared[m].high, 3) + ']' if shared_scale else shared[m].cmap}"
                   "</small></th>" for m in methods)
    rows = []
    for r, s in enumerate(samples):
        image = (_display_image(sel.image.values[r], ds.attrs["image_mean"], ds.attrs["image_std"])
                 if "image" in sel else None)
        verdict = {1.0: "correct", 0.0: "incorrect"}.get(float(correct[s]) if np.isfinite(correct[s]) else -1, "unknown")
        pred = model_classes[int(sel.prediction.values[r])]
        values = {m: {k: (None if not np.isfinite(v := float(scores[i, r, j])) else round(v, 4))
                      for j, k in enumerate(metrics)} for i, m in enumerate(methods)} if scores is not None else {}
        cells = [f"<td class='input'>{'' if image is None else _img(jpeg(image), 'input')}"
                 f"<div>{html.escape(str(sel.sample_id.values[r]))}<br>true {html.escape(names[s])}, pred "
                 f"{html.escape(pred)}</div></td>"]
        for i, m in enumerate(methods):
            style = shared[m] if shared_scale else heatmap_style(m, maps[i, r])
            got = ", ".join(f"{k} {v:.2f}" for k, v in values.get(m, {}).items() if v is not None)
            cells.append(f"<td>{_img(tile(image, maps[i, r], style.cmap, style.low, style.high), m)}"
                         f"<div><small>[{_fmt(style.low, 3)}, {_fmt(style.high, 3)}]<br>{html.escape(got)}</small></div></td>")
        rows.append(f"<tr class='sample' data-class='{html.escape(names[s])}' data-correct='{verdict}' "
                    f"data-scores='{html.escape(json.dumps(values))}'>{''.join(cells)}</tr>")
    table = f"<table class='grid'><tr><th>input</th>{head}</tr>{''.join(rows)}</table>"
    return table, {"classes": order, "methods": methods, "metrics": metrics}


def _img(uri: str, alt: str) -> str:
    return f"<img src='{uri}' alt='{html.escape(alt)}'>"


def _figures(ds: Any, store: str, protocols: Sequence[str], tmp: str,
             clusters_drawn: Mapping[str, str]) -> list[tuple[str, str]]:
    """(heading, data URI) of the evaluation, cluster and protocol figures there are (a method's cluster
    figure from `clusters_drawn` when it is drawn already)."""
    from .clusters import render_clusters
    from ..drawing.evaluation import plot_evaluation
    from ..protocols import PROTOCOLS

    out = [(os.path.basename(p), file_uri(p)) for p in plot_evaluation(ds, os.path.join(tmp, "evaluation"))]
    for method in storage.Store(store, mode="r").cluster_params():
        drawn = clusters_drawn.get(method) or render_clusters(store, method, os.path.join(tmp, f"{method}.png"))
        out.append((f"SpRAy clusters of {method}", file_uri(drawn)))
    for path in protocols:
        protocol = storage.ResultStore(path, mode="r").status()["protocol"]
        out.append((f"{protocol}: {path}", file_uri(PROTOCOLS[protocol].plot(path, os.path.join(tmp, f"{protocol}.png")))))
    return out


def cluster_tables(store: str) -> str:
    from .clusters import cluster_table

    parts = []
    for method in storage.Store(store, mode="r").cluster_params():
        for name, clusters in cluster_table(store, method).items():
            rows = "".join(f"<tr><td>{c['cluster']}</td><td>{c['size']}</td><td>{_fmt(c['accuracy'], 2)}</td><td>"
                           + html.escape(", ".join(f"{k} {v:.3f}" for k, v in c["scores"].items() if v is not None))
                           + f"</td><td><small>{html.escape(', '.join(c['sample_ids'][:6]))}</small></td></tr>"
                           for c in clusters)
            gap = clusters[0]["eigengap"] if clusters else None
            parts.append(f"<h3>{html.escape(method)}, class {html.escape(name)} (eigengap {gap})</h3><table>"
                         f"<tr><th>cluster</th><th>maps</th><th>accuracy</th><th>mean scores</th><th>samples</th></tr>{rows}</table>")
    return "".join(parts) or ("<p>No clusters stored: <code>saliency-atlas clusters STORE --method M</code> "
                              "finds them.</p>")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
td, th {{ border: 1px solid #ddd; padding: 3px 6px; vertical-align: top; font-size: 13px; }}
table.grid td {{ text-align: center; }}
table.grid img {{ width: {tile}px; image-rendering: pixelated; }}
.filters {{ position: sticky; top: 0; background: #f6f6f6; padding: 0.5em; border: 1px solid #ddd; }}
.figure img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p>{identity}</p>
<h2>Metrics</h2>{metrics}{trust}
<h2>Figures</h2>{figures}
<h2>Samples</h2>
<p>{grid_note}</p>
<div class="filters">
 class <select id="class"><option value="">all</option>{class_options}</select>
 prediction <select id="correct"><option value="">all</option><option>correct</option><option>incorrect</option>
 <option>unknown</option></select>
 metric <select id="metric"><option value="">(none)</option>{metric_options}</select>
 of <select id="xai_method">{method_options}</select>
 from <input id="low" type="number" step="any" size="6"> to <input id="high" type="number" step="any" size="6">
 <span id="count"></span>
</div>
{grid}
<h2>Strategies (SpRAy clusters)</h2>{clusters}
<script>
const rows = Array.from(document.querySelectorAll("tr.sample"));
const value = id => document.getElementById(id).value;
function apply() {{
  const cls = value("class"), correct = value("correct"), metric = value("metric"), method = value("xai_method");
  const low = value("low") === "" ? -Infinity : parseFloat(value("low"));
  const high = value("high") === "" ? Infinity : parseFloat(value("high"));
  let shown = 0;
  for (const row of rows) {{
    let ok = (!cls || row.dataset.class === cls) && (!correct || row.dataset.correct === correct);
    if (ok && metric) {{
      const v = ((JSON.parse(row.dataset.scores)[method] || {{}})[metric]);
      ok = v !== null && v !== undefined && v >= low && v <= high;
    }}
    row.hidden = !ok;
    shown += ok;
  }}
  document.getElementById("count").textContent = shown + " of " + rows.length + " samples shown";
}}
for (const id of ["class", "correct", "metric", "xai_method", "low", "high"]) {{
  for (const event of ["input", "change"]) document.getElementById(id).addEventListener(event, apply);
}}
apply();
</script>
</body></html>
"""


def write(store: str, out: str, *, max_samples: int = 200, shared_scale: bool = False,
          protocols: Sequence[str] = (), clusters_drawn: Mapping[str, str] | None = None) -> str:
    """Write ``out/index.html`` for the study at `store`; returns its path. `clusters_drawn`: per method,
    its cluster figure when the caller has drawn it already (the audit)."""
    if max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
    for path in protocols:  # checked before any work
        if not storage.is_result_store(path):
            raise ValueError(f"--protocol {path!r} is not a protocol store (sanity, invariance, manipulate, roar)")
    ds = storage.open_dataset(store)
    ingested = storage.Store(store, mode="r").require_ingested()  # a study stopped early: what it has read
    samples = [int(ingested[i]) for i in _shown(len(ingested), max_samples)]
    grid, offer = sample_grid(ds, samples, shared_scale)
    judged = meta.rank(ds) if "score" in ds else None  # how far to trust the scores (`saliency-atlas rank`)
    with tempfile.TemporaryDirectory() as tmp:
        drawn = _figures(ds, store, protocols, tmp, clusters_drawn or {})
        if judged and (agreement := plot_agreement(judged, os.path.join(tmp, "agreement.png"))):
            drawn.insert(0, ("Do the metrics agree?", file_uri(agreement)))
        figures = "".join(f"<div class='figure'><h3>{html.escape(h)}</h3><img src='{u}' alt='{html.escape(h)}'></div>"
                          for h, u in drawn)
    trust = ("<div id='trust'><h3>How far to trust these scores</h3><ul>"
             + "".join(f"<li>{html.escape(line.strip())}</li>" for line in meta.trust(judged)[1:]) + "</ul></div>"
             if judged else "")
    title, footer = captions(ds, False, shared_scale)
    warning = accuracy_warning(store)
    _, correct, _ = true_classes(ds)
    known = correct[np.isfinite(correct)]
    partly = f" ({len(ingested)} ingested so far)" if len(ingested) < ds.sizes["sample"] else ""
    identity = (f"{ds.sizes['sample']} samples{partly}, {len(offer['methods'])} maps each; "
                + (f"accuracy {100 * known.mean():.2f}%; " if known.size else "")
                + html.escape(footer) + (f"<br><b>{html.escape(warning)}</b>" if warning else ""))
    option = lambda values: "".join(f"<option>{html.escape(v)}</option>" for v in values)  # noqa: E731
    page = PAGE.format(
        title=html.escape(title), identity=identity, metrics=metrics_table(ds), trust=trust,
        figures=figures or "<p>none</p>",
        grid_note=(f"{len(samples)} of {len(ingested)} samples (spread evenly over the study). Under each map: "
                   "the value range of its colours (raw values, not min-max scaled; signed maps diverge around 0 "
                   "in red and blue) and its scores."),
        class_options=option(offer["classes"]), metric_options=option(offer["metrics"]),
        method_options=option(offer["methods"]), grid=grid, clusters=cluster_tables(store), tile=TILE)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


@task(cache_policy=NO_CACHE)
def report_task(store: str, out: str, clusters_drawn: Mapping[str, str] | None = None) -> str:
    """Prefect task around `write` (the audit's)."""
    return write(store, out, clusters_drawn=clusters_drawn)
