"""Users' own images: a folder ``DIR/<class>/<image>`` read with PIL."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

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


DECODE_THREADS = min(8, os.cpu_count() or 1)


def _decoded(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """`fn` over `items`, in order, in `DECODE_THREADS` threads: PIL lets go of the GIL while it decodes and
    resizes, so the files of a block decode at once."""
    if len(items) < 2 or DECODE_THREADS < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(DECODE_THREADS, "decode") as pool:
        return list(pool.map(fn, items))


def _is_mask(path: Path) -> bool:
    return ".mask." in path.name


class _Masks:
    """Where a folder dataset's ground-truth masks come from: ``IMAGE.mask.png`` beside each image
    (default), a parallel folder ``MASKS/<class>/<image stem>.png``, or a CSV of boxes ``file, y0, x0,
    y1, x1`` in the image's own pixels (VOC-style, several rows per image). Non-zero mask pixels are the
    object; masks are resized to the model input with nearest neighbours, boxes scaled. An image
    without one gets an empty mask, which the localisation metrics leave out and count."""

    def __init__(self, root: Path, given: str | os.PathLike | None) -> None:
        self.root, self.given, self.given_path = root, given is not None, given
        self.folder = Path(given) if given is not None and Path(given).is_dir() else None
        self.boxes: dict[str, list[tuple[float, float, float, float]]] = {}
        self.lines: dict[str, list[int]] = {}  # per file, the CSV lines of its boxes
        if given is not None and self.folder is None:
            self.boxes, self.lines = _read_boxes(Path(given))

    def problems(self, files: list[str], root: Path) -> list[str]:
        """What the boxes file says that cannot be right: rows naming files the dataset does not have, and
        boxes outside their image (their masks come out empty or clipped). One line per kind, with the rows."""
        if not self.boxes:
            return []
        known, missing, outside = set(files), [], []
        for rel, boxes in self.boxes.items():
            if rel not in known:
                missing += [f"{rel} (line {n})" for n in self.lines[rel]]
                continue
            with Image.open(root / rel) as img:
                w, h = img.size
            outside += [f"{rel} (line {n}: {list(b)} in a {h}x{w} image)" for n, b in zip(self.lines[rel], boxes)
                        if b[2] > h or b[3] > w]
        out = []
        for rows, what in ((missing, "name files that are not readable images of the dataset"),
                           (outside, "have boxes outside their image (y1 > height or x1 > width: the mask is clipped, "
                                     "empty when the whole box is outside)")):
            if rows:
                shown = "; ".join(rows[:5]) + (f"; and {len(rows) - 5} more" if len(rows) > 5 else "")
                out.append(f"boxes file {str(self.given_path)!r}: {len(rows)} row(s) {what}: {shown}")
        return out

    def sibling(self, image: Path) -> Path | None:
        candidate = image.with_name(image.stem + ".mask.png")
        return candidate if candidate.is_file() else None

    def _file(self, rel: str) -> Path | None:
        if self.folder is not None:
            path = (self.folder / rel).with_suffix(".png")
            return path if path.is_file() else None
        return None if self.boxes else self.sibling(self.root / rel)

    def of(self, rel: str, size: tuple[int, int]) -> np.ndarray:
        """The (H, W) bool mask of image `rel` at `size`."""
        path = self._file(rel)
        if path is not None:
            with Image.open(path) as m:
                return np.asarray(m.convert("L").resize((size[1], size[0]), Image.NEAREST)) > 0
        out = np.zeros(size, bool)
        if rel in self.boxes:
            with Image.open(self.root / rel) as img:
                w, h = img.size
            for y0, x0, y1, x1 in self.boxes[rel]:
                out[int(y0 * size[0] / h): int(np.ceil(y1 * size[0] / h)),
                    int(x0 * size[1] / w): int(np.ceil(x1 * size[1] / w))] = True
        return out

    def source(self, rel: str) -> bytes:
        """What the mask of `rel` is made from, for the dataset's digest."""
        path = self._file(rel)
        return path.read_bytes() if path is not None else repr(self.boxes.get(rel, [])).encode()


