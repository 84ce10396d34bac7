"""A store's Zarr group on disk: opening it, telling its states apart (absent, unfinished, ready),
refusing a path that holds something else, and the arrays of a group opened once (`_Arrays`)."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .schema import CORE_ARRAYS, StoreStateError


_ZARR_NOTES = (r"The data type \(.*\) does not have a Zarr V3 specification",
               r"Consolidated metadata is currently not part in the Zarr format 3 specification")


def ignore_zarr_notes() -> None:
    """Zarr notes that string dtypes and consolidated metadata are not yet in the v3 spec; both are
    what xarray itself writes and reads, so here they are noise. Ignored for the process, not in a
    scope (`warnings.catch_warnings` is not thread-safe, and stores are opened in the loader and the
    writer threads while a block computes: `tasks.study.pipeline`); called where stores are opened, since
    a caller's scope may have dropped the filters. A filter is added only when missing: each change
    of the filters makes every warning already shown once show again."""
    present = {f[1].pattern for f in warnings.filters if f[0] == "ignore" and f[1] is not None}
    for note in _ZARR_NOTES:
        if note not in present:
            warnings.filterwarnings("ignore", message=note)


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
