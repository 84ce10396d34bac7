"""How the command line reads its values: argument types, and the flags made from a spec's fields."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None

def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]

def _pair(text: str) -> tuple[str, str] | None:
    """A:B, where A and B may be peer methods with a colon of their own (captum:Saliency:gradcam): the one split
    whose sides have at most one colon each."""
    parts = text.split(":")
    splits = [(":".join(parts[:i]), ":".join(parts[i:])) for i in range(1, len(parts))]
    fits = [(a, b) for a, b in splits if _method_like(a) and _method_like(b)]
    return fits[0] if len(fits) == 1 else None


def _method_like(name: str) -> bool:
    """A name without a colon, or a peer's: captum:, gradcam:, zennit: or package.module: before its one colon."""
    kind, colon, what = name.partition(":")
    return bool(kind) and (not colon or (bool(what) and ":" not in what
                                         and (kind in ("captum", "gradcam", "zennit") or "." in kind)))


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = [_pair(p.strip()) for p in text.split(",") if p.strip()]
    if not pairs or any(p is None for p in pairs):
        raise argparse.ArgumentTypeError(f"expected A:B pairs of methods like gradcam:saliency (a peer's method with its "
                                         f"colon: captum:Saliency:gradcam), got {text!r}")
    return pairs  # type: ignore[return-value]

def _samples(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of samples or 'all', got {text!r}") from None

def _batch(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images per pass or 'auto', got {text!r}")
    return value

def _param(text: str) -> tuple[str, str, Any]:
    """METHOD.NAME=VALUE, the value read as JSON when it parses (8, 0.5, true, null, "x")."""
    key, sep, raw = text.partition("=")
    method, dot, name = key.rpartition(".")  # the owner may hold dots (package.module:function), the name not
    if not (sep and dot and method and name):
        raise argparse.ArgumentTypeError(f"expected OWNER.NAME=VALUE like occlusion.window=8 or deletion.steps=16, "
                                         f"got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return method, name, value

def fold_params(pairs: list[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    """Parsed OWNER.NAME=VALUE pairs (`_param`) as {OWNER: {NAME: VALUE}}, a later pair winning."""
    folded: dict[str, dict[str, Any]] = {}
    for owner, key, value in pairs:
        folded.setdefault(owner, {})[key] = value
    return folded

def _kv(text: str) -> tuple[str, Any]:
    """NAME=VALUE, the value read as JSON when it parses."""
    key, sep, raw = text.partition("=")
    if not (sep and key):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE like num_classes=10, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw

STUDY_GROUPS = {
    "model": "your model: its factory's arguments, preprocessing and classes (default: the architecture's, "
             "or a model card beside the weights)",
    "layout": "layout of a new store (an existing store keeps its own)",
    "where": "where block tasks run (default: one at a time in this process)",
}

ARG_TYPES = {"names": _names, "samples": _samples, "batch": _batch, "ints": _int_list, "param": _param}

def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.1,0.5, got {text!r}") from None

ARG_TYPES.update(floats=_floats, float=float)

def flag_of(name: str, options: dict[str, dataclasses.Field] | None = None) -> str:
    """How the command line spells option `name` (its own flag, else --name-with-dashes)."""
    if options is None:
        from tasks import OPTIONS as options
    return options[name].metadata["cli"].get("flag", "--" + name.replace("_", "-"))

def add_study_options(parser: argparse.ArgumentParser, options: dict[str, dataclasses.Field] | None = None) -> None:
    """One flag per field of `tasks.StudySpec` (or a protocol's spec), with its help text and default
    (the flow's form reads the same)."""
    if options is None:
        from tasks import OPTIONS as options

    used = {f.metadata["cli"].get("group") for f in options.values()}
    groups = {key: parser.add_argument_group(title) for key, title in STUDY_GROUPS.items() if key in used}
    where = groups["where"].add_mutually_exclusive_group() if "where" in groups else None
    for name, f in options.items():
        cli = dict(f.metadata["cli"])
        group = cli.pop("group", None)
        target = where if group == "where" else groups[group] if group else parser
        cli.pop("flag", None)
        flag = flag_of(name, options)
        kind = cli.pop("type", None)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):  # a switch that turns the default around
            action = "store_true" if cli.pop("switch_on", False) else "store_false"
            target.add_argument(flag, dest=name, action=action, help=cli.pop("switch", f.metadata["help"]))
        elif kind == "kv":
            target.add_argument(flag, dest=name, type=_kv, action="append", default=[], metavar="NAME=VALUE",
                                help=f"{f.metadata['help']} (repeatable)".replace("%", "%%"))
        elif kind == "param":
            owner = "METRIC" if name.startswith("metric") else "METHOD"
            example = "deletion.steps=16" if owner == "METRIC" else "occlusion.window=8"
            target.add_argument(flag, dest=name, type=_param, action="append", default=[],
                                metavar=f"{owner}.NAME=VALUE", help=f"a {owner.lower()} parameter, e.g. {example} "
                                                                    "(repeatable)")
        else:
            type_ = ARG_TYPES.get(kind) or (int if f.type in ("int", "int | None") else str)
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            text = f.metadata["help"].replace("%", "%%")  # argparse formats help strings with %
            target.add_argument(flag, dest=name, type=type_, default=default, help=f"{text} (default: {shown})", **cli)

def spec_from_args(cls: type, options: dict[str, dataclasses.Field], args: argparse.Namespace) -> Any:
    """The spec of parsed arguments: --param pairs folded into per-method dicts, the figure defaulted
    to the store path with .png ('none': no figure)."""
    values = {name: getattr(args, name) for name in options}
    for name, f in options.items():
        if f.metadata["cli"].get("type") == "param":
            values[name] = fold_params(values[name])
        elif f.metadata["cli"].get("type") == "kv":
            values[name] = dict(values[name])
    figure = values["figure"] or os.path.splitext(values["store"].rstrip("/"))[0] + ".png"
    return cls(**{**values, "figure": None if figure.lower() == "none" else figure})

def print_rows(rows: list[tuple[str, ...]]) -> None:
    """A table whose last column (a sentence) runs on unpadded: `methods` and `metrics`."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
