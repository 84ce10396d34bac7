"""Creating a study store: the layout of a `Template` written in one go, its attribute ``created``
False until the whole layout is there, so that a creation killed midway is recognised (`group`)."""
from __future__ import annotations

import json

import numpy as np
import zarr

from .group import creation_state, ignore_zarr_notes, open_group, remove
from .schema import SCHEMA_VERSION, Template, _evaluation_attrs, _layout
from .store import Store


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
        **({"map_grid": list(t.map_grid)} if t.map_grid else {}),
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

