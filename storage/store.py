"""The study store: one Zarr v3 group that ``xarray.open_zarr`` reads.

The schema is one table, `SCHEMA`: each variable's dimensions, dtype, fill value, the
flag that guards it and the condition under which a study has it. `create`, `Store.grow`,
the writers and the documentation (`schema_markdown`) all read it, so a new variable is
one row plus its writer.

The template (metadata, coordinates and the small flag arrays) is written once by
`create`; afterwards tasks fill whole blocks of samples through a `Store` handle. A block
is a chunk-aligned range of samples, so concurrent writers never touch the same chunk;
flags have one chunk each for the same reason. A flag is set only after its block's
data is written, so a killed run leaves at worst a block whose flag is False, which the
next run recomputes (deterministically, hence bit-identical).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dask.array as da
import numpy as np
import xarray as xr
import zarr
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


_ZARR_NOTES = (r"The data type \(.*\) does not have a Zarr V3 specification",
               r"Consolidated metadata is currently not part in the Zarr format 3 specification")


def ignore_zarr_notes() -> None:
    """Zarr notes that string dtypes and consolidated metadata are not yet in the v3 spec; both are
    what xarray itself writes and reads, so here they are noise. Ignored for the process, not in a
    scope (`warnings.catch_warnings` is not thread-safe, and stores are opened in the loader and the
    writer threads while a block computes: `tasks.pipeline`); called where stores are opened, since
    a caller's scope may have dropped the filters. A filter is added only when missing: each change
    of the filters makes every warning already shown once show again."""
    present = {f[1].pattern for f in warnings.filters if f[0] == "ignore" and f[1] is not None}
    for note in _ZARR_NOTES:
        if note not in present:
            warnings.filterwarnings("ignore", message=note)


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

    def variables(self) -> list[Variable]:
        return [v for v in SCHEMA if v.when is None or getattr(self, v.when)]

    def sizes(self) -> dict[str, int]:
        c, h, w = self.image_shape
        n = len(self.sample_ids)
        return {"xai_method": len(self.methods), "sample": n, "block": n_blocks(n, self.block_size),
                "channel": c, "y": h, "x": w, "class": len(self.classes), "metric": len(self.metrics),
                "step": self.curve_points}


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
        shape = tuple(sizes[d] for d in v.dims)
        chunks = tuple(chunk_of.get(d, sizes[d]) for d in v.dims)
        dtype = t.dtype if v.dtype == "maps" else v.dtype
        data[v.name] = (v.dims, da.full(shape, v.fill, dtype=dtype, chunks=chunks))
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


def create(path: str, t: Template) -> Store:
    """Write the template of a new study at ``path`` and open it. ``path`` must not exist yet, or hold the
    remains of a creation that was killed (nothing was computed there): they are removed first. The
    attribute ``created`` is False until the whole layout is written, so a killed creation is recognised."""
    if creation_state(path) == "unfinished":
        remove(path)
    ds, encoding = _layout(t, t.variables())
    ds.attrs.update(t.attrs)
    ds.attrs.update(
        schema_version=SCHEMA_VERSION, block_size=t.block_size, image_shape=list(t.image_shape),
        dataset_fingerprint_samples=len(t.sample_ids),
        compression=t.compression, images_stored=t.keep_images, created=False,
        params=json.dumps({name: t.params.get(name, {}) for name in t.methods}, sort_keys=True),
        **(_evaluation_attrs(t) if t.metrics else {}),
    )
    ds = ds.assign_coords(
        xai_method=np.array(t.methods, dtype=object), sample=np.arange(len(t.sample_ids)),
        sample_id=("sample", np.array(t.sample_ids, dtype=object)), **{"class": np.array(t.classes, dtype=object)},
    )
    ignore_zarr_notes()
    ds.to_zarr(path, mode="w-", compute=False, zarr_format=3, encoding=encoding, consolidated=True)
    open_group(path, "r+", "study store").attrs["created"] = True
    zarr.consolidate_metadata(path, zarr_format=3)
    return Store(path)


def creation_state(path: str) -> str:
    """"absent" (nothing there), "unfinished" (a creation that was killed before its layout was complete:
    nothing was computed in it) or "ready". Protocol stores are "ready" here (`check_path` tells kinds apart)."""
    try:
        g = open_group(path, "r", "study store")
    except FileNotFoundError:
        return "absent"
    return "unfinished" if _unfinished(_Arrays(g, path)) else "ready"


def _unfinished(group: _Arrays) -> bool:
    """A study store whose creation was killed: `created` is False, or (a store made before the attribute)
    a core array is missing. Protocol stores are never unfinished here."""
    attrs = group.attrs
    if "protocol" in attrs:
        return False
    if "created" in attrs:
        return attrs["created"] is False
    return not all(n in group for n in CORE_ARRAYS)


def remove(path: str) -> None:
    """Delete the store at `path` (a local folder or an fsspec URL)."""
    if "://" in path:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        fs.rm(root, recursive=True)
    else:
        shutil.rmtree(path)


def unfinished_error(path: str) -> StoreStateError:
    from .claims import holders

    creator = next((c for c in holders(path) if c["unit"] == "store"), None)
    if creator is not None:
        return StoreStateError(f"the store {path!r} is being created by another run right now (pid {creator.get('pid')} "
                               f"on {creator.get('host')}); wait for it, then run this command again")
    return StoreStateError(f"the store {path!r} was interrupted while it was being created (killed before its layout "
                           "was complete; nothing was computed in it): rerun the `saliency-atlas study` command that "
                           "made it, which creates it again")


def open_dataset(path: str) -> xr.Dataset:
    """The study as a lazy (Dask-backed) ``xarray.Dataset``. Read through the consolidated metadata when it is
    there (one read, where each array's metadata is a request on object storage), else array by array (a run
    killed between a change of the layout and its consolidation leaves none)."""
    Store(path, mode="r")  # refuses, in one line, a path that holds no study store or an unfinished one
    ignore_zarr_notes()
    try:
        return xr.open_zarr(path, consolidated=True)
    except (ValueError, KeyError):
        return xr.open_zarr(path, consolidated=False)


def check_path(path: str, kind: str) -> None:
    """Refuse, before anything is written, a store path that holds something else: a file, a folder
    with other content, or the other kind of store (`kind`: "study" or "protocol")."""
    if "://" in path:  # an fsspec URL: the store's own metadata decides
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"the store path {path!r} is a file, not a Zarr store; give a new path "
                              "or an existing store")
    if not p.is_dir() or not os.listdir(p):
        return
    if not (p / "zarr.json").exists():
        raise FileExistsError(f"the store path {path!r} is a folder with other content, not a Zarr store; "
                              "give a new path or an existing store")
    try:
        protocol = json.loads((p / "zarr.json").read_text()).get("attributes", {}).get("protocol")
    except json.JSONDecodeError as e:
        raise damaged_metadata(path, "zarr.json", e) from None
    if (protocol is None) != (kind == "study"):
        found = f"the {protocol} protocol's store" if protocol else "a study store"
        raise FileExistsError(f"the store path {path!r} holds {found}, not a {kind} store; give a new path")


def exists(path: str) -> bool:
    """True when `path` holds a study store whose creation finished (an unfinished one is created again)."""
    return creation_state(path) == "ready"


def _committed(names: np.ndarray) -> list[str]:
    # Coordinates are extended last when a store grows, and empty names are slots
    # of a growth that did not finish: they are not part of the store yet.
    return [str(x) for x in names if str(x)]


def open_group(path: str, mode: str, what: str) -> zarr.Group:
    """The Zarr v3 group at `path`, read without consolidated metadata (block work must see the
    arrays as they are); FileNotFoundError naming `what` is missing."""
    ignore_zarr_notes()
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3, use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
        raise FileNotFoundError(f"no {what} at {path!r}") from e
    except json.JSONDecodeError as e:
        raise damaged_metadata(path, "zarr.json", e) from None


def damaged_metadata(path: str, name: str, e: Exception) -> StoreStateError:
    """The error for a metadata file that is not the JSON zarr wrote (truncated, or edited by hand)."""
    where = f"{path.rstrip('/')}/{name}"
    return StoreStateError(f"the store's metadata file {where!r} is damaged ({e}); the chunks are untouched: restore "
                           "that file from a copy of the store, or start a new --store")


class _Arrays:
    """A Zarr group whose arrays are opened once: each ``group[name]`` of a zarr v3 group reads and
    parses the array's metadata from the store, several times per block otherwise. A Store lives for
    one unit of work; its layout changes only through `Store.grow` and `_add_*`, which reopen it.
    Membership (`in`) and the string coordinates' names are remembered too."""

    def __init__(self, group: zarr.Group, path: str) -> None:
        self._group, self._arrays, self._known, self._names, self._path = group, {}, {}, {}, path

    def names(self, coord: str) -> list[str]:
        """The committed names of a string coordinate, read once (`Store._extend_names` rereads)."""
        if coord not in self._names:
            self._names[coord] = _committed(self[coord][:])
        return list(self._names[coord])

    def __getitem__(self, name: str) -> Any:
        if name not in self._arrays:
            try:
                self._arrays[name] = self._group[name]
            except json.JSONDecodeError as e:
                raise damaged_metadata(self._path, f"{name}/zarr.json", e) from None
            except KeyError:
                raise StoreStateError(f"the store {self._path!r} has no array {name!r}: it was not written by this "
                                      "package, or its folder was deleted by hand; `saliency-atlas status "
                                      f"{self._path}` says what it holds") from None
        return self._arrays[name]

    def __contains__(self, name: str) -> bool:
        if name not in self._known:  # a local store: one stat, not a metadata read through zarr
            local = "://" not in self._path
            self._known[name] = (os.path.isfile(os.path.join(self._path, name, "zarr.json")) if local
                                 else name in self._group)
        return self._known[name]

    def __getattr__(self, name: str) -> Any:  # attrs, create_array, ...: the group's own
        return getattr(self._group, name)


