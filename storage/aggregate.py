"""Dataset-level summaries of a study, computed with Dask without loading it into memory.

>>> import storage
>>> ds = storage.open_dataset("runs/shapes.zarr")
>>> wrong = storage.select(ds, xai_method="gradcam", cls="circle", correct=False)   # lazy
>>> agg = storage.aggregate("runs/shapes.zarr")          # writes runs/shapes.agg.zarr
>>> agg.map_mean.sel(xai_method="gradcam", **{"class": "circle"}).plot()

:func:`aggregate` reads every computed chunk of ``attribution`` exactly once (chunks of
blocks that are not ``done`` for their method are not read at all): one Dask task per
chunk reduces it to per-group partial sums (sum, sum of squares, count of finite values
per pixel, number of maps) for the groups present in that chunk, and a tree of merge
tasks adds the partials up.  All statistics, the ``score`` summary included, come out of
one ``dask.compute`` call, so the work runs on whatever Dask scheduler is active (the
local threads, or a ``distributed.Client``), and memory stays at a few chunks plus the
(small) result.

Groups are the cells of a grid (class slot x correctness slot): the class slot is the
sample's ``label`` (or ``prediction``, ``by="prediction"``), with one extra slot for an
unknown class (-1); the correctness slot is incorrect / correct / unknown (no label).
Per class, per correctness, per class x correctness and overall statistics are sums of
cells of that grid, so one pass gives all of them.

Only samples whose block is ``done`` for a method count for that method, and NaN pixels
are left out (a map that is NaN everywhere does not count).  ``std`` is the population
standard deviation (``ddof=0``, as ``numpy.nanstd``).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Iterator, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr

AGGREGATE_VERSION = 1
_BY = ("label", "prediction")
_INCORRECT, _CORRECT, _UNKNOWN = 0, 1, 2
_SLOTS = 3  # correctness slots per class slot
_IDENTITY = ("model", "model_weights", "model_fingerprint", "dataset", "dataset_fingerprint",
             "schema_version", "block_size", "package_version", "params")

# A partial result: (group codes present (k,), sum (k, P), sum of squares (k, P),
# finite count (k, P), number of maps (k,)) with P = pixels of one map.
Partial = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # numpy warns on empty and all-NaN slices, which become NaN (a group with no finite value). Zarr's
    # notes are ignored by `storage.store`. Aggregation runs alone (its Dask threads inside this scope).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield


# --------------------------------------------------------------------------- selection


def _names(ds: xr.Dataset, coord: str) -> list[str]:
    return [str(v) for v in np.atleast_1d(ds[coord].values)]


def _class_index(ds: xr.Dataset, cls: int | str) -> int:
    classes = _names(ds, "class")
    if isinstance(cls, (bool, np.bool_)):
        raise TypeError(f"cls must be a class name or index, got {cls!r}; classes: {classes}")
    if isinstance(cls, (int, np.integer)):
        if not 0 <= int(cls) < len(classes):
            raise ValueError(f"cls={int(cls)} is outside 0..{len(classes) - 1}; classes: {classes}")
        return int(cls)
    if isinstance(cls, str):
        if cls not in classes:
            raise ValueError(f"cls={cls!r} is not a class of this study; classes: {classes}")
        return classes.index(cls)
    raise TypeError(f"cls must be a class name or index (or a list of them), got {type(cls).__name__}")


def _check_methods(ds: xr.Dataset, xai_method: str | Sequence[str]) -> None:
    have = _names(ds, "xai_method")
    asked = [xai_method] if isinstance(xai_method, str) else list(xai_method)
    missing = [m for m in asked if m not in have]
    if missing:
        raise ValueError(f"xai_method {missing} is not in this study; it has {have}")


def _block_of(ds: xr.Dataset) -> np.ndarray:
    """The block of each sample in ``ds`` (works on subsets: ``sample`` holds positions)."""
    return np.asarray(ds["sample"].values, dtype=np.int64) // int(ds.attrs["block_size"])


def select(
    ds: xr.Dataset,
    xai_method: str | Sequence[str] | None = None,
    cls: int | str | Sequence[int | str] | None = None,
    *,
    by: str = "label",
    correct: bool | None = None,
    done_only: bool = False,
) -> xr.Dataset:
    """A lazy subset of a study.

    ``xai_method``: a name (the dimension is dropped, as with ``.sel``) or a list of names.
    ``cls``: a class name or index, or a list of them, matched on ``label`` or, with
    ``by="prediction"``, on ``prediction``.  ``correct``: True keeps samples the model got
    right (prediction == label), False those it got wrong; samples without a label
    (-1) are in neither.  ``done_only``: keep only samples whose block is done for every
    selected method.  Only the small per-sample vectors are read; the maps stay lazy.
    """
    if by not in _BY:
        raise ValueError(f"by must be one of {_BY}, got {by!r}")
    if correct not in (None, True, False):
        raise TypeError(f"correct must be True, False or None, got {correct!r}")
    ds = _committed(ds)
    if xai_method is not None:
        _check_methods(ds, xai_method)
        ds = ds.sel(xai_method=xai_method)
    keep = np.ones(ds.sizes["sample"], bool)
    needed = ([by] if cls is not None else []) + (["label", "prediction"] if correct is not None else [])
    vectors = dict(zip(needed, dask.compute(*(ds[v].data for v in needed)))) if needed else {}
    if cls is not None:
        wanted = [_class_index(ds, c) for c in ([cls] if isinstance(cls, (str, int, np.integer)) else cls)]
        keep &= np.isin(np.asarray(vectors[by]), wanted)
    if correct is not None:
        label, pred = np.asarray(vectors["label"]), np.asarray(vectors["prediction"])
        keep &= (label >= 0) & ((label == pred) if correct else (label != pred))
    if done_only:
        done = np.asarray(ds["done"].values, bool).reshape(-1, ds.sizes["block"])
        keep &= done.all(axis=0)[_block_of(ds)]
    if keep.all():
        return ds
    return ds.isel(sample=np.flatnonzero(keep))


# --------------------------------------------------------------------------- one pass


def _empty(pixels: int) -> Partial:
    z = np.zeros((0, pixels))
    return np.zeros(0, np.int64), z, z.copy(), z.copy(), np.zeros(0)


def _chunk_stats(block: np.ndarray, ok: np.ndarray, codes: np.ndarray) -> Partial:
    """Partial sums of one chunk (1, n, H, W) of ``attribution`` for the groups in it."""
    x = np.asarray(block, dtype=np.float64).reshape(block.shape[1], -1)
    finite = np.isfinite(x)
    keep = ok & finite.any(axis=1)
    if not keep.any():
        return _empty(x.shape[1])
    order = np.flatnonzero(keep)
    order = order[np.argsort(codes[order], kind="stable")]  # samples grouped by their code
    g, x, finite = codes[order], x[order], finite[order]
    x[~finite] = 0.0
    groups, starts = np.unique(g, return_index=True)
    # Segment sums over the sorted samples (memory-bound; no BLAS threads to contend for).
    def segment_sums(v: np.ndarray) -> np.ndarray:
        return np.add.reduceat(v, starts, axis=0)

    sizes = np.diff(np.append(starts, len(g))).astype(np.float64)
    return groups, segment_sums(x), segment_sums(x * x), segment_sums(finite.astype(np.float64)), sizes


def _merge(*parts: Partial) -> Partial:
    groups = np.unique(np.concatenate([p[0] for p in parts]))
    pixels = parts[0][1].shape[1]
    out = (groups, *(np.zeros((len(groups), pixels)) for _ in range(3)), np.zeros(len(groups)))
    for p in parts:
        where = np.searchsorted(groups, p[0])  # codes within a part are unique
        for i in range(1, 5):
            out[i][where] += p[i]
    return out


def _tree(parts: list, split_every: int = 8):
    while len(parts) > 1:
        parts = [dask.delayed(_merge, pure=True)(*parts[i:i + split_every])
                 for i in range(0, len(parts), split_every)]
    return parts[0]


def _committed(ds: xr.Dataset) -> xr.Dataset:
    """Without the slots of a growth that did not finish (empty method names or sample ids)."""
    if "xai_method" in ds.dims:
        names = _names(ds, "xai_method")
        if not all(names):
            ds = ds.isel(xai_method=[i for i, n in enumerate(names) if n])
    if "sample_id" in ds.coords:
        empty = np.array([not str(i) for i in ds["sample_id"].values])
        if empty.any():
            ds = ds.isel(sample=np.flatnonzero(~empty))
    return ds


def _moments(s: np.ndarray, q: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std from sum, sum of squares and count (NaN where count is 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s / n, np.nan)
        var = np.where(n > 0, q / n - mean * mean, np.nan)
    return mean.astype(np.float32), np.sqrt(np.maximum(var, 0.0)).astype(np.float32)


def _study_view(ds: xr.Dataset, by: str) -> xr.Dataset:
    """The study dataset checked, without unfinished growth slots, with an `xai_method` dimension."""
    if by not in _BY:
        raise ValueError(f"by must be one of {_BY}, got {by!r}")
    for name in ("attribution", "done", "label", "prediction"):
        if name not in ds:
            raise ValueError(f"this is not a study dataset: it has no {name!r} variable")
    if "block_size" not in ds.attrs:
        raise ValueError("this is not a study dataset: its attributes have no 'block_size'")
    ds = _committed(ds)
    for name in ("attribution", "done", "score"):
        if name in ds and "xai_method" not in ds[name].dims:  # a single method selected by name
            ds = ds.assign({name: ds[name].expand_dims("xai_method")})
    return ds


def _groups(ds: xr.Dataset, by: str, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample its group code (class slot x correctness slot), per (method, sample) whether its
    block is done for the method, and the done flags (method, block); read eagerly (small)."""
    label, pred, done = dask.compute(ds["label"].data, ds["prediction"].data,
                                     ds["done"].transpose("xai_method", "block").data)
    done = np.asarray(done, bool).reshape(ds.sizes["xai_method"], -1)
    label, pred = np.asarray(label, np.int64), np.asarray(pred, np.int64)
    key = label if by == "label" else pred
    key_slot = np.where((key >= 0) & (key < n_classes), key, n_classes)
    known = (label >= 0) & (pred >= 0)
    correct_slot = np.where(known, np.where(label == pred, _CORRECT, _INCORRECT), _UNKNOWN)
    return key_slot * _SLOTS + correct_slot, done[:, _block_of(ds)], done


