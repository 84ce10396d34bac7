"""A weights file read safely (``weights_only=True``, a plain state dict of tensors, clear errors) and fitted
to a model strictly, naming what does not fit: for the classifiers (`models`) and the generators
(`generative`) alike."""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a plain state dict from ``path`` with ``weights_only=True``; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist (or is not a file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unreadable files
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:  # e.g. torch.save(model): a pickled full model
            raise ValueError(
                f"weights file {str(path)!r} is not a plain state dict: it pickles {refused.group(1)}, "
                "which loading with weights_only=True refuses (it is probably a full model). Save the "
                "weights with torch.save(model.state_dict(), path) instead.") from None
        raise ValueError(f"weights file {str(path)!r} could not be read as a PyTorch state dict "
                         f"({type(e).__name__}); it must be written by torch.save(model.state_dict(), path)") from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:5] if isinstance(obj, Mapping) else []
        raise ValueError(
            f"weights file {str(path)!r} holds a {type(obj).__name__}"
            + (f" with non-tensor entries (keys {keys}...)" if keys else "")
            + ", not a state dict of tensors; save the weights with torch.save(model.state_dict(), path) "
            "(for a training checkpoint, save its model state dict alone).")
    # keep the per-module `_metadata` (versions) that some modules need to load, e.g. mnasnet
    metadata = getattr(obj, "_metadata", None)
    sd = OrderedDict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = OrderedDict((k.removeprefix("module."), v) for k, v in sd.items())
        if metadata is not None:
            metadata = {("" if k == "module" else k.removeprefix("module.")): v for k, v in metadata.items()}
    if metadata is not None:
        sd._metadata = metadata  # type: ignore[attr-defined]
    return sd


def _fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike, arch: str) -> None:
    """Load ``sd`` into ``model`` strictly, naming exactly what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def show(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" ... ({len(items)} in all)" if len(items) > 5 else "")
        parts = [f"{name}: {show(items)}" for name, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
                 if items]
        raise ValueError(f"weights file {str(path)!r} does not fit architecture {arch!r}; "
                         + "; ".join(parts) + ". Check that the model name is the architecture "
                         "the weights were saved from.")
    model.load_state_dict(sd, strict=True)
