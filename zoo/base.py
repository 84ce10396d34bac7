"""Types shared by the zoo's datasets and models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocess:
    """What a model expects: input size and per-channel normalisation of [0, 1] images."""

    size: tuple[int, int]        # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != len(self.mean):
            raise ValueError(f"images must be (N, {len(self.mean)}, H, W), got {tuple(images.shape)}")
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return mean, std

    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float in [0, 1] -> normalised, resized bilinearly to ``size`` if needed."""
        mean, std = self._stats(images01)
        if tuple(images01.shape[-2:]) != tuple(self.size):
            images01 = F.interpolate(images01, size=self.size, mode="bilinear",
                                     align_corners=False, antialias=True)
        return (images01 - mean) / std

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised -> [0, 1] (clamped); does not undo a resize."""
        mean, std = self._stats(images)
        return (images * std + mean).clamp(0, 1)


@dataclass
class Batch:
    """Samples [start, stop) of a dataset."""

    images: np.ndarray         # float32 (N, 3, H, W) in [0, 1]
    labels: np.ndarray         # int64 (N,), -1 where unknown
    masks: np.ndarray | None   # bool (N, H, W), or None when the dataset has no masks
    ids: list[str]             # stable sample ids


@runtime_checkable
class Dataset(Protocol):
    """What ShapesDataset and FolderDataset both provide."""

    name: str
    classes: list[str]
    has_masks: bool
    skipped: list[tuple[str, str]]   # (relative path, reason) of unreadable files
    mask_problems: list[str]         # what is wrong with the given masks (one line per kind), or []

    def __len__(self) -> int: ...
    def ids(self, start: int, stop: int) -> list[str]: ...
    def load(self, start: int, stop: int) -> Batch: ...
    def load_ids(self, ids: list[str]) -> Batch: ...
    def fingerprint(self) -> str: ...
    def digest(self, ids: list[str]) -> str: ...
