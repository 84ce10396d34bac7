"""Built-in models and loaders for users' own models: torchvision, timm, their own factories (local weights only)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml
from torch import nn

from .base import Preprocess
from .shapes import PREPROCESS as SHAPES_PREPROCESS
from .shapes import CLASSES as SHAPES_CLASSES
from .state import _fit_state_dict, _read_state_dict

MODELS: tuple[str, ...] = ("shapes-cnn",)
SHAPES_WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes_cnn.pt"
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






def _num_classes(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> int:
    """Output size of the classifier: the last weight of >= 2 dims (Linear, or a 1x1 conv head)."""
    for key in reversed(list(sd)):
        if key.endswith("weight") and sd[key].ndim >= 2:
            return int(sd[key].shape[0])
    raise ValueError(f"weights file {str(path)!r}: no classifier weight (>= 2-D tensor) found in the state dict")


def torchvision_names() -> list[str]:
    """Classification architectures available from torchvision.models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_model(name: str, weights: str | os.PathLike | None = None, *, model_args: Mapping[str, Any] | None = None,
               input_size: Sequence[int] | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, classes: str | os.PathLike | Sequence[str] | None = None) -> nn.Module:
    """A model in eval mode on CPU with ``preprocess``, ``classes``, ``arch`` and ``card`` attributes
    (and ``generative``, the shapes VAE, for shapes-cnn).

    ``name`` is a built-in model (``shapes-cnn``, shipped weights unless ``weights`` is given), a
    torchvision architecture name, ``timm:NAME`` (when timm is installed) or ``package.module:function``,
    a factory called with ``model_args``; all but the built-in need a local state dict in ``weights``
    (loaded with ``weights_only=True``; nothing is ever downloaded). The preprocessing and class names
    come from the architecture's defaults, then a model card beside the weights (``W.json`` / ``W.yaml``
    for ``W.pt``: ``input_size``, ``mean``, ``std``, ``classes``, ``accuracy``), then the arguments here.
    """
    if model_args and ":" not in name:
        raise ValueError(f"model_args are for a factory (package.module:function) or timm:NAME; {name!r} takes none")
    model, preprocess, own_classes = _build(name, weights, dict(model_args or {}))
    model.eval()
    card = model_card(weights) if weights is not None else {}
    model.card = card
    model.preprocess = _preprocessing(preprocess, card, input_size, mean, std)
    _check_channels(model, name, card, mean, std)
    model.classes = _class_names(classes if classes is not None else card.get("classes"), own_classes, model)
    model.arch = name
    if name == "shapes-cnn":
        from .generative import SHAPES_VAE_WEIGHTS, load_generator

        try:  # the data's generative model, for cdeepex (not part of the state dict)
            model.generative = load_generator("shapes-vae")
        except (OSError, ValueError) as err:  # the classifier works without it; cdeepex then says what is missing
            warnings.warn(f"shapes-cnn loaded without its generative model ({SHAPES_VAE_WEIGHTS}): {err}", stacklevel=2)
    return model


def _build(name: str, weights: str | os.PathLike | None, model_args: dict[str, Any]) -> tuple[nn.Module, Preprocess,
                                                                                                  list[str] | None]:
    """The architecture with its weights loaded, its default preprocessing and class names."""
    if name == "shapes-cnn":
        path = SHAPES_WEIGHTS if weights is None else weights
        sd = _read_state_dict(path)
        model: nn.Module = ShapesCNN(num_classes=_num_classes(sd, path))
        _fit_state_dict(model, sd, path, name)
        # user weights for another label set have no names
        return model, SHAPES_PREPROCESS, list(SHAPES_CLASSES) if model.fc.out_features == len(SHAPES_CLASSES) else None
    known = name in torchvision_names() or name.startswith("timm:") or re.fullmatch(r"[\w.]+:\w+", name)
    if not known:
        raise ValueError(f"unknown model {name!r}: built-in models are {', '.join(MODELS)}; a torchvision architecture "
                         "(e.g. resnet18), timm:NAME or package.module:function (a factory) works with a local state "
                         "dict via --weights FILE.")
    if weights is None:
        raise ValueError(f"model {name!r} needs a local state dict: pass --weights FILE (weights=FILE); nothing is "
                         "downloaded.")
    sd = _read_state_dict(weights)
    if name.startswith("timm:"):
        model, preprocess = _timm(name[5:], _num_classes(sd, weights), model_args)
    elif name in torchvision_names():
        model, preprocess = _torchvision(name, sd, weights), IMAGENET_PREPROCESS
    else:
        model, preprocess = _factory(name, model_args), IMAGENET_PREPROCESS
    _fit_state_dict(model, sd, weights, name)
    return model, preprocess, None


def _torchvision(name: str, sd: Mapping[str, torch.Tensor], weights: str | os.PathLike) -> nn.Module:
    kwargs: dict[str, object] = {"weights": None, "num_classes": _num_classes(sd, weights)}
    if name in ("googlenet", "inception_v3"):  # auxiliary heads only if the file has them
        kwargs["aux_logits"] = any(k.startswith(("aux1.", "AuxLogits.")) for k in sd)
        kwargs["init_weights"] = False  # weights are loaded below anyway
    return torchvision.models.get_model(name, **kwargs)


