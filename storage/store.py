"""The study store: one Zarr v3 group that ``xarray.open_zarr`` reads.

The template (metadata, coordinates and the small flag arrays) is written once by `create`;
afterwards tasks fill whole blocks of samples through a `Store` handle. A block is a chunk-aligned
range of samples, so concurrent writers never touch the same chunk; flags have one chunk each for
the same reason. A flag is set only after its block's data is written (with its checksum, just
before: `integrity`), so a killed run leaves at worst a block whose flag is False, which the next
run recomputes (deterministically, hence bit-identical).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import dask.array as da

import numpy as np
import xarray as xr
import zarr

from .grid import at_input, to_input
from .group import _Arrays, _committed, _unfinished, ignore_zarr_notes, open_group, unfinished_error
from .integrity import Checksums
from .summary import Summary
from .schema import (SAMPLE_VARIABLES, SCHEMA, SCHEMA_VERSION, VARIABLES, Difference, StoreLayoutError, StoreMismatch,
                     StoreStateError, Template, Variable, _evaluation_attrs, _layout, _normal, block_slice, n_blocks)



def open_dataset(path: str, as_stored: bool = False) -> xr.Dataset:
    """The study as a lazy (Dask-backed) ``xarray.Dataset``. Read through the consolidated metadata when it is
    there (one read, where each array's metadata is a request on object storage), else array by array (a run
    killed between a change of the layout and its consolidation leaves none). Maps stored on a map grid are
    read back at the input size (`storage.grid`), unless `as_stored`."""
    Store(path, mode="r")  # refuses, in one line, a path that holds no study store or an unfinished one
    ignore_zarr_notes()
    try:
        ds = xr.open_zarr(path, consolidated=True)
    except (ValueError, KeyError):
        ds = xr.open_zarr(path, consolidated=False)
    return ds if as_stored else at_input(ds)


class Store(Checksums, Summary):
    """A study store opened once: identity, flags, block reads and writes, growth."""

    def __init__(self, path: str, mode: str = "r+") -> None:
        self.path = path
        # Not the consolidated metadata: it is refreshed only after a change of layout
        # (see grow), and block work must always see the arrays as they are.
        self.group = _Arrays(open_group(path, mode, "study store"), path)
        attrs = self.group.attrs
        if "protocol" in attrs:
            raise StoreStateError(f"{path!r} holds the {attrs['protocol']} protocol's store, not a study store; "
                                  f"`saliency-atlas status {path}` shows it")
        if _unfinished(self.group):
            raise unfinished_error(path)

    # ------------------------------------------------------------------ identity

    @property
    def attrs(self) -> dict[str, Any]:
        a = dict(self.group.attrs)
        a["params"] = json.loads(a.get("params", "{}"))
        return a

    @property
    def block_size(self) -> int:
        return int(self.group.attrs["block_size"])

    @property
    def n_samples(self) -> int:
        return int(self.group["sample"].shape[0])

    def sample_ids(self) -> list[str]:
        return self.group.names("sample_id")

    def fingerprinted_ids(self) -> list[str]:
        """The samples the stored dataset fingerprint covers: all committed ones, or fewer when a growth was
        killed after committing its new names and before recording their fingerprint."""
        ids = self.sample_ids()
        return ids[: int(self.group.attrs.get("dataset_fingerprint_samples", len(ids)))]

    def methods(self) -> list[str]:
        return self.group.names("xai_method")

    def classes(self) -> list[str]:
        return self.group.names("class")

    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sample's true class and the model's prediction (-1: unknown, or not ingested yet)."""
        return self.group["label"][:], self.group["prediction"][:]

    def metrics(self) -> list[str]:
        return self.group.names("metric") if "metric" in self.group else []

    def has(self, name: str) -> bool:
        return name in self.group

    def differences(self, t: Template, stored_digest: str | None = None) -> list[Difference]:
        """How a run's template differs from this store (empty: it may reuse and grow it).

        The store may grow: ``t`` may list more samples (after the stored ones, in the same
        order) and more methods. ``stored_digest`` is the dataset's digest of the samples
        already stored, recomputed from the data as it is now; without it, ``t``'s own
        ``dataset_fingerprint`` is compared. A parameter missing from a stored record means
        the method's default (``t.defaults``): a store made before a parameter existed opens.
        """
        a, out = self.attrs, []
        if a.get("schema_version") != SCHEMA_VERSION:
            out.append(Difference("schema_version", a.get("schema_version"), SCHEMA_VERSION))
        if a.get("contrast", "runner-up") != t.attrs.get("contrast", "runner-up"):
            out.append(Difference("contrast", a.get("contrast", "runner-up"), t.attrs.get("contrast", "runner-up")))
        for what, now in (("model", t.attrs.get("model_fingerprint")),
                          ("dataset", stored_digest or t.attrs.get("dataset_fingerprint"))):
            if now is not None and a.get(f"{what}_fingerprint") != now:
                out.append(Difference(what, f"{a.get(what)} ({str(a.get(f'{what}_fingerprint'))[:12]})",
                                      f"{t.attrs.get(what)} ({str(now)[:12]})"))
        ids = self.sample_ids()
        if t.sample_ids[: len(ids)] != ids:
            out.append(Difference("samples", len(ids), len(t.sample_ids)))
        if a.get("block_size") != t.block_size:
            out.append(Difference("block_size", a.get("block_size"), t.block_size))
        if list(a.get("image_shape", [])) != list(t.image_shape):
            out.append(Difference("image_shape", a.get("image_shape"), list(t.image_shape)))
        for key in ("image_mean", "image_std"):
            if key in a and key in t.attrs and _normal(a[key]) != _normal(t.attrs[key]):
                out.append(Difference("preprocessing", a[key], t.attrs[key], detail=key.removeprefix("image_")))
        stored_classes = _committed(self.group["class"][:])
        if stored_classes and stored_classes != list(t.classes):
            out.append(Difference("classes", stored_classes, list(t.classes)))
        stored_metric_params = json.loads(a.get("metric_params", "{}"))
        for kind, names, stored_all, asked_all, defaults in (
            ("params", t.methods, a["params"], t.params, t.defaults),
            ("metric_params", t.metrics, stored_metric_params, t.metric_params, t.metric_defaults),
        ):
            for name in names:
                if name not in stored_all:
                    continue
                stored = _normal({**defaults.get(name, {}), **stored_all[name]})
                asked = _normal(asked_all.get(name, {}))
                keys = sorted(k for k in {*stored, *asked} if stored.get(k) != asked.get(k))
                if keys:
                    out.append(Difference(kind, {k: stored.get(k) for k in keys}, {k: asked.get(k) for k in keys},
                                          detail=name))
        return out

    def check_compatible(self, t: Template, stored_digest: str | None = None) -> None:
        """Refuse (without touching the store) a run whose model, data or parameters differ."""
        differences = self.differences(t, stored_digest)
        if differences:
            raise StoreMismatch(self.path, differences)

    # ------------------------------------------------------------------ growth

    def grow(self, t: Template) -> dict[str, Any]:
        """Add ``t``'s new samples, methods and metrics (after `check_compatible`).

        Data arrays are resized (or, for a study's first metrics, created) first and the
        coordinates last, so an interrupted growth leaves a store that the next call completes.
        A short last block that gains samples is marked not done and not scored, and recomputed
        (deterministically, so its old samples are rewritten bit-identically). Returns what was added.
        """
        g = self.group
        old_ids, old_methods, old_metrics = self.sample_ids(), self.methods(), self.metrics()
        new_methods = [m for m in t.methods if m not in old_methods]
        new_metrics = [m for m in t.metrics if m not in old_metrics]
        n_old, n_new, b = len(old_ids), len(t.sample_ids), t.block_size
        missing = [v for v in t.variables() if v.name not in g]
        steps = max(t.curve_points, g["step"].shape[0] if "step" in g else 0)
        unfinished = (g["sample_id"].shape[0] != n_old or g["xai_method"].shape[0] != len(old_methods)
                      or ("metric" in g and g["metric"].shape[0] != len(old_metrics)))
        if (n_new == n_old and not new_methods and not new_metrics and not missing and not unfinished
                and ("step" not in g or g["step"].shape[0] == steps)):
            return {"samples": 0, "methods": [], "metrics": []}
        if n_new > n_old and n_old % b:  # the short last block will hold more samples: redo it
            for v in SCHEMA:
                if v.dims[-1] == "block" and v.dtype == "bool" and v.name in g:
                    g[v.name][..., n_old // b] = False
        n = max(n_new, n_old)
        sizes = {"sample": n, "block": n_blocks(n, b), "xai_method": len(old_methods) + len(new_methods),
                 "metric": len(old_metrics) + len(new_metrics), "step": steps}
        for v in SCHEMA:
            if v.name in g:
                self._resize(g[v.name], tuple(sizes.get(d, k) for d, k in zip(v.dims, g[v.name].shape)))
        if missing:
            self._add_variables(t, missing, sizes, old_metrics + new_metrics)
        if n_new > n_old:
            self._resize(g["sample"], (n_new,))
            g["sample"][n_old:] = np.arange(n_old, n_new)
            self._extend_names("sample_id", t.sample_ids)
        if "step" in g and g["step"].shape[0] != steps:
            self._resize(g["step"], (steps,))
            g["step"][:] = np.arange(steps)
        if new_methods:
            params = json.loads(g.attrs.get("params", "{}"))
            params.update({m: t.params.get(m, {}) for m in new_methods})
            g.attrs["params"] = json.dumps(params, sort_keys=True)
            self._extend_names("xai_method", old_methods + new_methods)
        if new_metrics:
            params = json.loads(g.attrs.get("metric_params", "{}"))
            params.update({m: t.metric_params.get(m, {}) for m in new_metrics})
            g.attrs.update(_evaluation_attrs(t))
            g.attrs["metric_params"] = json.dumps(params, sort_keys=True)
            self._extend_names("metric", old_metrics + new_metrics)
        # after the names: until here the fingerprint covers the samples it counts, which are still committed
        g.attrs.update(dataset_fingerprint=t.attrs.get("dataset_fingerprint", g.attrs.get("dataset_fingerprint")),
                       dataset_fingerprint_samples=n_new)
        if "failure_codes" in t.attrs:
            g.attrs["failure_codes"] = t.attrs["failure_codes"]
        zarr.consolidate_metadata(self.path, zarr_format=3)
        return {"samples": n_new - n_old, "methods": new_methods, "metrics": new_metrics}

    def _add_variables(self, t: Template, variables: list[Variable], sizes: dict[str, int],
                       metrics: list[str]) -> None:
        """Create variables a study did not have yet (its first metrics), sized as the store is now."""
        layout_of = dataclasses.replace(t, metrics=metrics, curve_points=sizes["step"])
        ds, encoding = _layout(layout_of, variables)
        ds = ds.drop_vars([c for c in ("metric", "step") if c in self.group])
        for v in variables:  # the other dimensions as the store has them (it may hold more methods)
            shape = tuple(sizes.get(d, ds.sizes[d]) for d in v.dims)
            if shape != ds[v.name].shape:
                ds[v.name] = (v.dims, da.full(shape, v.fill, dtype=ds[v.name].dtype, chunks=ds[v.name].data.chunksize))
        ds.to_zarr(self.path, mode="a", compute=False, zarr_format=3, encoding=encoding, consolidated=False)
        self.group = _Arrays(zarr.open_group(self.path, mode="r+", zarr_format=3, use_consolidated=False), self.path)

    @staticmethod
    def _resize(arr: zarr.Array, shape: tuple[int, ...]) -> None:
        if tuple(shape) != arr.shape:
            arr.resize(tuple(shape))

    def _extend_names(self, coord: str, names: list[str]) -> None:
        """Resize a string coordinate to ``names`` and write them (idempotent)."""
        arr = self.group[coord]
        self._resize(arr, (len(names),))
        arr[:] = np.array(names, dtype=object)
        self.group._names.pop(coord, None)

    # ------------------------------------------------------------------ blocks

    def _method_index(self, method: str) -> int:
        names = self.methods()
        if method not in names:
            raise KeyError(f"method {method!r} is not in this store; it has {names}")
        return names.index(method)

    def aligned(self, block: int) -> slice:
        """The sample slice of ``block``, checked to cover whole chunks of every sample variable."""
        n = self.n_samples
        s = block_slice(block, n, self.block_size)
        for v in SCHEMA:  # the variables block writes fill (clusters are written whole rows at a time)
            if "sample" in v.dims and v.guard and v.name in self.group:
                arr = self.group[v.name]
                chunk = (arr.shards or arr.chunks)[v.dims.index("sample")]  # the unit a writer rewrites
                # xarray does not check numpy-backed region writes: a misaligned write could race
                # with a neighbouring block's writer. Not an assert: it must hold under python -O.
                if s.start % chunk or (s.stop % chunk and s.stop != n):
                    raise StoreLayoutError(
                        f"block {block} ({s.start}:{s.stop}) is not aligned with {v.name}'s chunks of {chunk}")
        return s

    def write_samples(self, block: int, **arrays: np.ndarray) -> None:
        """Write the per-sample variables of one whole block, then mark it ingested."""
        unknown = set(arrays) - set(SAMPLE_VARIABLES)
        if unknown:
            raise KeyError(f"unknown sample variables {sorted(unknown)}; valid: {SAMPLE_VARIABLES}")
        s = self.aligned(block)
        written = {}
        for name, value in arrays.items():
            if name not in self.group:  # a dataset without masks, a store without images
                continue
            expected = (s.stop - s.start, *self.group[name].shape[1:])
            if value.shape != expected:
                raise ValueError(f"{name} for block {block} has shape {value.shape}, expected {expected}")
            written[name] = np.asarray(value, dtype=self.group[name].dtype)
            self.group[name][s] = written[name]
        self._record(("ingested_checksum", block), self._sample_checksum(block, written))
        self.group["ingested"][block] = True

    def write_attribution(self, method: str, block: int, maps: np.ndarray, failure: np.ndarray | None = None) -> None:
        """Write one whole block of maps for ``method`` and, per sample, its failure code (0: a usable
        map; a failed sample's map must be NaN); ``done`` is set only afterwards."""
        s, m = self.aligned(block), self._method_index(method)
        arr = self.group["attribution"]
        expected = (s.stop - s.start, *arr.shape[2:])
        if maps.shape != expected:
            raise ValueError(f"maps for {method} block {block} have shape {maps.shape}, expected {expected}")
        failure = np.zeros(expected[0], np.int8) if failure is None else np.asarray(failure, np.int8)
        if failure.shape != expected[:1] or not np.isnan(maps[failure > 0]).all():
            raise ValueError(f"failure codes for {method} block {block} must be ({expected[0]},) with the failed "
                             "samples' maps NaN")
        maps = maps.astype(arr.dtype, copy=False)
        arr[m, s] = maps
        if "failure" in self.group:  # a store made before failures were recorded gains it in `grow`
            self.group["failure"][m, s] = failure
        self._record(("checksum", m, block), self._map_checksum(m, block, (maps, failure)))
        self.group["done"][m, block] = True

    def write_scores(self, method: str, metric: str, block: int, value: np.ndarray, status: np.ndarray,
                     curve: np.ndarray | None = None) -> None:
        """Write one whole block of `metric`'s scores (and curves) of `method`; `scored` is set afterwards."""
        s, m = self.aligned(block), self._method_index(method)
        metrics = self.metrics()
        if metric not in metrics:
            raise KeyError(f"metric {metric!r} is not in this store; it has {metrics}")
        k, n = metrics.index(metric), s.stop - s.start
        if value.shape != (n,) or status.shape != (n,):
            raise ValueError(f"scores of {method}/{metric} block {block} have shape {value.shape}, expected ({n},)")
        value, status = value.astype(np.float32), status.astype(np.int8)
        self.group["score"][m, s, k], self.group["score_status"][m, s, k] = value, status
        written = [value, status]
        if "curve" in self.group:
            full = np.full((n, self.group["curve"].shape[-1]), np.nan, np.float32)
            if curve is not None:
                full[:, : curve.shape[1]] = curve
                self.group["curve"][m, k, s, : curve.shape[1]] = full[:, : curve.shape[1]]
            written.append(full)
        self._record(("score_checksum", m, k, block), self._score_checksum(m, k, block, tuple(written)))
        self.group["scored"][m, k, block] = True

    # ------------------------------------------------------------------ clusters (whole rows)

    def write_clusters(self, method: str, labels: np.ndarray, eigengap: np.ndarray, params: dict[str, Any]) -> None:
        """Store `method`'s clusters (one per sample, -1 where not clustered) and per-class eigengaps,
        then record `params` (how they were found, with the number of samples): the record comes last,
        so a store whose record matches holds the clusters it describes."""
        m, g = self._method_index(method), self.group
        n, classes = self.n_samples, int(g["class"].shape[0])
        if labels.shape != (n,) or eigengap.shape != (classes,):
            raise ValueError(f"clusters of {method} have shapes {labels.shape} and {eigengap.shape}; "
                             f"expected ({n},) and ({classes},)")
        record = json.loads(g.attrs.get("cluster_params", "{}"))
        record.pop(method, None)
        g.attrs["cluster_params"] = json.dumps(record, sort_keys=True)  # unrecorded while being rewritten
        self._add_rows(["cluster", "eigengap"])
        g["cluster"][m, :] = labels.astype(np.int16)  # a whole row: every chunk of it, no neighbour shared
        g["eigengap"][m, :] = eigengap.astype(np.float32)
        record[method] = _normal(params)
        g.attrs["cluster_params"] = json.dumps(record, sort_keys=True)
        zarr.consolidate_metadata(self.path, zarr_format=3)

    def cluster_params(self) -> dict[str, Any]:
        """Per method, how its stored clusters were found (methods never clustered are absent)."""
        return json.loads(self.group.attrs.get("cluster_params", "{}"))

    def _add_rows(self, names: list[str]) -> None:
        """Create the variables `names` (rows per method, one chunk per method) when the store lacks them."""
        g = self.group
        for v in (VARIABLES[name] for name in names if name not in g):
            shape = tuple(int(g[d].shape[0]) for d in v.dims)
            # chunked like the blocks along samples, as every variable is (a block's writer never shares a chunk)
            chunks = tuple(1 if d == "xai_method" else self.block_size if d == "sample" else n
                           for d, n in zip(v.dims, shape))
            g.create_array(v.name, shape=shape, chunks=chunks, dtype=v.dtype, fill_value=v.fill,
                           dimension_names=v.dims)
        self.group = _Arrays(g._group, self.path)  # what exists has changed

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the model input."""
        return tuple(self.attrs["image_shape"][1:])  # type: ignore[return-value]

    @property
    def map_grid(self) -> tuple[int, int] | None:
        """(h, w) the maps are stored at, when smaller than the input (`storage.grid`); None: the input size."""
        grid = tuple(self.group["attribution"].shape[2:])
        return None if grid == self.input_size else grid  # type: ignore[return-value]

    def read_maps(self, method: str, block: int, as_stored: bool = False) -> np.ndarray:
        """The block's maps of `method` at the input size (as stored, on a map grid, with `as_stored`)."""
        s = block_slice(block, self.n_samples, self.block_size)
        maps = self.group["attribution"][self._method_index(method), s]
        return maps if as_stored or self.map_grid is None else to_input(maps, self.input_size)

    def read_failures(self, method: str, block: int) -> np.ndarray:
        """The block's failure codes of `method` (-1 for a store made before failures were recorded)."""
        s = block_slice(block, self.n_samples, self.block_size)
        if "failure" not in self.group:
            return np.full(s.stop - s.start, -1, np.int8)
        return self.group["failure"][self._method_index(method), s]

    def pending_scores(self, method: str, metric: str) -> list[int]:
        """Blocks of `method` not yet scored by `metric`."""
        flags = self.group["scored"][self._method_index(method), self.metrics().index(metric)]
        return [int(b) for b in np.flatnonzero(~flags)]

    def read_samples(self, block: int, *names: str) -> dict[str, np.ndarray]:
        s = block_slice(block, self.n_samples, self.block_size)
        return {name: self.group[name][s] for name in names}

    def ingested_samples(self) -> np.ndarray:
        """Per sample, True when its block's inputs and predictions are written."""
        n, b = self.n_samples, self.block_size
        return np.repeat(self.group["ingested"][:], b)[:n]

    def require_ingested(self) -> np.ndarray:
        """The positions of the ingested samples; refused in one line when there are none yet."""
        found = np.flatnonzero(self.ingested_samples())
        if not found.size:
            raise StoreStateError(f"the store {self.path!r} has no ingested samples yet (its study stopped before the "
                                  "first block was read): rerun the study command that made it to resume "
                                  f"(`saliency-atlas status {self.path}` shows how far it got)")
        return found

    def pending(self, method: str | None = None) -> list[int]:
        """Blocks still to compute: for ``method``, or blocks not yet ingested when None."""
        flags = self.group["ingested"][:] if method is None else self.group["done"][self._method_index(method)]
        return [int(b) for b in np.flatnonzero(~flags)]