def _partials(attribution: da.Array, ok: np.ndarray, codes: np.ndarray) -> list:
    """Per method, one delayed task per chunk that holds a done sample, merged by a tree (None: no chunk)."""
    if attribution.numblocks[0] != attribution.shape[0] or attribution.numblocks[2:] != (1, 1):
        attribution = attribution.rechunk({0: 1, 2: -1, 3: -1})
    chunks = attribution.to_delayed()[:, :, 0, 0]
    stops = np.cumsum(attribution.chunks[1])
    starts = stops - np.asarray(attribution.chunks[1])
    per_method = []
    for m in range(attribution.shape[0]):
        parts = [dask.delayed(_chunk_stats, pure=True)(chunks[m, j], ok[m, a:b], codes[a:b])
                 for j, (a, b) in enumerate(zip(starts, stops)) if ok[m, a:b].any()]
        per_method.append(_tree(parts) if parts else None)
    return per_method


def _score_stats(ds: xr.Dataset, ok: np.ndarray) -> tuple:
    """Lazy mean, std, median and count of `score` over the done samples, per (method, metric)."""
    if "score" not in ds:
        return ()
    score = da.asarray(ds["score"].transpose("xai_method", "sample", "metric").data)
    mask = da.from_array(ok[:, :, None], chunks=(score.chunks[0], score.chunks[1], 1))
    score = da.where(mask, score.astype(np.float64), np.nan)
    return (da.nanmean(score, axis=1), da.nanstd(score, axis=1), da.nanmedian(score, axis=1),
            da.isfinite(score).sum(axis=1))


