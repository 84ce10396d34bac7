"""Users' own images: a folder ``DIR/<class>/<image>`` read with PIL."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .base import Batch


def _read_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Decode ``path`` to float32 (3, H, W) in [0, 1]; raises whatever PIL raises."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)  # camera orientation
        if img.mode.startswith("I;16"):  # 16-bit grayscale: convert("RGB") would saturate
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8))
        img = img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255


def _check(path: Path) -> str | None:
    """None if PIL fully decodes ``path``, else the reason it cannot."""
    try:
        with Image.open(path) as img:
            img.load()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"


class FolderDataset:
    """Images in class sub-folders; implements the zoo ``Dataset`` protocol.

    Classes are the sorted sub-folder names, files are sorted within each class (one
    level deep, hidden entries ignored).  Files PIL cannot decode (empty, not an image, over
    PIL's decompression-bomb limit) are skipped and listed in ``skipped`` as (relative path,
    reason); a symbolic link that leads outside the folder is refused.  With ``limit``, only the first ``limit``
    readable files in that order are used.  Images become RGB, resized bilinearly to
    ``size`` (H, W).  No masks.
    """

    has_masks = False

    def __init__(self, root: str | os.PathLike, size: tuple[int, int] = (64, 64), limit: int | None = None):
        self.root = Path(root)
        self.name = str(root)
        self.size = size
        if not self.root.is_dir():
            raise ValueError(f"dataset folder {self.name!r} is not a directory; pass a folder laid out "
                             "as DIR/<class>/<image> or a built-in dataset name")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for c in self.classes:
            self._inside(self.root / c)
        if not self.classes:
            raise ValueError(f"dataset folder {self.name!r} has no class sub-folders; put the images "
                             "of each class in their own sub-folder: DIR/<class>/<image>")
        # every candidate file, in order: class by class, files sorted within a class
        self._candidates = [(f"{c}/{f.name}", k) for k, c in enumerate(self.classes)
                            for f in sorted((self.root / c).iterdir(), key=lambda p: p.name)
                            if self._inside(f).is_file() and not f.name.startswith(".")]
        self._reasons: dict[str, str | None] = {}  # relative path -> None (readable) or reason
        self._files: list[tuple[str, int]] = []
        for rel, k in self._candidates:
            if limit is not None and len(self._files) >= limit:
                break
            if self._reason(rel) is None:
                self._files.append((rel, k))
        self.skipped: list[tuple[str, str]] = [(rel, r) for rel, r in self._reasons.items() if r is not None]
        if not self._files:
            raise ValueError(f"dataset folder {self.name!r} has no readable images "
                             f"({len(self._candidates)} files in {len(self.classes)} class sub-folders, "
                             f"{len(self.skipped)} unreadable); add image files PIL can open "
                             "(PNG, JPEG, ...) under DIR/<class>/")
        self._fingerprint: str | None = None

    def _inside(self, path: Path) -> Path:
        """`path`, refused when it is a symbolic link that leads outside the dataset folder."""
        if path.is_symlink() and not path.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"dataset folder {self.name!r}: {path.relative_to(self.root).as_posix()!r} is a symbolic "
                             f"link to {str(path.resolve())!r}, outside the folder; a dataset may not reach outside "
                             "its folder: copy the file in, or remove the link")
        return path

    def _reason(self, rel: str) -> str | None:
        if rel not in self._reasons:
            self._reasons[rel] = _check(self.root / rel)
        return self._reasons[rel]

    def __len__(self) -> int:
        return len(self._files)

    def _slice(self, start: int, stop: int) -> list[tuple[str, int]]:
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
        return self._files[start:stop]

    def ids(self, start: int, stop: int) -> list[str]:
        return [rel for rel, _ in self._slice(start, stop)]

    def load(self, start: int, stop: int) -> Batch:
        """Samples [start, stop) (stop is clipped to len(self))."""
        return self.load_ids(self.ids(start, stop))

    def _label(self, rel: str) -> int:
        if not hasattr(self, "_labels"):
            self._labels = dict(self._candidates)
        if rel not in self._labels or self._reason(rel) is not None:
            raise ValueError(f"sample {rel!r} is no longer a readable image of {self.name!r}")
        return self._labels[rel]

    def load_ids(self, ids: list[str]) -> Batch:
        """The samples with these relative paths, in this order."""
        labels = np.array([self._label(rel) for rel in ids], dtype=np.int64)
        images = np.empty((len(ids), 3, *self.size), np.float32)
        for i, rel in enumerate(ids):
            try:
                images[i] = _read_rgb(self.root / rel, self.size)
            except Exception as e:  # noqa: BLE001 - changed on disk since it was checked
                raise ValueError(f"image {rel!r} in {self.name!r} can no longer be read: {e}") from None
        return Batch(images, labels, None, list(ids))

    def digest(self, ids: list[str]) -> str:
        """sha256 of the image size and the relative paths and bytes of exactly these samples."""
        h = hashlib.sha256(f"folder|size={self.size[0]}x{self.size[1]}".encode())
        for rel in ids:
            self._label(rel)
            h.update(f"\0{rel}\0".encode())
            h.update((self.root / rel).read_bytes())
        return h.hexdigest()

    def fingerprint(self) -> str:
        """sha256 of the image size and the sorted relative paths and bytes of ALL readable files
        in the folder (not only the first ``limit``), so it does not depend on the limit."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"folder|size={self.size[0]}x{self.size[1]}".encode())
            for rel, _ in sorted(self._candidates):
                if self._reason(rel) is None:
                    h.update(f"\0{rel}\0".encode())
                    h.update((self.root / rel).read_bytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint
