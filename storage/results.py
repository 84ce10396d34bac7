"""The store of a reliability protocol (sanity, invariance, manipulate, roar): results by unit of work.

A protocol's work comes in *parts* (the unrandomised maps, one randomised layer, one retrain...).
Each part has unit dimensions: one unit is one index along each of them, its variables are
chunked 1 along those dimensions (so a unit's write is whole chunks and never races with
another unit's writer), and a ``done_<part>`` flag over the unit dimensions is set only
after the unit's variables are written, with their CRC-32 in ``checksum_<part>`` just before it
(`verify` reads every finished unit back against it, for ``status --verify``). A rerun computes only
units whose flag is unset, so a protocol resumes after a kill; a unit is computed under its claim
(`claim`, as a study's blocks are), so two runs at once never compute one unit twice. The store is
one Zarr v3 group read by ``xarray.open_zarr``.

Opening a store made by another protocol, model, dataset or options is refused, naming what
differs, and the store is left untouched.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from .claims import claim
from .group import check_path, ignore_zarr_notes, open_group, remove
from .schema import SCHEMA_VERSION, Difference, StoreLayoutError, StoreMismatch, StoreStateError, checksum


@dataclass(frozen=True)
class Part:
    """One kind of unit of work and the variables a unit writes (their dims start with `units`)."""

    name: str
    units: tuple[str, ...]
    variables: dict[str, tuple[tuple[str, ...], str]]  # name -> (dims, dtype)


def _fill(dtype: str) -> Any:
    return np.nan if np.dtype(dtype).kind == "f" else -1 if np.dtype(dtype).kind in "iu" else False


def is_result_store(path: str) -> bool:
    """True for a protocol's store (a study store is not one)."""
    try:
        return "protocol" in open_group(path, "r", "store").attrs
    except FileNotFoundError:
        return False


def _layout(coords: dict[str, Sequence[Any]], parts: Sequence[Part]) -> tuple[xr.Dataset, dict[str, Any]]:
    sizes = {d: len(v) for d, v in coords.items()}
    data, encoding = {}, {}
    for part in parts:
        flags = {f"checksum_{part.name}": (part.units, "int64"), f"done_{part.name}": (part.units, "bool")}
        for name, (dims, dtype) in {**part.variables, **flags}.items():
            missing = [d for d in dims if d not in sizes]
            if missing or tuple(dims[:len(part.units)]) != part.units:
                raise ValueError(f"variable {name} of part {part.name}: dims {dims} must start with {part.units} "
                                 f"and have coordinates (missing {missing})")
            chunks = tuple(1 if d in part.units else sizes[d] for d in dims)
            data[name] = (dims, da.full(tuple(sizes[d] for d in dims), _fill(dtype), dtype=dtype, chunks=chunks))
            encoding[name] = {"chunks": chunks}
    values = {d: np.asarray(v, dtype=object if isinstance(v[0], str) else None) for d, v in coords.items() if len(v)}
    return xr.Dataset(data, coords=values), encoding


