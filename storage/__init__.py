"""Saliency Atlas study store: a chunked Zarr v3 group read through xarray.

>>> import storage
>>> ds = storage.open_dataset("runs/shapes.zarr")
>>> ds.attribution.sel(xai_method="gradcam").isel(sample=0).plot()
"""
from .aggregate import aggregate, default_out, select, summarize
from .store import (
    COMPRESSIONS,
    SCHEMA_VERSION,
    StoreMismatch,
    Template,
    attrs,
    block_slice,
    check_compatible,
    create,
    exists,
    grow,
    has,
    methods,
    n_blocks,
    open_dataset,
    pending,
    read_samples,
    sample_ids,
    status,
    write_attribution,
    write_samples,
)

__all__ = [
    "COMPRESSIONS",
    "aggregate", "default_out", "select", "summarize",
    "SCHEMA_VERSION", "StoreMismatch", "Template", "attrs", "block_slice", "check_compatible", "create",
    "exists", "grow", "has", "methods", "n_blocks", "open_dataset", "pending", "read_samples", "sample_ids", "status",
    "write_attribution", "write_samples",
]
