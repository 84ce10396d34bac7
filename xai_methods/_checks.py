"""Parameter checks, written once for every method (and metric) that has a parameter of a kind.

A check is ``check(name, value, ctx)``: it raises ``ValueError``/``TypeError`` naming the
parameter and what would be valid, and returns nothing. `ctx` carries what some checks
need besides the value: the model (layer names), the image size (windows) and all the
call's parameters (checks that relate two of them). Methods declare a table
``{parameter: check}`` when they register; `_registry.check` runs it before any work, so
a study refuses a bad ``--param`` before its store exists.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Context:
    """What a check may look at besides the value."""

    size: tuple[int, int]  # (H, W) of the images
    model: nn.Module | None = None  # None when only costs are asked for
    params: Mapping[str, Any] = field(default_factory=dict)  # the call's parameters, defaults included


Check = Callable[[str, Any, Context], None]


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def boolean(name: str, value: Any, ctx: Context) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def positive_int(name: str, value: Any, ctx: Context) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def seed(name: str, value: Any, ctx: Context) -> None:
    if value is not None and not is_int(value):
        raise TypeError(f"{name} must be an int or None (not reproducible), got {value!r}")


def number(low: float, high: float = math.inf, *, low_open: bool = False) -> Check:
    """A real number in [low, high] ((low, high] with `low_open`)."""

    def check(name: str, value: Any, ctx: Context) -> None:
        if not is_real(value) or value < low or value > high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")

    return check


def int_at_least(low: int) -> Check:
    def check(name: str, value: Any, ctx: Context) -> None:
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    return check


def one_of(*choices: Any) -> Check:
    def check(name: str, value: Any, ctx: Context) -> None:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name}={value!r} is not valid; choose one of {choices}")

    return check


def optional(inner: Check) -> Check:
    """None, or a value `inner` accepts."""

    def check(name: str, value: Any, ctx: Context) -> None:
        if value is not None:
            inner(name, value, ctx)

    return check


def callable_or_none(name: str, value: Any, ctx: Context) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be None or a callable, got {type(value).__name__}")


def pair_of_ints(value: Any) -> tuple[int, int] | None:
    """(a, b) from a positive int or a pair of positive ints; None if `value` is neither."""
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or not all(is_int(v) and v > 0 for v in pair):
        return None
    return int(pair[0]), int(pair[1])


def pair(name: str, value: Any, ctx: Context) -> None:
    if pair_of_ints(value) is None:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")


def window(name: str, value: Any, ctx: Context) -> None:
    """A positive int or pair no larger than the image (None: the method's default)."""
    if value is None:
        return
    pair(name, value, ctx)
    (wh, ww), (h, w) = pair_of_ints(value), ctx.size  # type: ignore[misc]
    if wh > h or ww > w:
        raise ValueError(f"{name} {(wh, ww)} is larger than the image {(h, w)}")


def layer(name: str, value: Any, ctx: Context) -> None:
    """None, or the dotted name of a module of the model (the valid names listed)."""
    from ._core import resolve_layer

    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be None or the dotted name of a layer, got {value!r}")
    if ctx.model is not None:
        try:
            resolve_layer(ctx.model, value)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None


def numbers_in(low: float, high: float, *, low_open: bool = False) -> Check:
    """A number in the range, or a non-empty list of them."""
    inner = number(low, high, low_open=low_open)

    def check(name: str, value: Any, ctx: Context) -> None:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise ValueError(f"{name} must be a number in ({low}, {high}] or a non-empty list of them")
        for v in values:
            inner(name, v, ctx)

    return check


def run(checks: Mapping[str, Check], params: Mapping[str, Any], ctx: Context) -> None:
    """Apply each check to the parameter it names (parameters without a check pass)."""
    for key, check in checks.items():
        if key in params:
            check(key, params[key], ctx)
