"""Built-in models and loaders for users' own torchvision models (local weights only)."""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from .base import Preprocess
from .shapes import CLASSES as SHAPES_CLASSES

MODELS: tuple[str, ...] = ("shapes-cnn",)
SHAPES_WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes_cnn.pt"
SHAPES_PREPROCESS = Preprocess(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
IMAGENET_PREPROCESS = Preprocess(size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class ShapesCNN(nn.Module):
    """Small CNN for ``shapes``: 3 conv stages, global average pooling, linear head (CAM applies).

    For a 64x64 input the stages output 64x64, 32x32 and 16x16 maps.
    """

    def __init__(self, num_classes: int = len(SHAPES_CLASSES), widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        c1, c2, c3 = widths
        self.stage1 = nn.Sequential(*_conv_bn_relu(3, c1))
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(c1, c2), *_conv_bn_relu(c2, c2))
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(c2, c3), *_conv_bn_relu(c3, c3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


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


def _num_classes(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> int:
    """Output size of the classifier: the last weight of >= 2 dims (Linear, or a 1x1 conv head)."""
    for key in reversed(list(sd)):
        if key.endswith("weight") and sd[key].ndim >= 2:
            return int(sd[key].shape[0])
    raise ValueError(f"weights file {str(path)!r}: no classifier weight (>= 2-D tensor) found in the state dict")


def torchvision_names() -> list[str]:
    """Classification architectures available from torchvision.models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_model(name: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """A model in eval mode on CPU with ``preprocess``, ``classes`` and ``arch`` attributes
    (and ``generative``, the shapes VAE, for shapes-cnn).

    ``name`` is a built-in model (``shapes-cnn``, shipped weights unless ``weights`` is
    given) or a torchvision architecture name, which needs a local state dict in
    ``weights`` (nothing is ever downloaded).
    """
    if name == "shapes-cnn":
        sd = _read_state_dict(SHAPES_WEIGHTS if weights is None else weights)
        model: nn.Module = ShapesCNN(num_classes=_num_classes(sd, weights or SHAPES_WEIGHTS))
        _fit_state_dict(model, sd, weights or SHAPES_WEIGHTS, name)
        preprocess, classes = SHAPES_PREPROCESS, list(SHAPES_CLASSES)
        if model.fc.out_features != len(SHAPES_CLASSES):
            classes = None  # user weights for a different label set
    elif name in torchvision_names():
        if weights is None:
            raise ValueError(f"model {name!r} needs a local state dict: pass --weights FILE "
                             "(weights=FILE); nothing is downloaded.")
        sd = _read_state_dict(weights)
        kwargs: dict[str, object] = {"weights": None, "num_classes": _num_classes(sd, weights)}
        if name in ("googlenet", "inception_v3"):  # auxiliary heads only if the file has them
            kwargs["aux_logits"] = any(k.startswith(("aux1.", "AuxLogits.")) for k in sd)
            kwargs["init_weights"] = False  # weights are loaded below anyway
        model = torchvision.models.get_model(name, **kwargs)
        _fit_state_dict(model, sd, weights, name)
        preprocess, classes = IMAGENET_PREPROCESS, None
    else:
        raise ValueError(f"unknown model {name!r}: built-in models are {', '.join(MODELS)}; any torchvision "
                         "architecture name (e.g. resnet18) also works with a local state dict via --weights FILE.")
    model.eval()
    model.preprocess = preprocess
    model.classes = classes
    model.arch = name
    if name == "shapes-cnn":
        from .generative import SHAPES_VAE_WEIGHTS, load_generator

        try:  # the data's generative model, for cdeepex (not part of the state dict)
            model.generative = load_generator("shapes-vae")
        except (OSError, ValueError) as err:  # the classifier works without it; cdeepex then says what is missing
            warnings.warn(f"shapes-cnn loaded without its generative model ({SHAPES_VAE_WEIGHTS}): {err}", stacklevel=2)
    return model


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the architecture name and every state-dict entry (name, shape, dtype, bytes)."""
    h = hashlib.sha256(str(getattr(model, "arch", type(model).__name__)).encode())
    sd = model.state_dict()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        h.update(f"\0{key}|{tuple(t.shape)}|{t.dtype}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
