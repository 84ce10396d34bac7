"""What a study will take, before it runs: model passes per method and metric from the registries' cost lines,
and the bytes of each stored variable (`study --dry-run`, `status`). Light: no model, no data, no Prefect; the
registries are imported when a cost is asked for."""
from __future__ import annotations

import json
from typing import Any

import storage


def method_passes(method: str, params: dict[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    """(forward, backward) passes per image of `method` with its stored `params` (`layer` is not a cost)."""
    import xai_methods as xm

    return xm.spec(method).passes(size, **{k: v for k, v in params.items() if k != "layer"})


def estimate(t: storage.Template) -> dict[str, Any]:
    """What the study `t` lays out will take, before it runs: model passes per method and per metric (from the
    registries' cost lines, for every sample), and the bytes of each stored variable before compression (maps,
    inputs, masks, scores, curves). A metric that recomputes the method (max_sensitivity) costs its
    perturbations times the method's own passes."""
    from xai_methods import metrics as xmet

    n, (channels, h, w) = len(t.sample_ids), t.image_shape
    passes = {m: [n * p for p in method_passes(m, t.params.get(m, {}), (h, w))] for m in t.methods}
    scoring: dict[str, dict[str, list[int]]] = {}
    for k in t.metrics:
        s, params = xmet.spec(k), {**xmet.spec(k).defaults, **t.metric_params.get(k, {})}
        per = s.cost(params, (h, w)) if s.needs_model else 0
        scoring[k] = {m: ([per * f for f in passes[m]] if s.needs_method else [n * per, 0]) for m in t.methods}
    map_bytes, (gh, gw) = 2 if t.dtype == "float16" else 4, t.map_grid or (h, w)
    raw = {"attribution": len(t.methods) * n * gh * gw * map_bytes,
           "image": n * channels * h * w * 4 if t.keep_images else 0,
           "mask": n * h * w if t.has_masks else 0,
           "score": len(t.methods) * n * len(t.metrics) * 5,  # float32 score + int8 status
           "curve": len(t.methods) * len(t.metrics) * n * t.curve_points * 4}
    return {"samples": n, "size": [h, w], "map_grid": list(t.map_grid or (h, w)), "prediction_passes": n, "passes": passes, "scoring_passes": scoring,
            "bytes_uncompressed": {k: v for k, v in raw.items() if v}}


def describe_estimate(e: dict[str, Any], stored_per_map: float | None = None) -> list[str]:
    """`estimate` as the lines `study --dry-run` and `status` print."""
    rows = [*e["passes"].values(), *(p for s in e["scoring_passes"].values() for p in s.values())]
    fwd, bwd = e["prediction_passes"] + sum(p[0] for p in rows), sum(p[1] for p in rows)
    grid = "" if e["map_grid"] == e["size"] else f" (maps stored at {e['map_grid'][0]}x{e['map_grid'][1]})"
    lines = [f"plan     {e['samples']:,} samples at {e['size'][0]}x{e['size'][1]}{grid}: {fwd:,} forward and {bwd:,} "
             f"backward passes of the model in all, one image each ({e['prediction_passes']:,} forward to predict)"]
    lines += [f"  {m}: " + (f"{f:,} fwd + {b:,} bwd" if f or b else "no model pass") for m, (f, b) in e["passes"].items()]
    for k, per_method in e["scoring_passes"].items():
        costs = [f"{m} {f:,} fwd" + (f" + {b:,} bwd" if b else "") for m, (f, b) in per_method.items() if f or b]
        lines.append(f"  scored by {k}: " + (", ".join(costs) if costs else "no model pass"))
    raw = e["bytes_uncompressed"]
    lines.append("bytes    before compression: " + ", ".join(f"{k} {_size(v)}" for k, v in raw.items())
                 + f"; {_size(sum(raw.values()))} in all")
    if stored_per_map:
        maps = len(e["passes"]) * e["samples"]
        lines.append(f"         maps as stored so far: {_size(stored_per_map)} each, {_size(stored_per_map * maps)} "
                     "for all of them")
    return lines


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def stored_estimate(store: str) -> dict[str, Any]:
    """`estimate` of the study a store lays out, from its attributes alone (no model, no data, no map read)."""
    s = storage.Store(store, mode="r")
    g, a = s.group, s.attrs
    t = storage.Template(sample_ids=range(s.n_samples), classes=[], methods=s.methods(), image_shape=tuple(a["image_shape"]),
                         block_size=s.block_size, has_masks="mask" in g, params=a["params"],
                         dtype=str(g["attribution"].dtype), keep_images="image" in g, metrics=s.metrics(),
                         metric_params=json.loads(a.get("metric_params", "{}")),
                         curve_points=int(g["curve"].shape[-1]) if "curve" in g else 0, map_grid=s.map_grid)
    return estimate(t)
