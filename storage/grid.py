"""Maps stored on a grid smaller than the model input (`study --map-size`): a CAM map is 7x7 at ResNet's
last layer and 224x224 after its upsampling, a thousand times the bytes of what it holds.

A study with a map grid writes each map at the grid (`to_grid`): a method whose own map is a layer's grid
equal to it (the CAM methods, run with ``upsample=False``) as it is; any other averaged down to it (area
means). Readers get the maps at the input size again (`to_input`: bilinear, align_corners=False, the
very function the CAM methods upsample with), so a CAM map stored at its native grid reads back
bit-identical to the map the method returns (in float32 on one device), and every metric, figure and
protocol reads what it read before. Such a store's `attribution` has the dimensions (xai_method, sample,
map_y, map_x); `open_dataset` and `Store.read_maps` give (xai_method, sample, y, x) at the input size.
"""
from __future__ import annotations

from typing import Any

import numpy as np

GRID_DIMS = ("map_y", "map_x")


def parse(text: str) -> str | tuple[int, int]:
    """`--map-size`: "input", "native", or a grid "H,W" / "N" (positive integers)."""
    if text in ("input", "native"):
        return text
    try:
        sides = [int(x) for x in str(text).split(",")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise ValueError(f"map_size must be input, native, or a grid H,W (or one side N) of positive integers; "
                         f"got {text!r}")
    return (sides[0], sides[-1])


def to_grid(maps: Any, size: tuple[int, int], grid: tuple[int, int]) -> Any:
    """(B, h, w) maps (torch) at the input `size`, or at a method's own layer grid, as stored on `grid`."""
    import torch.nn.functional as F
    from xai_methods._core import upsample_to

    shape = tuple(maps.shape[-2:])
    if shape == tuple(grid):
        return maps
    if shape != tuple(size):  # a layer's grid other than the store's: the map the method would have returned
        maps = upsample_to(maps, size)
    return F.interpolate(maps[:, None].float(), size=tuple(grid), mode="area")[:, 0].to(maps.dtype)


def to_input(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Stored maps (..., h, w) read back at the input `size` (..., H, W), in their dtype; NaN maps stay NaN."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    import torch
    from xai_methods._core import upsample_to

    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    flat = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32).reshape(-1, h, w))
    out = upsample_to(flat, tuple(size)).numpy() if len(flat) else np.empty((0, *size), np.float32)
    return out.reshape(*lead, *size).astype(maps.dtype, copy=False)


def at_input(ds: Any) -> Any:
    """`ds` (an xarray Dataset of a study) with maps stored on a map grid read back at the input size, lazily,
    chunk by chunk."""
    att = ds["attribution"]
    if GRID_DIMS[0] not in att.dims:
        return ds
    size = tuple(ds.attrs["image_shape"][1:])
    data = att.data.map_blocks(to_input, size, chunks=(*att.data.chunks[:2], (size[0],), (size[1],)),
                               dtype=att.dtype)
    return ds.assign(attribution=((*att.dims[:2], "y", "x"), data, att.attrs))
