"""``load_dataset``: a built-in dataset by name, or a local folder of class sub-folders."""

from __future__ import annotations

from pathlib import Path

from .base import Dataset
from .folder import FolderDataset
from .shapes import ShapesDataset

DATASETS: tuple[str, ...] = ("shapes",)


def load_dataset(name_or_path: str, *, split: str = "test", size: tuple[int, int] | int = 64,
                 limit: int | None = None, seed: int = 0, masks: str | None = None) -> Dataset:
    """``"shapes"`` (``limit`` samples, default 1000, of ``split`` from ``seed``) or an
    existing directory ``DIR/<class>/<image>`` (first ``limit`` readable files; ``split``
    and ``seed`` do not apply; ``masks``: a folder of masks or a CSV of boxes, see `FolderDataset`).
    Images are (H, W) = ``size``."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if name_or_path == "shapes":
        if masks is not None:
            raise ValueError("masks are for a folder dataset; the built-in shapes has its own")
        return ShapesDataset(seed=seed, split=split, size=hw, length=1000 if limit is None else limit)
    if Path(name_or_path).is_dir():
        return FolderDataset(name_or_path, size=hw, limit=limit, masks=masks)
    what = "is a file, not a directory" if Path(name_or_path).exists() else "is not a built-in dataset or an existing directory"
    raise ValueError(f"dataset {name_or_path!r} {what}: built-in datasets are {', '.join(DATASETS)}; "
                     "a local folder of class sub-folders (DIR/<class>/<image>) also works.")
