"""Saliency Atlas study store: a chunked Zarr v3 group read through xarray.

>>> import storage
>>> ds = storage.open_dataset("runs/shapes.zarr")            # lazy xarray, for reading
>>> ds.attribution.sel(xai_method="gradcam").isel(sample=0).plot()
>>> store = storage.Store("runs/shapes.zarr")                # the handle tasks write through
>>> store.pending("gradcam"), store.status()
"""
from .claims import claim, holders
from .aggregate import aggregate, default_out, select, summarize
from .results import Part, ResultStore, is_result_store
from .scores import compare, comparisons, describe_comparison, interval, means, score_table
from .create import create
from .group import check_path, creation_state, exists
from .schema import (
    COMPRESSIONS,
    CORE_ARRAYS,
    SCHEMA,
    SCHEMA_VERSION,
    Difference,
    StoreLayoutError,
    StoreMismatch,
    StoreStateError,
    Template,
    Variable,
    block_slice,
    n_blocks,
    schema_markdown,
)
from .store import Store, open_dataset
from . import grid  # noqa: E402  (maps on a grid smaller than the input)

__all__ = [
    "COMPRESSIONS", "Part", "ResultStore", "is_result_store", "SCHEMA", "SCHEMA_VERSION", "Difference", "Store", "StoreLayoutError", "StoreMismatch", "StoreStateError", "creation_state", "CORE_ARRAYS",
    "Template", "Variable", "aggregate", "block_slice", "check_path", "create", "default_out", "exists", "n_blocks",
    "grid", "open_dataset", "schema_markdown", "select", "summarize",
    "claim", "holders", "compare", "comparisons", "describe_comparison", "interval", "means", "score_table",
]
