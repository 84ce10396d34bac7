"""The study store: one Zarr v3 group that ``xarray.open_zarr`` reads.

Layout (see docs/architecture.md for the full contract)::

    attribution (xai_method, sample, y, x)   NaN where not computed
    done        (xai_method, block)          True once block b of method m is written
    ingested    (block)                      True once a block's inputs and predictions are written
    image       (sample, channel, y, x)      the exact model input
    mask        (sample, y, x)               ground-truth region, when the dataset has one
    label, prediction, target (sample); logits (sample, class)
    contrast    (sample)                     the class contrastive methods contrast the target with

The template (metadata, coordinates and the small flag arrays) is written once by
:func:`create`; afterwards tasks fill whole blocks of samples with :func:`write_samples`
and :func:`write_attribution`.  A block is a chunk-aligned range of samples, so
concurrent writers never touch the same chunk; ``done``/``ingested`` have one chunk
per flag for the same reason.  A flag is set only after its block's data is written,
so a killed run leaves at worst a block whose flag is False, which the next run
recomputes (deterministically, hence bit-identical).
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

SCHEMA_VERSION = 2  # 2: the contrast variable and attribute
SAMPLE_VARIABLES = ("image", "mask", "label", "prediction", "target", "contrast", "logits")


COMPRESSIONS = {
    "zstd": lambda: [ZstdCodec(level=3)],
    "blosc": lambda: [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")],
    "none": lambda: [],
}


class StoreMismatch(ValueError):
    """The store at a path was made for another model, dataset, method parameters or layout."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Zarr warns that consolidated metadata and string dtypes are not yet in the v3
    # spec; both are what xarray itself writes and reads, so the warning is noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"zarr\..*")
        warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
        yield


@dataclass(frozen=True)
class Template:
    """Everything needed to lay out a new study store."""

    sample_ids: list[str]
    classes: list[str]
    methods: list[str]
    image_shape: tuple[int, int, int]  # (C, H, W) of the model input
    block_size: int
    has_masks: bool
    params: dict[str, dict[str, Any]]  # per method, JSON-serialisable
    attrs: dict[str, Any] = field(default_factory=dict)  # fingerprints, model/dataset names...
    dtype: str = "float32"  # of the maps: "float32" or "float16"
    compression: str = "zstd"  # of maps, images and masks: "zstd", "blosc" (zstd + bit shuffle) or "none"
    chunk_samples: int | None = None  # samples per chunk; below block_size, a block is one shard of chunks
    keep_images: bool = True  # False: store only sample ids; inputs are recomputed from the dataset

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, got {self.compression!r}")
        if self.chunk_samples is not None and (self.chunk_samples < 1 or self.block_size % self.chunk_samples):
            raise ValueError(f"chunk_samples must divide block_size {self.block_size}, got {self.chunk_samples}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct, got {self.methods}")
        if not self.sample_ids:
            raise ValueError("a study needs at least one sample")