class Store:
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

    def _record(self, where: tuple[Any, ...], checksum: int) -> None:
        name, *index = where
        if name in self.group:  # a store made before checksums were recorded gains them in `grow`
            self.group[name][tuple(index)] = checksum

    def _sample_checksum(self, block: int, written: dict[str, np.ndarray] | None = None) -> int:
        """The CRC-32 of a block's sample variables as the store holds them: those just `written` (cast to
        their arrays' dtypes) from memory, as the codecs are lossless, and the others read back."""
        s, written = block_slice(block, self.n_samples, self.block_size), written or {}
        return checksum(*(written[v] if v in written else self.group[v][s] for v in SAMPLE_VARIABLES if v in self.group))

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

    def _map_checksum(self, m: int, block: int, written: tuple[np.ndarray, np.ndarray] | None = None) -> int:
        """The CRC-32 of a block's maps and failure codes: those just `written` (as stored), or read back."""
        s, has_failure = block_slice(block, self.n_samples, self.block_size), "failure" in self.group
        maps, failure = written or (self.group["attribution"][m, s], self.group["failure"][m, s] if has_failure else None)
        return checksum(maps, *([failure] if has_failure else []))

    def verify(self) -> list[dict[str, Any]]:
        """Every finished block read back and checked against the checksum recorded with its flag: one
        entry per damaged block (a chunk truncated, deleted or overwritten), naming it and why."""
        damaged = []

        def check(kind: str, method: str | None, block: int, recorded: int, now: Callable[[], int]) -> None:
            if recorded < 0:
                return  # finished before checksums were recorded: nothing to compare with
            try:
                found, why = now(), ""
            except Exception as e:  # a truncated chunk fails to decompress
                found, why = None, f"unreadable ({type(e).__name__}: {e})"
            if found != recorded:
                damaged.append({"kind": kind, "xai_method": method, "block": block,
                                "why": why or f"checksum {found} differs from the recorded {recorded}"})

        g = self.group
        if "ingested_checksum" in g:
            for b in np.flatnonzero(g["ingested"][:]):
                check("samples", None, int(b), int(g["ingested_checksum"][b]), lambda b=int(b): self._sample_checksum(b))
        if "checksum" in g:
            sums, done = g["checksum"][:], g["done"][:]
            for m, name in enumerate(self.methods()):
                for b in np.flatnonzero(done[m]):
                    check("maps", name, int(b), int(sums[m, b]), lambda m=m, b=int(b): self._map_checksum(m, b))
        return damaged

    def mark_damaged(self, damaged: list[dict[str, Any]]) -> None:
        """Unset the flags of damaged blocks, so the next run recomputes exactly them (deterministically)."""
        for d in damaged:
            if d["kind"] == "samples":
                self.group["ingested"][d["block"]] = False
            else:
                self.group["done"][self._method_index(d["xai_method"]), d["block"]] = False

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
        self.group["score"][m, s, k] = value.astype(np.float32)
        self.group["score_status"][m, s, k] = status.astype(np.int8)
        if curve is not None:
            self.group["curve"][m, k, s, : curve.shape[1]] = curve.astype(np.float32)
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

    def read_maps(self, method: str, block: int) -> np.ndarray:
        s = block_slice(block, self.n_samples, self.block_size)
        return self.group["attribution"][self._method_index(method), s]

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

    def failure_counts(self) -> dict[str, dict[int, int]]:
        """Per method, the number of failed maps by failure code (methods without failures are left out)."""
        if "failure" not in self.group:
            return {}
        codes = self.group["failure"][:]
        out = {}
        for i, m in enumerate(self.methods()):
            found, counts = np.unique(codes[i][codes[i] > 0], return_counts=True)
            if found.size:
                out[m] = {int(c): int(n) for c, n in zip(found, counts)}
        return out

    def empty_masks(self) -> int | None:
        """How many ingested samples have an empty ground-truth mask (None: the study has no masks), read a
        block at a time."""
        if "mask" not in self.group:
            return None
        n, b, arr = self.n_samples, self.block_size, self.group["mask"]
        return sum(int((~arr[block_slice(k, n, b)].any(axis=(1, 2))).sum())
                   for k in np.flatnonzero(self.group["ingested"][:]))

    def _scored(self) -> np.ndarray | None:
        return self.group["scored"][:] if "scored" in self.group else None

    def status(self) -> dict[str, Any]:
        """Blocks done per method, plus the store's identity and size."""
        g, a = self.group, self.attrs
        done = g["done"][:]
        n, b = self.n_samples, self.block_size
        sizes = [len(range(n)[block_slice(k, n, b)]) for k in range(done.shape[1])]
        maps_done = int((done * np.array(sizes)).sum())
        stored = {v.name: int(g[v.name].nbytes_stored()) for v in SCHEMA if v.guard and v.name in g}
        return {
            "bytes_stored": stored,
            "bytes_per_map": stored["attribution"] / maps_done if maps_done else None,
            "map_dtype": str(g["attribution"].dtype),
            "compression": a.get("compression"),
            "path": self.path,
            "samples": n,
            "blocks": int(done.shape[1]),
            "ingested": int(g["ingested"][:].sum()),
            "methods": {m: int(done[i].sum()) for i, m in enumerate(self.methods())},
            "failures": self.failure_counts(),
            "empty_masks": self.empty_masks(),
            "params": a["params"],
            "scored": ({k: {m: int(scored[i, j].sum()) for i, m in enumerate(self.methods())}
                        for j, k in enumerate(self.metrics())} if (scored := self._scored()) is not None else {}),
            **{k: a.get(k) for k in ("model", "dataset", "model_fingerprint", "dataset_fingerprint", "failure_codes")},
        }
