"""A metric's parameter variants as metric names: ``deletion[substrate=blur]``, ``road_morf[noise=0.05]``.

A variant is its base metric with some parameters set; its name says which, so that it is stored beside the
base in the store's `metric` coordinate, scored, resumed and read exactly like any metric (each name has its
own parameters in the store's `metric_params`). Names are canonical: parameters sorted by key, values
written as JSON without spaces, strings bare. Torch-free, like the catalogue that lists each metric's standard
variants (`evaluate --variants`).

>>> name("deletion", {"substrate": "blur", "steps": 16})
'deletion[steps=16,substrate=blur]'
>>> parse("deletion[steps=16,substrate=blur]")
('deletion', {'steps': 16, 'substrate': 'blur'})
"""
from __future__ import annotations

import json
from typing import Any


def _value(v: Any) -> str:
    return v if isinstance(v, str) and _read(v) == v else json.dumps(v, separators=(",", ":"))


def _read(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def name(base: str, params: dict[str, Any]) -> str:
    """The canonical name of `base` with `params` set (no parameters: `base` itself)."""
    if not params:
        return base
    return f"{base}[{','.join(f'{k}={_value(v)}' for k, v in sorted(params.items()))}]"


def _split(inner: str) -> list[str]:
    """`inner` split at the commas outside brackets (a value may be a list)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(inner):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    return [*parts, inner[start:]]


def parse(metric: str) -> tuple[str, dict[str, Any]]:
    """(base, parameters) of a metric name; a plain name has none. Raises ValueError for a malformed name."""
    if "[" not in metric:
        return metric, {}
    base, _, rest = metric.partition("[")
    if not base or not rest.endswith("]"):
        raise ValueError(f"{metric!r} is not a metric variant: write NAME[KEY=VALUE,...], e.g. deletion[substrate=blur]")
    params: dict[str, Any] = {}
    for part in _split(rest[:-1]):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or key.strip() in params:
            raise ValueError(f"{metric!r}: {part!r} is not KEY=VALUE (each key once), e.g. deletion[substrate=blur]")
        params[key.strip()] = _read(value.strip())
    return base, params


def base(metric: str) -> str:
    """The registered metric a name is a variant of (a plain name: itself)."""
    return parse(metric)[0]


def is_variant(metric: str) -> bool:
    return "[" in metric


def standard(metric: str, grid: dict[str, list[Any]]) -> list[str]:
    """The variant names of `metric` for a `grid` of {parameter: [values]}: one parameter changed at a time."""
    return [name(metric, {k: v}) for k, values in grid.items() for v in values]
