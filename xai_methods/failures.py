"""Why a map is not an answer: the failure codes a pipeline records beside each map.

A method that finds nothing still returns a tensor: zeros from an optimiser that never left
its start, NaN from a model that overflowed. Stored as if it were the answer, such a map is
scored as if the method had said "nothing matters here". `failures` names these cases per
image, from what any caller has (the maps, the model's output, a method's own ``success``
report), so the map can be recorded as a failure and left out of every mean.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Code per (method, image); 0 is a usable map. Stored as int8 (the study's `failure`, -1: not recorded).
OK, NOT_FINITE_MAP, CONSTANT_MAP, NO_SUCCESS, NOT_FINITE_OUTPUT = range(5)
FAILURES = {
    OK: "ok",
    NOT_FINITE_MAP: "the map holds NaN or Inf",
    CONSTANT_MAP: "the map is constant: the method found nothing (e.g. an optimiser that never left its start)",
    NO_SUCCESS: "the method reported that it did not succeed (e.g. no pertinent perturbation was found)",
    NOT_FINITE_OUTPUT: "the model's output for this image is not finite",
}


def failures(maps: Tensor, logits: Tensor | None = None, success: Tensor | None = None) -> Tensor:
    """Per image (B,) int8, the first failure that applies (the model's output, the method's own
    report, a non-finite map, a constant map), or OK. `maps`: (B, ...) of any trailing shape."""
    flat = maps.detach().flatten(1)
    codes = torch.full((maps.shape[0],), OK, dtype=torch.int8, device=maps.device)
    finite = torch.isfinite(flat).all(1)
    constant = finite & (flat.amax(1) == flat.amin(1))
    codes[constant] = CONSTANT_MAP
    codes[~finite] = NOT_FINITE_MAP
    if success is not None:
        codes[~success.to(device=maps.device, dtype=torch.bool).reshape(-1)] = NO_SUCCESS
    if logits is not None:
        codes[~torch.isfinite(logits.to(maps.device)).flatten(1).all(1)] = NOT_FINITE_OUTPUT
    return codes


def without_failures(maps: Tensor, codes: Tensor) -> Tensor:
    """The maps with every failed image's map NaN (a failure is never stored as a number)."""
    failed = (codes != OK).to(maps.device).view(-1, *([1] * (maps.dim() - 1)))
    return maps.masked_fill(failed, float("nan"))
