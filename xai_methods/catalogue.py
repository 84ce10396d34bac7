"""The methods and metrics as the command line lists and checks them, without importing torch.

`catalogue.json` beside this module is written from the two registries by
``python -m xai_methods.catalogue``; a test compares it with them, so a method or metric registered
without rewriting it fails the suite (with this command in the message). `saliency-atlas methods`,
`metrics`, `--help` and the study's option checks read it in milliseconds; what computes still
imports the registries themselves.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("catalogue.json")
SIZE = (64, 64)  # the image size of the passes the listings show
WRITE = "python -m xai_methods.catalogue"


@functools.lru_cache(maxsize=1)
def load() -> dict[str, list[dict[str, Any]]]:
    """{"methods": [row, ...], "metrics": [row, ...], "manipulable": [name, ...]}: methods by category, each
    in registration order; metrics by name; the methods the manipulation attack differentiates through."""
    return json.loads(PATH.read_text())


def methods(category: str | None = None) -> list[str]:
    """The method names, sorted (`xm.available()`), or one category's in registration order (`xm.of_category`)."""
    if category is None:
        return sorted(m["name"] for m in load()["methods"])
    return [m["name"] for m in load()["methods"] if m["category"] == category]


def metrics() -> list[str]:
    """The metric names, sorted (`xmet.available()`)."""
    return [m["name"] for m in load()["metrics"]]


def metric(name: str) -> dict[str, Any]:
    """The catalogue's row of metric `name`; of a variant (``deletion[substrate=blur]``), its base's row. Raises
    ValueError naming the valid metrics."""
    from .variants import base

    rows = {m["name"]: m for m in load()["metrics"]}
    if base(name) not in rows:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(rows)} (and their variants, e.g. "
                         "deletion[substrate=blur]: `saliency-atlas metrics`)")
    return rows[base(name)]


def build() -> dict[str, list[dict[str, Any]]]:
    """The catalogue from the registries (imports every method and metric)."""
    import xai_methods as xm
    from xai_methods import metrics as xmet
    from xai_methods._registry import CATEGORIES

    method_rows = []
    for name in (name for category in CATEGORIES for name in xm.of_category(category)):
        s = xm.spec(name)
        method_rows.append({"name": name, "category": s.category, "needs_layer": s.needs_layer,
                            "needs_contrast": s.needs_contrast, "passes": list(s.passes(SIZE)), "summary": s.summary})
    metric_rows = []
    for name in xmet.available():
        s = xmet.spec(name)
        metric_rows.append({"name": name, "family": s.family, "needs_mask": s.needs_mask, "needs_model": s.needs_model,
                            "needs_method": s.needs_method, "higher_is_better": s.higher_is_better,
                            "passes": s.cost(dict(s.defaults), SIZE) if s.needs_model else None, "summary": s.summary,
                            "variants": xmet.variants(name)})
    from xai_methods.manipulation import DIFFERENTIABLE

    return {"methods": method_rows, "metrics": metric_rows, "manipulable": list(DIFFERENTIABLE)}


def dumps(catalogue: dict[str, list[dict[str, Any]]]) -> str:
    """The catalogue's text: one row a line, so that a diff shows which method or metric changed."""
    parts = [f'"{key}": [\n' + ",\n".join(json.dumps(row) for row in rows) + "\n]" for key, rows in catalogue.items()]
    return "{\n" + ",\n".join(parts) + "\n}\n"


if __name__ == "__main__":
    PATH.write_text(dumps(build()))
    print(f"wrote {PATH}")