def _map_variables(per_method: list, n_classes: int, size: tuple[int, int], class_correct: bool) -> dict:
    """Mean, std and count variables per grouping, from the sparse per-method partial sums."""
    height, width = size
    shape = (len(per_method), n_classes + 1, _SLOTS)
    s, q, n = (np.zeros((*shape, height * width)) for _ in range(3))
    maps = np.zeros(shape)
    for m, res in enumerate(per_method):
        if res is not None:
            g = res[0]
            for grid, values in ((s, res[1]), (q, res[2]), (n, res[3])):
                grid[m].reshape(-1, height * width)[g] = values
            maps[m].reshape(-1)[g] = res[4]
    cls_idx, ok_idx, full = slice(0, n_classes), slice(_INCORRECT, _CORRECT + 1), (slice(None),)
    data: dict[str, tuple] = {}
    for suffix, dims, axes, index in (
        ("", ("class",), (2,), (*full, cls_idx)),
        ("_by_correct", ("correct",), (1,), (*full, slice(None), ok_idx)),
        ("_by_class_correct", ("class", "correct"), (), (*full, cls_idx, ok_idx)),
        ("_all", (), (1, 2), full),
    ):
        if suffix == "_by_class_correct" and not class_correct:
            continue
        mean, std = _moments(*(grid[index].sum(axis=axes) for grid in (s, q, n)))
        data[f"map_mean{suffix}"] = (("xai_method", *dims, "y", "x"), mean.reshape(*mean.shape[:-1], height, width))
        data[f"map_std{suffix}"] = (("xai_method", *dims, "y", "x"), std.reshape(*std.shape[:-1], height, width))
        data[f"map_count{suffix}"] = (("xai_method", *dims), maps[index].sum(axis=axes).astype(np.int64))
    return data