def n_blocks(n_samples: int, block_size: int) -> int:
    return -(-n_samples // block_size)


def block_slice(block: int, n_samples: int, block_size: int) -> slice:
    """The samples of ``block``; the last block may be short."""
    start = block * block_size
    if not 0 <= start < n_samples:
        raise IndexError(f"block {block} is outside 0..{n_blocks(n_samples, block_size) - 1}")
    return slice(start, min(start + block_size, n_samples))


def create(path: str, t: Template) -> None:
    """Write the template of a new study at ``path`` (which must not exist yet)."""
    n, (c, h, w), b = len(t.sample_ids), t.image_shape, t.block_size
    m, nb = len(t.methods), n_blocks(n, b)

    def lazy(shape: tuple[int, ...], dtype: str, fill: Any, chunks: tuple[int, ...]) -> da.Array:
        return da.full(shape, fill, dtype=dtype, chunks=chunks)

    data: dict[str, tuple] = {
        "attribution": (("xai_method", "sample", "y", "x"), lazy((m, n, h, w), t.dtype, np.nan, (1, b, h, w))),
        "done": (("xai_method", "block"), np.zeros((m, nb), bool)),
        "ingested": (("block",), np.zeros(nb, bool)),
        "label": (("sample",), lazy((n,), "int64", -1, (b,))),
        "prediction": (("sample",), lazy((n,), "int64", -1, (b,))),
        "target": (("sample",), lazy((n,), "int64", -1, (b,))),
        "contrast": (("sample",), lazy((n,), "int64", -1, (b,))),
        "logits": (("sample", "class"), lazy((n, len(t.classes)), "float32", np.nan, (b, len(t.classes)))),
    }
    if t.keep_images:
        data["image"] = (("sample", "channel", "y", "x"), lazy((n, c, h, w), "float32", np.nan, (b, c, h, w)))
    if t.has_masks:
        data["mask"] = (("sample", "y", "x"), lazy((n, h, w), "bool", False, (b, h, w)))
    attrs = dict(t.attrs)
    attrs.update(
        schema_version=SCHEMA_VERSION,
        block_size=b,
        image_shape=list(t.image_shape),
        compression=t.compression,
        images_stored=t.keep_images,
        params=json.dumps({name: t.params.get(name, {}) for name in t.methods}, sort_keys=True),
    )
    ds = xr.Dataset(
        data,
        coords={
            "xai_method": np.array(t.methods, dtype=object),
            "sample": np.arange(n),
            "sample_id": ("sample", np.array(t.sample_ids, dtype=object)),
            "class": np.array(t.classes, dtype=object),
        },
        attrs=attrs,
    )
    # One chunk per flag: concurrent tasks set different flags without read-modify-write races.
    encoding: dict[str, dict[str, Any]] = {"done": {"chunks": (1, 1)}, "ingested": {"chunks": (1,)}}
    for name, (dims, arr) in data.items():
        if "y" in dims:  # the big arrays: maps, images, masks
            block_chunks = arr.chunksize
            axis = dims.index("sample")
            enc: dict[str, Any] = {"compressors": COMPRESSIONS[t.compression]()}
            if t.chunk_samples is not None and t.chunk_samples < b:
                # A block is one shard, so a block write still touches only its own object.
                enc["shards"] = block_chunks
                enc["chunks"] = tuple(t.chunk_samples if i == axis else c for i, c in enumerate(block_chunks))
            encoding[name] = enc
    with _quiet():
        ds.to_zarr(path, mode="w-", compute=False, zarr_format=3, encoding=encoding, consolidated=True)


def open_dataset(path: str) -> xr.Dataset:
    """The study as a lazy (Dask-backed) ``xarray.Dataset``."""
    with _quiet():
        try:
            return xr.open_zarr(path, consolidated=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no study store at {path!r}: run `saliency-atlas study --store {path}` first") from e


def _group(path: str, mode: str = "r+") -> zarr.Group:
    # Not the consolidated metadata: it is refreshed only after a change of layout
    # (see grow), and block work must always see the arrays as they are.
    with _quiet():
        try:
            return zarr.open_group(path, mode=mode, zarr_format=3, use_consolidated=False)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no study store at {path!r}") from e


def exists(path: str) -> bool:
    try:
        _group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False
    return True


def attrs(path: str) -> dict[str, Any]:
    a = dict(_group(path, mode="r").attrs)
    a["params"] = json.loads(a.get("params", "{}"))
    return a


def _committed(names: np.ndarray) -> list[str]:
    # Coordinates are extended last when a store grows, and empty names are slots
    # of a growth that did not finish: they are not part of the store yet.
    return [str(x) for x in names if str(x)]


def sample_ids(path: str) -> list[str]:
    return _committed(_group(path, mode="r")["sample_id"][:])


def check_compatible(path: str, t: Template, stored_digest: str | None = None) -> None:
    """Refuse (without touching the store) a run whose model, data or parameters differ.

    The store may grow: ``t`` may list more samples (after the stored ones, in the same
    order) and more methods. ``stored_digest`` is the dataset's digest of the samples
    already in the store, recomputed by the caller from the data as it is now; without
    it, ``t``'s own ``dataset_fingerprint`` is compared (the same samples).
    """
    stored = attrs(path)
    problems: list[str] = []
    if stored.get("schema_version") != SCHEMA_VERSION:
        problems.append(
            f"the store has schema version {stored.get('schema_version')}, this saliency-atlas writes "
            f"{SCHEMA_VERSION} (an older store is read by `open_dataset` but not extended)"
        )
    if stored.get("contrast", "runner-up") != t.attrs.get("contrast", "runner-up"):
        problems.append(
            f"contrast differs: the store contrasts with {stored.get('contrast')!r}, this run asks for "
            f"{t.attrs.get('contrast')!r} (use --contrast {stored.get('contrast')})"
        )
    digests = {"model_fingerprint": t.attrs.get("model_fingerprint"),
               "dataset_fingerprint": stored_digest or t.attrs.get("dataset_fingerprint")}
    for key, now in digests.items():
        if now is not None and stored.get(key) != now:
            what = key.split("_")[0]
            problems.append(
                f"{what} differs: the store was made with {stored.get(what)!r} "
                f"(fingerprint {str(stored.get(key))[:12]}), this run has {t.attrs.get(what)!r} "
                f"(fingerprint {str(now)[:12]})"
                + (" — the stored samples changed" if what == "dataset" else "")
            )
    ids = sample_ids(path)
    if t.sample_ids[: len(ids)] != ids:
        problems.append(
            f"the store has {len(ids)} samples and this run asks for {len(t.sample_ids)}; a run may add "
            "samples after the stored ones but not drop or reorder them (use --samples "
            f"{len(ids)} or more)"
        )
    if stored.get("block_size") != t.block_size:
        problems.append(f"block size differs: store {stored.get('block_size')}, this run {t.block_size}")
    if list(stored.get("image_shape", [])) != list(t.image_shape):
        problems.append(f"image shape differs: store {stored.get('image_shape')}, this run {list(t.image_shape)}")
    for name in t.methods:
        if name in stored["params"] and stored["params"][name] != t.params.get(name, {}):
            problems.append(f"parameters of {name} differ: store {stored['params'][name]}, this run {t.params.get(name, {})}")
    if problems:
        raise StoreMismatch(
            f"refusing to reuse the store {path!r}: " + "; ".join(problems)
            + ". Nothing was changed; use a new --store path, or the same arguments as the run that made it."
        )


def _resize(arr: zarr.Array, axis: int, length: int) -> None:
    shape = list(arr.shape)
    shape[axis] = length
    if tuple(shape) != arr.shape:
        arr.resize(tuple(shape))


def _extend_names(arr: zarr.Array, names: list[str]) -> None:
    """Resize a string coordinate to ``names`` and write them (idempotent)."""
    _resize(arr, 0, len(names))
    arr[:] = np.array(names, dtype=object)


def grow(path: str, t: Template) -> dict[str, Any]:
    """Add ``t``'s new samples and methods to the store (after check_compatible).

    Data arrays are resized first and the coordinates last, so an interrupted growth
    leaves a store that the next call completes. A short last block that gains samples
    is marked not done and recomputed (deterministically, so its old samples are
    rewritten bit-identically). Returns what was added.
    """
    g = _group(path)
    old_ids, old_methods = sample_ids(path), methods(path)
    new_methods = [m for m in t.methods if m not in old_methods]
    n_old, n_new, b = len(old_ids), len(t.sample_ids), t.block_size
    unfinished = g["sample_id"].shape[0] != n_old or g["xai_method"].shape[0] != len(old_methods)
    if n_new == n_old and not new_methods and not unfinished:
        return {"samples": 0, "methods": []}
    if n_new > n_old:
        if n_old % b:  # the short last block will hold more samples: redo it
            g["ingested"][n_old // b] = False
            g["done"][:, n_old // b] = False
        for name in ("attribution", *SAMPLE_VARIABLES):
            if name in g:
                _resize(g[name], 1 if name == "attribution" else 0, n_new)
        _resize(g["done"], 1, n_blocks(n_new, b))
        _resize(g["ingested"], 0, n_blocks(n_new, b))
        _resize(g["sample"], 0, n_new)
        g["sample"][n_old:] = np.arange(n_old, n_new)
        _extend_names(g["sample_id"], t.sample_ids)
    if new_methods:
        all_methods = old_methods + new_methods
        _resize(g["attribution"], 0, len(all_methods))
        _resize(g["done"], 0, len(all_methods))
        params = json.loads(g.attrs.get("params", "{}"))
        params.update({m: t.params.get(m, {}) for m in new_methods})
        g.attrs["params"] = json.dumps(params, sort_keys=True)
        _extend_names(g["xai_method"], all_methods)
    g.attrs["dataset_fingerprint"] = t.attrs.get("dataset_fingerprint", g.attrs.get("dataset_fingerprint"))
    with _quiet():
        zarr.consolidate_metadata(path, zarr_format=3)
    return {"samples": n_new - n_old, "methods": new_methods}


def methods(path: str) -> list[str]:
    return _committed(_group(path, mode="r")["xai_method"][:])


def _method_index(g: zarr.Group, method: str) -> int:
    names = _committed(g["xai_method"][:])
    if method not in names:
        raise KeyError(f"method {method!r} is not in this store; it has {names}")
    return names.index(method)


def _aligned(g: zarr.Group, block: int) -> slice:
    """The sample slice of ``block``, asserting it is aligned with every sample chunk."""
    n, b = g["sample"].shape[0], int(g.attrs["block_size"])
    s = block_slice(block, n, b)
    for name in ("attribution", *SAMPLE_VARIABLES):
        if name in g:
            arr = g[name]
            axis = 1 if name == "attribution" else 0
            chunk = (arr.shards or arr.chunks)[axis]  # the unit a writer rewrites
            # xarray does not check numpy-backed region writes: a misaligned write could
            # race with a neighbouring block's writer, so the layout is asserted here.
            assert s.start % chunk == 0 and (s.stop % chunk == 0 or s.stop == n), (
                f"block {block} ({s.start}:{s.stop}) is not aligned with {name}'s chunks of {chunk}"
            )
    return s


def write_samples(path: str, block: int, **arrays: np.ndarray) -> None:
    """Write per-sample variables (image, mask, label, prediction, target, contrast, logits)
    of one whole block, then mark the block ingested."""
    g = _group(path)
    s = _aligned(g, block)
    unknown = set(arrays) - set(SAMPLE_VARIABLES)
    if unknown:
        raise KeyError(f"unknown sample variables {sorted(unknown)}; valid: {SAMPLE_VARIABLES}")
    for name, value in arrays.items():
        if name not in g:  # a dataset without masks
            continue
        expected = (s.stop - s.start, *g[name].shape[1:])
        if value.shape != expected:
            raise ValueError(f"{name} for block {block} has shape {value.shape}, expected {expected}")
        g[name][s] = value
    g["ingested"][block] = True


def write_attribution(path: str, method: str, block: int, maps: np.ndarray) -> None:
    """Write one whole block of maps for ``method``; ``done`` is set only afterwards."""
    g = _group(path)
    s, m = _aligned(g, block), _method_index(g, method)
    expected = (s.stop - s.start, *g["attribution"].shape[2:])
    if maps.shape != expected:
        raise ValueError(f"maps for {method} block {block} have shape {maps.shape}, expected {expected}")
    g["attribution"][m, s] = maps.astype(g["attribution"].dtype)
    g["done"][m, block] = True


def read_samples(path: str, block: int, *names: str) -> dict[str, np.ndarray]:
    g = _group(path, mode="r")
    s = block_slice(block, g["sample"].shape[0], int(g.attrs["block_size"]))
    return {name: g[name][s] for name in names}


def pending(path: str, method: str | None = None) -> list[int]:
    """Blocks still to compute: for ``method``, or blocks not yet ingested when None."""
    g = _group(path, mode="r")
    flags = g["ingested"][:] if method is None else g["done"][_method_index(g, method)]
    return [int(b) for b in np.flatnonzero(~flags)]


def has(path: str, name: str) -> bool:
    return name in _group(path, mode="r")


def status(path: str) -> dict[str, Any]:
    """Blocks done per method, plus the store's identity and size."""
    g = _group(path, mode="r")
    a = attrs(path)
    done = g["done"][:]
    n, b = g["sample"].shape[0], int(a["block_size"])
    maps_done = sum(len(range(n)[block_slice(k, n, b)]) for m in range(done.shape[0]) for k in np.flatnonzero(done[m]))
    stored = {name: int(g[name].nbytes_stored()) for name in ("attribution", *SAMPLE_VARIABLES) if name in g}
    return {
        "bytes_stored": stored,
        "bytes_per_map": stored["attribution"] / maps_done if maps_done else None,
        "map_dtype": str(g["attribution"].dtype),
        "compression": a.get("compression"),
        "path": path,
        "samples": int(g["sample"].shape[0]),
        "blocks": int(done.shape[1]),
        "ingested": int(g["ingested"][:].sum()),
        "methods": {m: int(done[i].sum()) for i, m in enumerate(methods(path))},
        "model": a.get("model"),
        "dataset": a.get("dataset"),
        "model_fingerprint": a.get("model_fingerprint"),
        "dataset_fingerprint": a.get("dataset_fingerprint"),
    }
