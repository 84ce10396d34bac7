"""The study store's schema: one table, `SCHEMA`, of each variable's dimensions, dtype, fill value,
the flag that guards it and the condition under which a study has it; the `Template` a new store is
laid out from, and the errors a store raises. `create`, `Store.grow`, the writers and the
documentation (`schema_markdown`) all read the table, so a new variable is one row plus its writer.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from zarr.codecs import BloscCodec, ZstdCodec


SCHEMA_VERSION = 3  # 2: the contrast variable; 3: one blur and torch.optim changed some methods' maps


COMPRESSIONS = {  # zstd at level 1: on the built-in study's maps and inputs, within 0.02 of level 3's ratio, 1.1-2.2x faster
    "zstd": lambda: [ZstdCodec(level=1)],
    "blosc": lambda: [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")],
    "none": lambda: [],
}


@dataclass(frozen=True)
class Variable:
    """One row of the schema."""

    name: str
    dims: tuple[str, ...]
    dtype: str  # "maps": the store's map dtype (float32 or float16)
    fill: Any
    guard: str | None  # the flag set once a block of it is written
    when: str | None = None  # the Template field that must be true for a study to have it
    doc: str = ""

    @property
    def large(self) -> bool:
        """Image-sized: compressed, and sharded when chunks are smaller than blocks."""
        return "y" in self.dims


SCHEMA: tuple[Variable, ...] = (
    Variable("attribution", ("xai_method", "sample", "y", "x"), "maps", np.nan, "done",
             doc="the maps; NaN where not computed"),
    Variable("failure", ("xai_method", "sample"), "int8", -1, "done",
             doc="why a map is NaN: 0 a usable map, >0 a failure (codes in the attribute `failure_codes`), -1 not computed"),
    Variable("image", ("sample", "channel", "y", "x"), "float32", np.nan, "ingested", when="keep_images",
             doc="the exact model input"),
    Variable("mask", ("sample", "y", "x"), "bool", False, "ingested", when="has_masks",
             doc="ground-truth object, when the dataset has one"),
    Variable("label", ("sample",), "int64", -1, "ingested", doc="true class (index of `class`), -1 if unknown"),
    Variable("prediction", ("sample",), "int64", -1, "ingested", doc="the model's top-1 class"),
    Variable("target", ("sample",), "int64", -1, "ingested", doc="the class explained (the prediction)"),
    Variable("contrast", ("sample",), "int64", -1, "ingested", doc="the foil of contrastive methods"),
    Variable("logits", ("sample", "class"), "float32", np.nan, "ingested", doc="the model's output"),
    Variable("score", ("xai_method", "sample", "metric"), "float32", np.nan, "scored", when="metrics",
             doc="per-image evaluation; NaN where not computed or undefined"),
    Variable("score_status", ("xai_method", "sample", "metric"), "int8", -1, "scored", when="metrics",
             doc="why a score is what it is (codes in the attribute `score_status_codes`; -1: not computed)"),
    Variable("curve", ("xai_method", "metric", "sample", "step"), "float32", np.nan, "scored", when="curve_points",
             doc="deletion / insertion / ROAD curves (NaN past a metric's own points)"),
    Variable("cluster", ("xai_method", "sample"), "int16", -1, None, when="clustered",
             doc="the sample's SpRAy cluster within its true class (`clusters`; -1: not clustered, or a failed map)"),
    Variable("eigengap", ("xai_method", "class"), "float32", np.nan, None, when="clustered",
             doc="per class, the gap after the chosen number of clusters in the affinity graph's spectrum"),
    Variable("done", ("xai_method", "block"), "bool", False, None, doc="block b of method m is written"),
    Variable("ingested", ("block",), "bool", False, None, doc="block b's inputs and predictions are written"),
    Variable("checksum", ("xai_method", "block"), "int64", -1, None,
             doc="CRC-32 of block b's maps and failure codes as written, set just before `done` (`status --verify`)"),
    Variable("ingested_checksum", ("block",), "int64", -1, None,
             doc="CRC-32 of block b's sample variables as written, set just before `ingested`"),
    Variable("scored", ("xai_method", "metric", "block"), "bool", False, None, when="metrics",
             doc="block b of method m is scored by the metric"),
    Variable("score_checksum", ("xai_method", "metric", "block"), "int64", -1, None, when="metrics",
             doc="CRC-32 of block b's scores, statuses and curves of the metric as written, set just before `scored`"),
)


VARIABLES = {v.name: v for v in SCHEMA}


SAMPLE_VARIABLES = tuple(v.name for v in SCHEMA if v.guard == "ingested")


def schema_markdown() -> str:
    """The schema as a markdown table (docs/architecture.md holds this text; a test keeps them equal)."""
    rows = ["| variable | dims | dtype | fill | its flag | present when | what |", "|---|---|---|---|---|---|---|"]
    for v in SCHEMA:
        dtype = "float32 or float16" if v.dtype == "maps" else v.dtype
        rows.append(f"| `{v.name}` | ({', '.join(v.dims)}) | {dtype} | {v.fill} | {v.guard or '-'} | "
                    f"{v.when or 'always'} | {v.doc} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class Difference:
    """One way a run differs from the store it names."""

    what: str  # "schema_version", "model", "dataset", "contrast", "samples", "block_size", "image_shape",
    #            "preprocessing", "classes", "params"
    stored: Any
    requested: Any
    detail: str = ""  # e.g. the method whose parameters differ

    def describe(self) -> str:
        if self.what == "samples":
            return (f"the store has {self.stored} samples and this run asks for {self.requested} others; a run may "
                    "add samples after the stored ones but not drop or reorder them")
        if self.what == "dataset_name":
            return f"the store was made from dataset {self.stored!r} and this run names dataset {self.requested!r}"
        if self.what == "preprocessing":
            return (f"the model's input {self.detail} differs: the store was made with {self.stored} and this run "
                    f"uses {self.requested}")
        if self.what in ("params", "metric_params"):
            return f"parameters of {self.detail} differ: the store has {self.stored}, this run {self.requested}"
        tail = " — the stored samples changed" if self.what == "dataset" else ""
        return f"{self.what.replace('_', ' ')} differs: the store has {self.stored!r}, this run {self.requested!r}{tail}"


class StoreMismatch(ValueError):
    """The store at a path was made for another model, dataset, parameters or layout; nothing was changed."""

    def __init__(self, path: str, differences: list[Difference]) -> None:
        self.path, self.differences = path, differences
        super().__init__(f"refusing to reuse the store {path!r}: "
                         + "; ".join(d.describe() for d in differences) + ". Nothing was changed.")


class StoreLayoutError(ValueError):
    """A write that does not cover whole chunks (it could race with a neighbouring block's writer)."""


class StoreStateError(ValueError):
    """A store in a state the command cannot work on; the message names the state and what to run."""


# The arrays every study store has had since the first schema: a store without one of them was
# killed while `create` laid it out (nothing is computed before the layout is complete).
CORE_ARRAYS = ("sample", "sample_id", "xai_method", "class", "attribution", "done", "ingested")


@dataclass(frozen=True)
class Template:
    """Everything needed to lay out a new study store, or to check an existing one."""

    sample_ids: list[str]
    classes: list[str]
    methods: list[str]
    image_shape: tuple[int, int, int]  # (C, H, W) of the model input
    block_size: int
    has_masks: bool
    params: dict[str, dict[str, Any]]  # per method, its full parameters (JSON-serialisable)
    attrs: dict[str, Any] = field(default_factory=dict)  # fingerprints, model/dataset names...
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method: what a missing key means
    dtype: str = "float32"  # of the maps: "float32" or "float16"
    compression: str = "zstd"  # of maps, images and masks: "zstd", "blosc" (zstd + bit shuffle) or "none"
    chunk_samples: int | None = None  # samples per chunk; below block_size, a block is one shard of chunks
    keep_images: bool = True  # False: store only sample ids; inputs are recomputed from the dataset
    metrics: list[str] = field(default_factory=list)  # evaluation metrics (the `metric` coordinate)
    metric_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per metric, its full parameters
    metric_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # what a missing stored key means
    curve_points: int = 0  # the `step` length: the most points of a curve metric (0: no curve metric)
    status_codes: dict[int, str] = field(default_factory=dict)  # score_status code -> meaning
    clustered: bool = False  # a new store has no clusters; `Store.write_clusters` adds them
    map_grid: tuple[int, int] | None = None  # (h, w) the maps are stored at (`storage.grid`); None: the input size

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
        if self.map_grid is not None and not all(0 < g <= n for g, n in zip(self.map_grid, self.image_shape[1:])):
            raise ValueError(f"the map grid {self.map_grid} must be positive and at most the input size "
                             f"{tuple(self.image_shape[1:])}")

    def dims(self, v: Variable) -> tuple[str, ...]:
        """`v`'s dimensions in this store: the maps' are (xai_method, sample, map_y, map_x) on a map grid."""
        if v.name == "attribution" and self.map_grid is not None:
            return (*v.dims[:2], "map_y", "map_x")
        return v.dims

    def variables(self) -> list[Variable]:
        return [v for v in SCHEMA if v.when is None or getattr(self, v.when)]

    def sizes(self) -> dict[str, int]:
        c, h, w = self.image_shape
        n = len(self.sample_ids)
        return {"xai_method": len(self.methods), "sample": n, "block": n_blocks(n, self.block_size),
                "channel": c, "y": h, "x": w, "class": len(self.classes), "metric": len(self.metrics),
                "step": self.curve_points, **dict(zip(("map_y", "map_x"), self.map_grid or (h, w)))}


def checksum(*arrays: np.ndarray) -> int:
    """CRC-32 of the arrays' bytes (a corruption check, not a security one)."""
    crc = 0
    for a in arrays:  # the buffer itself, not a copy of it (`tobytes`): the same bytes
        crc = zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8), crc)
    return crc