def _timm(name: str, num_classes: int, model_args: dict[str, Any]) -> tuple[nn.Module, Preprocess]:
    try:
        import timm
    except ImportError:
        raise ValueError(f"model 'timm:{name}' needs timm: pip install timm (an optional extra)") from None
    if name not in timm.list_models():
        raise ValueError(f"timm has no architecture {name!r}; see timm.list_models(), e.g. resnet18, vit_tiny_patch16_224")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_args)  # never downloads
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))[1:]
    return model, Preprocess(size=size, mean=tuple(cfg.get("mean", IMAGENET_PREPROCESS.mean)),
                             std=tuple(cfg.get("std", IMAGENET_PREPROCESS.std)))


def _factory(name: str, model_args: dict[str, Any]) -> nn.Module:
    """`package.module:function` called with `model_args`: the user's own code, imported by name."""
    module_name, _, function = name.partition(":")
    try:
        build = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model {name!r}: cannot import {function!r} from {module_name!r} ({e}); the factory must be "
                         "importable (installed, or its folder on PYTHONPATH)") from None
    try:
        model = build(**model_args)
    except TypeError as e:
        raise ValueError(f"model {name!r}: the factory does not take the model arguments {model_args}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def model_card(weights: str | os.PathLike) -> dict[str, Any]:
    """The model card beside the weights (``W.json``, ``W.yaml`` or ``W.yml`` for ``W.pt``), or {}."""
    base = Path(weights).with_suffix("")
    for path in (base.with_suffix(".json"), base.with_suffix(".yaml"), base.with_suffix(".yml")):
        if path.is_file():
            text = path.read_text()
            try:
                card = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
            except (ValueError, yaml.YAMLError) as e:
                raise ValueError(f"model card {str(path)!r} could not be read: {e}") from None
            if not isinstance(card, dict) or set(card) - CARD_KEYS:
                raise ValueError(f"model card {str(path)!r} must be a mapping with keys among {sorted(CARD_KEYS)}, "
                                 f"got {sorted(card) if isinstance(card, dict) else type(card).__name__}")
            return {**card, "path": str(path)}
    return {}


CARD_KEYS = {"input_size", "mean", "std", "classes", "accuracy", "description"}


def _preprocessing(default: Preprocess, card: Mapping[str, Any], input_size: Sequence[int] | None,
                   mean: Sequence[float] | None, std: Sequence[float] | None) -> Preprocess:
    """The architecture's default preprocessing, overridden by the model card, then by the arguments."""
    size = input_size if input_size is not None else card.get("input_size", default.size)
    size = [size] if isinstance(size, int) else list(size)
    if len(size) == 1:
        size = size * 2
    m = list(mean if mean is not None else card.get("mean", default.mean))
    s = list(std if std is not None else card.get("std", default.std))
    if len(size) != 2 or not all(isinstance(v, int) and v >= 8 for v in size):
        raise ValueError(f"input_size must be H,W (or one side) of at least 8 pixels, got {size}")
    if len(m) != len(s) or not m or any(v <= 0 for v in s):
        raise ValueError(f"mean and std must have one value per channel and std > 0, got mean {m} and std {s}")
    return Preprocess(size=(size[0], size[1]), mean=tuple(float(v) for v in m), std=tuple(float(v) for v in s))


def _check_channels(model: nn.Module, name: str, card: Mapping[str, Any], mean: Sequence[float] | None,
                    std: Sequence[float] | None) -> None:
    """The preprocessing's channels against the model's first convolution, before any pass."""
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    channels = len(model.preprocess.mean)
    if first is None or first[1].in_channels == channels:
        return
    try:  # the first convolution registered may not be the first to run: ask the model itself
        with torch.no_grad():
            model(torch.zeros(1, channels, *model.preprocess.size))
        return
    except RuntimeError:
        pass
    given = ("--mean/--std" if mean is not None or std is not None else
             f"model card {card['path']!r}" if "mean" in card or "std" in card else "the architecture's default")
    raise ValueError(f"{given} gives mean {list(model.preprocess.mean)} and std {list(model.preprocess.std)}: "
                     f"{channels} channel(s), but model {name!r} takes {first[1].in_channels} input channels (its first "
                     f"convolution {first[0]!r}); give one mean and one std value per input channel")


def _class_names(given: str | os.PathLike | Sequence[str] | None, default: list[str] | None,
                 model: nn.Module) -> list[str] | None:
    """Class names from a file (one a line) or a list, checked against the model's outputs."""
    if given is None:
        return default
    if isinstance(given, (str, os.PathLike)):
        path = Path(given)
        if not path.is_file():
            raise ValueError(f"classes file {str(path)!r} does not exist; give a text file with one class name a line")
        given = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    names = [str(c) for c in given]
    outputs = _outputs(model)
    if outputs is not None and len(names) != outputs:
        raise ValueError(f"{len(names)} class names for a model with {outputs} outputs; give one name per output")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct, got {names}")
    return names


def _outputs(model: nn.Module) -> int | None:
    """The number of outputs of the model's last weight (its classifier), when there is one."""
    last = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2]
    return int(last[-1].shape[0]) if last else None


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the architecture name and every state-dict entry (name, shape, dtype, bytes)."""
    h = hashlib.sha256(str(getattr(model, "arch", type(model).__name__)).encode())
    sd = model.state_dict()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        h.update(f"\0{key}|{tuple(t.shape)}|{t.dtype}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