class ResultStore:
    """A protocol's store: create or reopen it (`open_or_create`), list and write units."""

    def __init__(self, path: str, mode: str = "r+") -> None:
        self.path = path
        self.group = open_group(path, mode, "protocol store")
        self.parts = {p["name"]: Part(p["name"], tuple(p["units"]), {k: (tuple(d), t) for k, (d, t) in
                                                                      p["variables"].items()})
                      for p in json.loads(self.group.attrs.get("parts", "[]"))}

    @classmethod
    def open_or_create(cls, path: str, protocol: str, identity: dict[str, Any], coords: dict[str, Sequence[Any]],
                       parts: Sequence[Part]) -> tuple[ResultStore, bool]:
        """The store at `path` (created when absent); refused when it holds another protocol or identity."""
        check_path(path, "protocol")
        identity = json.loads(json.dumps(identity, sort_keys=True))
        with claim(path, "store"):  # one run creates it; another, started at once, then finds it made
            if (Path(path) / "zarr.json").exists():
                store = cls(path)
                if store.group.attrs.get("created") is not False:
                    store.check(protocol, identity)
                    return store, False
                remove(path)  # a creation killed before its layout was whole: nothing was computed in it
            return cls._create(path, protocol, identity, coords, parts), True

    @classmethod
    def _create(cls, path: str, protocol: str, identity: dict[str, Any], coords: dict[str, Sequence[Any]],
                parts: Sequence[Part]) -> ResultStore:
        ds, encoding = _layout(coords, parts)
        ds.attrs.update(protocol=protocol, schema_version=SCHEMA_VERSION, identity=json.dumps(identity, sort_keys=True),
                        parts=json.dumps([{"name": p.name, "units": p.units, "variables": p.variables} for p in parts]),
                        created=False)
        ignore_zarr_notes()
        ds.to_zarr(path, mode="w-", compute=False, zarr_format=3, encoding=encoding, consolidated=True)
        open_group(path, "r+", "protocol store").attrs["created"] = True
        return cls(path)

    @property
    def identity(self) -> dict[str, Any]:
        return json.loads(self.group.attrs["identity"])

    def check(self, protocol: str, identity: dict[str, Any]) -> None:
        stored = self.group.attrs.get("protocol")
        if stored != protocol:
            raise StoreMismatch(self.path, [Difference("protocol", stored, protocol)])
        have = self.identity
        diffs = [Difference(k, have.get(k), identity.get(k)) for k in sorted(set(have) | set(identity))
                 if have.get(k) != identity.get(k)]
        if diffs:
            raise StoreMismatch(self.path, diffs)

    def coord(self, dim: str) -> list[Any]:
        return self.group[dim][:].tolist() if dim in self.group else []

    def pending(self, part: str) -> list[tuple[int, ...]]:
        """Units of `part` not yet done, as index tuples over its unit dimensions."""
        flags = np.asarray(self.group[f"done_{part}"][...])
        return [tuple(int(i) for i in idx) for idx in np.argwhere(~flags)]

    def write(self, part: str, unit: tuple[int, ...], **values: np.ndarray) -> None:
        """Write every variable of one unit of `part`, then set its done flag."""
        p = self.parts[part]
        if set(values) != set(p.variables):
            raise KeyError(f"part {part} writes {sorted(p.variables)}, got {sorted(values)}")
        written = []
        for name in sorted(values):
            arr = self.group[name]
            # xarray does not check numpy-backed writes; not an assert, so it holds under python -O
            if any(c != 1 for c in arr.chunks[:len(unit)]):
                raise StoreLayoutError(f"{name} is not chunked 1 along {p.units}: a unit write would not be whole chunks")
            expected = arr.shape[len(unit):]
            value = np.asarray(values[name], dtype=arr.dtype)
            if value.shape != expected:
                raise ValueError(f"{name} of unit {unit} has shape {value.shape}, expected {expected}")
            arr[unit] = value
            written.append(value)
        if f"checksum_{part}" in self.group:  # a store made before checksums has none
            self.group[f"checksum_{part}"][unit] = checksum(*written)
        self.group[f"done_{part}"][unit] = True

    def claim(self, unit: str, wait: bool = True) -> Any:
        """Hold the claim on `unit` (a name, e.g. "step-0-3") while it is computed: True inside the block,
        or, with `wait` False, False at once when another run holds it (`storage.claims`)."""
        return claim(self.path, unit, wait)

    def _unit_checksum(self, part: str, unit: tuple[int, ...]) -> int:
        return checksum(*(np.asarray(self.group[name][unit]) for name in sorted(self.parts[part].variables)))

    def verify(self) -> list[dict[str, Any]]:
        """Every finished unit read back and checked against the checksum recorded with its flag: one entry
        per damaged unit (a chunk truncated, deleted or overwritten), naming its part, unit and why."""
        damaged = []
        for part in self.parts:
            if f"checksum_{part}" not in self.group:
                continue  # made before checksums were recorded
            sums = np.asarray(self.group[f"checksum_{part}"][...])
            for unit in map(tuple, np.argwhere(np.asarray(self.group[f"done_{part}"][...]))):
                unit = tuple(int(i) for i in unit)
                try:
                    found, why = self._unit_checksum(part, unit), ""
                except Exception as e:  # a truncated chunk fails to decompress
                    found, why = None, f"unreadable ({type(e).__name__}: {e})"
                if found != int(sums[unit]):
                    damaged.append({"kind": "protocol", "part": part, "unit": list(unit),
                                    "why": why or f"checksum {found} differs from the recorded {int(sums[unit])}"})
        return damaged

    def mark_damaged(self, damaged: list[dict[str, Any]]) -> None:
        """Unset the flags of damaged units, so the next run of the protocol recomputes exactly them."""
        for d in damaged:
            self.group[f"done_{d['part']}"][tuple(d["unit"])] = False

    def status(self) -> dict[str, Any]:
        """The protocol, what it was run on, and per part the units done out of all."""
        if self.group.attrs.get("created") is False:
            raise StoreStateError(f"the {self.group.attrs.get('protocol')} protocol's store {self.path!r} was interrupted "
                                  "while it was being created (nothing was computed in it): rerun the protocol's "
                                  "command, which creates it again")
        done = {name: np.asarray(self.group[f"done_{name}"][...]) for name in self.parts}
        return {"path": self.path, "protocol": self.group.attrs["protocol"], "identity": self.identity,
                "parts": {name: (int(d.sum()), int(d.size)) for name, d in done.items()}}

    def read(self, name: str, unit: tuple[int, ...] = ()) -> np.ndarray:
        return np.asarray(self.group[name][unit] if unit else self.group[name][...])

    def dataset(self) -> xr.Dataset:
        ignore_zarr_notes()
        return xr.open_zarr(self.path, consolidated=False)