def n_blocks(n_samples: int, block_size: int) -> int:
    return -(-n_samples // block_size)


def block_slice(block: int, n_samples: int, block_size: int) -> slice:
    """The samples of ``block``; the last block may be short."""
    start = block * block_size
    if not 0 <= start < n_samples:
        raise IndexError(f"block {block} is outside 0..{n_blocks(n_samples, block_size) - 1}")
    return slice(start, min(start + block_size, n_samples))


def _normal(params: Any) -> Any:
    """Parameters as JSON reads them back (tuples become lists), for comparison with a stored record."""
    return json.loads(json.dumps(params, sort_keys=True))


def _layout(t: Template, variables: list[Variable]) -> tuple[xr.Dataset, dict[str, dict[str, Any]]]:
    """The lazy template of `variables` (nothing computed) and its Zarr encoding: sample-indexed
    variables chunked by block, block-indexed flags one per chunk, everything else whole."""
    sizes, b = t.sizes(), t.block_size
    chunk_of = {"sample": b, "xai_method": 1, "block": 1, "metric": 1}
    data, encoding = {}, {}
    for v in variables:
        dims = t.dims(v)
        shape = tuple(sizes[d] for d in dims)
        chunks = tuple(chunk_of.get(d, sizes[d]) for d in dims)
        dtype = t.dtype if v.dtype == "maps" else v.dtype
        data[v.name] = (dims, da.full(shape, v.fill, dtype=dtype, chunks=chunks))
        enc: dict[str, Any] = {"chunks": chunks}
        if v.large:
            enc["compressors"] = COMPRESSIONS[t.compression]()
            if t.chunk_samples is not None and t.chunk_samples < b:
                # A block is one shard, so a block write still touches only its own object.
                axis = v.dims.index("sample")
                enc["shards"] = chunks
                enc["chunks"] = tuple(t.chunk_samples if i == axis else c for i, c in enumerate(chunks))
        encoding[v.name] = enc
    coords: dict[str, Any] = {}
    if t.metrics:
        coords["metric"] = np.array(t.metrics, dtype=object)
    if t.curve_points:
        coords["step"] = np.arange(t.curve_points)
    return xr.Dataset(data, coords=coords), encoding


def _evaluation_attrs(t: Template) -> dict[str, Any]:
    return {"metric_params": json.dumps({m: t.metric_params.get(m, {}) for m in t.metrics}, sort_keys=True),
            "score_status_codes": json.dumps({str(k): v for k, v in sorted(t.status_codes.items())})}
