"""Images per model pass inside a block: the study's `batch`.

A block's maps are computed in passes of at most `batch` images and concatenated; every method's
map of an image does not depend on the other images of its pass (tested per method), so the batch
changes the maps by floating-point rounding at most. `batch=None` ("auto") is the whole block on a
CPU and, on a GPU, as many images as its free memory holds: one probe pass on two images measures
the peak memory per image of the unit's own methods, and a pass that still runs out of memory is
redone in halves.

On a CPU the memory comes from the C allocator. glibc's default gives back the large blocks of a pass
(a study's 67-134 MB activations) as soon as they are freed, and the next pass page-faults them in
again; `retain_freed_memory` keeps them for reuse instead (docs/performance.md).

A unit's inputs reach the GPU through `to_device`, in the loading thread while the unit before computes:
from pinned memory, on a stream of their own, so that the copy runs beside that unit's kernels.
"""
from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch
from torch import Tensor

MEMORY_SHARE = 0.8  # of the free memory a pass may take: the rest is room for the allocator's fragments
PROBE_IMAGES = 2
_per_image: dict[Hashable, float] = {}  # bytes per image, per (model, methods, parameters, input shape, device)

# glibc's malloc, as `retain_freed_memory` sets it; the same as the environment's GLIBC_TUNABLES that the
# Makefile exports and local Dask workers get, which also ask for transparent huge pages.
RETAINED_BYTES = 1 << 29  # freed memory kept for reuse, per process, before any is given back (`give_back_excess`)
MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   f"glibc.malloc.trim_threshold={RETAINED_BYTES}")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt's parameters, from <malloc.h>


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, up to `RETAINED_BYTES`: every thread allocates from
    the one main heap (a thread's own heap holds at most 64 MB, so larger blocks would be mapped afresh),
    no block is mapped on its own, and the heap is trimmed only past that much free memory. For the whole
    process, and best called before it starts threads; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: macOS, Windows, musl without it
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, RETAINED_BYTES)))


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (2.33+): sizes in bytes, summed over the heaps
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype, libc.malloc_trim.argtypes = _MallInfo2, [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc, or one older than 2.33
        return None


def free_heap_bytes() -> int | None:
    """Bytes malloc holds free for reuse, over all its heaps; None where the C library cannot say."""
    libc = _libc()
    return None if libc is None else int(libc.mallinfo2().fordblks)


def give_back_excess(limit: int = RETAINED_BYTES) -> bool:
    """Return malloc's free memory to the system when it holds more than `limit` free; True when it did.

    glibc gives back only the top of a heap, and only past its trim threshold: free memory between blocks in
    use stays resident. A study's passes allocate and free blocks of many sizes, so that free memory grows
    with the number of units run (measured: 1.0 GB free against 0.23 GB in use after 32 blocks), and with it
    the process's resident memory. Called after each unit, this keeps what is retained for reuse under `limit`
    while a unit's own memory comes back at the next: the cost, a page fault per page of the next pass, is
    paid once per `limit` bytes of churn, not per pass."""
    free = free_heap_bytes()
    if free is None or free <= limit:
        return False
    _libc().malloc_trim(0)
    return True


def fitting(per_image: float, free: float, block: int) -> int:
    """The images of one pass: `MEMORY_SHARE` of `free` bytes at `per_image` bytes each, 1 to `block`."""
    if not math.isfinite(per_image):
        return 1
    return max(1, min(block, int(MEMORY_SHARE * free // max(per_image, 1.0))))


def free_bytes(device: str) -> int:
    """What a pass on `device` may allocate: the driver's free memory plus what torch holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def peak_per_image(probe: Callable[[int], Any], images: int, device: str) -> float:
    """Peak bytes per image that `probe(images)` allocates on `device` above what was allocated before it;
    inf when even the probe runs out of memory."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        probe(images)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return math.inf
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / images


def images_per_pass(batch: int | None, device: str, block: int, probe: Callable[[int], Any], key: Hashable) -> int:
    """`batch` when given (at most the block); else the whole block on a CPU, and on a GPU what fits in its
    free memory at the peak per image that `probe(k)` (the unit's work on its first k images) measures once
    per `key` and process."""
    if batch is not None:
        return max(1, min(batch, block))
    if not device.startswith("cuda"):
        return block
    if key not in _per_image:
        _per_image[key] = peak_per_image(probe, min(PROBE_IMAGES, block), device)
    return fitting(_per_image[key], free_bytes(device), block)


def in_passes(fn: Callable[[slice], dict[str, Tensor]], n: int, batch: int) -> tuple[dict[str, Tensor], int]:
    """`fn` on slices of at most `batch` of the `n` images, its tensors concatenated in order, and the batch
    that ran. A pass that runs out of (GPU) memory is redone with half the images, down to one."""
    parts: list[dict[str, Tensor]] = []
    start = 0
    while start < n:
        stop = min(n, start + batch)
        try:
            parts.append(fn(slice(start, stop)))
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch = max(1, batch // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = stop
    if not parts:
        return {}, batch
    return {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}, batch


@functools.lru_cache(maxsize=None)
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def to_device(array: np.ndarray | Tensor, device: str) -> Tensor:
    """`array` as a tensor on `device`: on a CPU, the array's own memory (no copy). On a GPU, copied from
    pinned memory with `non_blocking` on a stream of its own: a copy on the default stream would wait for
    the kernels of the unit computing meanwhile, and one from pageable memory would stage through a
    driver buffer. Returns once the copy has finished, with the tensor marked as used by the default
    stream, where the compute reads it (so that its memory is not reused before that stream is done)."""
    tensor = torch.as_tensor(array)
    if not device.startswith("cuda"):
        return tensor.to(device)
    dev = torch.device(device)
    dev = torch.device("cuda", torch.cuda.current_device()) if dev.index is None else dev
    stream = _copy_stream(dev)
    with torch.cuda.stream(stream):
        out = tensor.pin_memory().to(dev, non_blocking=True)
    stream.synchronize()  # the pinned buffer is freed on return; the compute may use `out` at once
    out.record_stream(torch.cuda.default_stream(dev))
    return out