def summarize(ds: xr.Dataset, *, by: str = "label", class_correct: bool = True) -> xr.Dataset:
    """The aggregate dataset of a study (or of a :func:`select`-ed subset of one), in memory.

    See the module docstring for what counts; :func:`aggregate` also writes it to Zarr.
    """
    ds = _study_view(ds, by)
    methods, classes = _names(ds, "xai_method"), _names(ds, "class")
    attribution = da.asarray(ds["attribution"].transpose("xai_method", "sample", "y", "x").data)
    codes, ok, done = _groups(ds, by, len(classes))
    with _quiet():  # the single pass over the maps (and the scores)
        per_method, score_stats = dask.compute(_partials(attribution, ok, codes), _score_stats(ds, ok))
    data = _map_variables(per_method, len(classes), attribution.shape[2:], class_correct)
    coords: dict[str, Any] = {"xai_method": np.array(methods, dtype=object), "class": np.array(classes, dtype=object),
                              "correct": np.array([False, True])}
    coords.update({c: ds[c].values for c in ("y", "x") if c in ds.coords})
    if score_stats:
        coords["metric"] = np.array(_names(ds, "metric"), dtype=object)
        for name, value in zip(("mean", "std", "median"), score_stats[:3]):
            data[f"score_{name}"] = (("xai_method", "metric"), np.asarray(value, np.float64))
        data["score_count"] = (("xai_method", "metric"), np.asarray(score_stats[3], np.int64))
    attrs = {k: ds.attrs[k] for k in _IDENTITY if k in ds.attrs}
    attrs.update(
        saliency_atlas_aggregate=AGGREGATE_VERSION, grouped_by=by, ddof=0, samples=int(ds.sizes["sample"]),
        done_blocks=json.dumps({mth: [int(done[i].sum()), int(done.shape[1])] for i, mth in enumerate(methods)}),
        description=(f"mean/std of attribution maps per {by} class and per correctness (prediction == label); "
                     "only samples whose block is done for the method, NaN pixels excluded; std with ddof=0"),
    )
    out = xr.Dataset(data, coords=coords, attrs=attrs)
    out["map_mean"].attrs["long_name"] = f"mean attribution map per {by} class"
    out["map_count"].attrs["long_name"] = "maps counted (done blocks, not all-NaN)"
    return out


# --------------------------------------------------------------------------- the store


def default_out(path: str | os.PathLike) -> str:
    """``runs/shapes.zarr`` -> ``runs/shapes.agg.zarr``."""
    return os.path.splitext(os.fspath(path).rstrip("/"))[0] + ".agg.zarr"


def _is_url(path: str) -> bool:
    return "://" in path


def _check_out(study: str, out: str) -> None:
    """Refuse to write over the study, or over anything that is not an older aggregate."""
    same = out.rstrip("/") == study.rstrip("/") if _is_url(out) else os.path.abspath(out) == os.path.abspath(study)
    if same:
        raise ValueError(f"the aggregate output {out!r} is the study store itself; choose another path")
    try:
        marker = zarr.open_group(out, mode="r").attrs.get("saliency_atlas_aggregate")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        if _is_url(out) or not os.path.exists(out):
            return  # nothing there yet
        marker = None
    except Exception:  # noqa: BLE001 - a local file, or anything else that is not a Zarr group
        if _is_url(out):
            raise  # e.g. no fsspec backend for the URL: that error says more than ours would
        marker = None
    if marker is None:
        raise ValueError(f"refusing to overwrite {out!r}: it exists and is not an aggregate store; choose another output path")


def aggregate(path: str | os.PathLike, out: str | os.PathLike | None = None, *,
              by: str = "label", class_correct: bool = True) -> xr.Dataset:
    """Aggregate the study at ``path`` (see :func:`summarize`) and write the result to the
    Zarr store ``out`` (default: ``<study>.agg.zarr`` beside it, replaced if it is an older
    aggregate).  Returns the aggregate dataset (in memory; it is small)."""
    from .store import ignore_zarr_notes, open_dataset  # noqa: PLC0415 - keeps this module importable alone

    ignore_zarr_notes()
    path = os.fspath(path)
    out = default_out(path) if out is None else os.fspath(out)
    _check_out(path, out)
    agg = summarize(open_dataset(path), by=by, class_correct=class_correct)
    agg.attrs["aggregate_of"] = path if _is_url(path) else os.path.abspath(path)
    agg.to_zarr(out, mode="w", zarr_format=3, consolidated=True)
    return agg