def _read_boxes(path: Path) -> tuple[dict[str, list[tuple[float, float, float, float]]], dict[str, list[int]]]:
    """Per file, its boxes and the lines they are on."""
    import csv

    if not path.is_file():
        raise ValueError(f"masks {str(path)!r} is neither a folder of masks nor a CSV file of boxes")
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    lines: dict[str, list[int]] = {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or row[0].strip().lower() in ("file", "#"):
                continue
            try:
                y0, x0, y1, x1 = (float(v) for v in row[1:5])
            except ValueError:
                raise ValueError(f"boxes file {str(path)!r}, line {n}: expected file,y0,x0,y1,x1 with numbers, "
                                 f"got {row}") from None
            if len(row) != 5 or not (y1 > y0 >= 0 and x1 > x0 >= 0):
                raise ValueError(f"boxes file {str(path)!r}, line {n}: expected file,y0,x0,y1,x1 with y0 < y1 and "
                                 f"x0 < x1, got {row}")
            boxes.setdefault(row[0].strip(), []).append((y0, x0, y1, x1))
            lines.setdefault(row[0].strip(), []).append(n)
    return boxes, lines


def _not_a_file(path: Path) -> str | None:
    """None for a regular file (or a link to one), else what the entry is instead."""
    import stat

    try:
        mode = path.stat().st_mode
    except (RuntimeError, OSError) as e:
        if path.is_symlink():
            return "a symbolic link that leads nowhere or in a loop, not an image file"
        return f"not readable ({type(e).__name__}: {e})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder (images are read one level deep: DIR/<class>/<image>)"),
             (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    what = next((text for test, text in kinds if test(mode)), "a special file")
    return what if "folder" in what else f"{what}, not an image file"


KEEP_DECODED_BYTES = 256 * 2**20  # of decoded pixels the check keeps for each file's first load


def _stat_key(path: Path) -> tuple[int, int]:
    """What tells that a file changed since it was decoded: its size and modification time."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class FolderDataset:
    """Images in class sub-folders; implements the zoo ``Dataset`` protocol.

    Classes are the sorted sub-folder names, files are sorted within each class (one
    level deep, hidden entries ignored).  Files PIL cannot decode (empty, not an image, over
    PIL's decompression-bomb limit) are skipped and listed in ``skipped`` as (relative path,
    reason); a symbolic link that leads outside the folder is refused.  With ``limit``, only the first ``limit``
    readable files in that order are used.  Images become RGB, resized bilinearly to
    ``size`` (H, W); the check decodes each file as a load would, and keeps the pixels of the first
    ``KEEP_DECODED_BYTES`` worth for their first load (unless the file changed since).  Masks: see
    `_Masks` (``masks``: a folder or a CSV of boxes; by default ``IMAGE.mask.png`` beside an image,
    which is not itself a sample).
    """

    def __init__(self, root: str | os.PathLike, size: tuple[int, int] = (64, 64), limit: int | None = None,
                 masks: str | os.PathLike | None = None):
        self.root = Path(root)
        self.masks = _Masks(self.root, masks)
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
        # every candidate file, in order: class by class, files sorted within a class; other entries
        # (folders, links that lead nowhere or in a loop, pipes, sockets, devices) are named and skipped
        self._candidates, odd = [], []
        for k, c in enumerate(self.classes):
            for f in sorted((self.root / c).iterdir(), key=lambda p: p.name):
                if f.name.startswith(".") or _is_mask(f):
                    continue
                why = _not_a_file(self._inside(f))
                if why is None:
                    self._candidates.append((f"{c}/{f.name}", k))
                else:
                    odd.append((f"{c}/{f.name}", why))
        self._reasons: dict[str, str | None] = {}  # relative path -> None (readable) or reason
        self._kept: dict[str, tuple[tuple[int, int], np.ndarray]] = {}  # path -> (stat key, pixels), until loaded
        self._keep = KEEP_DECODED_BYTES // (3 * size[0] * size[1] * 4)  # candidates whose pixels the check keeps
        self._files, seen = self._readable(limit)
        self.keep_decoded([rel for rel, _ in self._files])  # not those checked past the limit
        self.skipped: list[tuple[str, str]] = odd + [(rel, r) for rel, _ in self._candidates[:seen]
                                                     if (r := self._reasons[rel]) is not None]
        if not self._files:
            raise ValueError(f"dataset folder {self.name!r} has no readable images "
                             f"({len(self._candidates)} files in {len(self.classes)} class sub-folders, "
                             f"{len(self.skipped)} unreadable); add image files PIL can open "
                             "(PNG, JPEG, ...) under DIR/<class>/")
        self._fingerprint: str | None = None
        self._digests: dict[tuple[str, ...], str] = {}  # the last digests asked for (this object lives while the
        #                                                  folder's listing, sizes and mtimes, stays the same)
        # rows of a boxes file that name no readable file, or fall outside their image (`_Masks.problems`)
        self.mask_problems = self.masks.problems([rel for rel, _ in self._candidates if self._reasons.get(rel) is None],
                                                 self.root)
        self.has_masks = self.masks.given or any(self.masks.sibling(self.root / rel) for rel, _ in self._files)

    def _readable(self, limit: int | None) -> tuple[list[tuple[str, int]], int]:
        """The first `limit` (or all) readable candidates, and how many candidates that took; the files are
        checked a chunk at a time, in decode threads."""
        files: list[tuple[str, int]] = []
        seen = 0
        while seen < len(self._candidates) and (limit is None or len(files) < limit):
            wanted = 256 if limit is None else max(2 * DECODE_THREADS, limit - len(files))
            chunk = self._candidates[seen:seen + min(wanted, 256)]
            reasons = _decoded(lambda i: self._reason(self._candidates[i][0], keep=i < self._keep),
                               list(range(seen, seen + len(chunk))))
            for (rel, k), reason in zip(chunk, reasons):
                if limit is not None and len(files) >= limit:
                    break
                seen += 1
                if reason is None:
                    files.append((rel, k))
        return files, seen

    def _inside(self, path: Path) -> Path:
        """`path`, refused when it is a symbolic link that leads outside the dataset folder."""
        try:
            target = path.resolve()
        except (RuntimeError, OSError):  # a loop of links: `_not_a_file` names it
            return path
        if path.is_symlink() and not target.is_relative_to(self.root.resolve()):
            raise ValueError(f"dataset folder {self.name!r}: {path.relative_to(self.root).as_posix()!r} is a symbolic "
                             f"link to {str(path.resolve())!r}, outside the folder; a dataset may not reach outside "
                             "its folder: copy the file in, or remove the link")
        return path

    def _reason(self, rel: str, keep: bool = False) -> str | None:
        """None if `rel` decodes as a load decodes it (its pixels kept with `keep`), else the reason it cannot."""
        if rel not in self._reasons:
            path = self.root / rel
            try:
                key, pixels = _stat_key(path), _read_rgb(path, self.size)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                self._reasons[rel] = f"{type(e).__name__}: {e}"
                return self._reasons[rel]
            if keep:
                self._kept[rel] = key, pixels
            self._reasons[rel] = None
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

    def keep_decoded(self, ids: list[str]) -> None:
        """Forget the pixels the check kept, but those of `ids` (the samples a run will load next)."""
        wanted = set(ids)
        self._kept = {rel: v for rel, v in self._kept.items() if rel in wanted}

    def load_ids(self, ids: list[str]) -> Batch:
        """The samples with these relative paths, in this order."""
        labels = np.array([self._label(rel) for rel in ids], dtype=np.int64)
        images = np.empty((len(ids), 3, *self.size), np.float32)
        masks = np.zeros((len(ids), *self.size), bool) if self.has_masks else None

        def decode(i: int) -> None:
            path, kept = self.root / ids[i], self._kept.pop(ids[i], None)
            try:
                images[i] = kept[1] if kept is not None and kept[0] == _stat_key(path) else _read_rgb(path, self.size)
            except Exception as e:  # noqa: BLE001 - changed on disk since it was checked
                raise ValueError(f"image {ids[i]!r} in {self.name!r} can no longer be read: {e}") from None
            if masks is not None:
                masks[i] = self.masks.of(ids[i], self.size)

        _decoded(decode, list(range(len(ids))))
        return Batch(images, labels, masks, list(ids))

    def digest(self, ids: list[str]) -> str:
        """sha256 of the image size and the relative paths and bytes of exactly these samples (read once for
        the same samples: a resumed study checks the stored samples and records them)."""
        key = tuple(ids)
        if key not in self._digests:
            h = hashlib.sha256(f"folder|size={self.size[0]}x{self.size[1]}".encode())
            for rel in ids:
                self._label(rel)
                h.update(f"\0{rel}\0".encode())
                h.update((self.root / rel).read_bytes())
                h.update(self.masks.source(rel))
            self._digests = {**dict(list(self._digests.items())[-1:]), key: h.hexdigest()}  # two at most
        return self._digests[key]

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
