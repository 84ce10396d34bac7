"""What the reliability protocols share: their common options, the images they explain, maps in batches.

A protocol's options are a frozen dataclass of `option` fields, like `StudySpec`: the flow's
signature (the Prefect form), the command line's flags and the validation derive from it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import metadata
from typing import Any, NamedTuple

import numpy as np
import torch

import storage
import xai_methods as xm
import zoo

from .study import load_dataset, model_of, option, resolve_device


@dataclass(frozen=True)
class ProtocolSpec:
    """The options every protocol has: which model, which images, where the results go."""

    dataset: str = option("shapes", "built-in name (shapes) or a local folder of class sub-folders of images")
    model: str = option("shapes-cnn", "built-in name (shapes-cnn) or a torchvision architecture name with weights")
    weights: str | None = option(None, "local state-dict file of the model (loaded with weights_only=True)")
    samples: int = option(32, "how many images of the dataset (its first ones) are explained")
    layer: str | None = option(None, "layer of layer methods (dotted module name); None: the last spatial layer")
    params: dict[str, dict[str, Any]] = option({}, "per-method parameters, e.g. {\"occlusion\": {\"window\": 8}}",
                                               flag="--param", type="param")
    seed: int = option(0, "seed of every random draw of the protocol (re-initialisations, permutations, training)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (a GPU when there is one)")
    figure: str | None = option(None, "figure to write (PNG); None: none (the command line defaults to the "
                                      "store path with .png; 'none' for no figure)")

    def method_params(self, method: str) -> dict[str, Any]:
        """The method's defaults merged with the user's, plus the layer for layer methods."""
        p = {**xm.spec(method).defaults, **self.params.get(method, {})}
        if xm.spec(method).needs_layer:
            p["layer"] = self.layer
        return p

    def identity(self, model: torch.nn.Module, dataset: zoo.Dataset, ids: list[str]) -> dict[str, Any]:
        """What a stored result depends on: refusing to mix results of another model, data or options."""
        skip = {"device", "figure", "workers", "store"}
        options = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return {**options, "model_fingerprint": zoo.model_fingerprint(model), "dataset_fingerprint": dataset.digest(ids),
                "package_version": metadata.version("saliency-atlas")}


class Inputs(NamedTuple):
    model: torch.nn.Module
    images: torch.Tensor  # (N, C, H, W) normalised, on the device
    target: torch.Tensor  # (N,) the model's top-1 class: what every map explains
    labels: np.ndarray
    ids: list[str]
    dataset: zoo.Dataset


def open_results(spec: ProtocolSpec, protocol: str, inputs: Inputs, coords: dict[str, Any],
                 parts: list[storage.Part]) -> storage.ResultStore:
    """The protocol's store at `spec.store`, created or reopened (refused when made for another identity)."""
    identity = spec.identity(inputs.model, inputs.dataset, inputs.ids)
    return storage.ResultStore.open_or_create(spec.store, protocol, identity, coords, parts)[0]


def check_methods(methods: list[str], spec: ProtocolSpec, model: torch.nn.Module, allowed: tuple[str, ...] = ()) -> None:
    """Known methods, their parameters and layer valid for `model`, before any work."""
    valid = allowed or tuple(xm.available())
    unknown = [m for m in methods if m not in valid]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or methods}; valid: {', '.join(valid)}")
    for m in spec.params:
        if m not in methods:
            raise ValueError(f"parameters given for {m!r}, which is not among the methods {methods}")
    for m in methods:
        xm.check(m, model, model.preprocess.size, spec.layer if xm.spec(m).needs_layer else None,
                 **spec.params.get(m, {}))


def load_inputs(spec: ProtocolSpec) -> Inputs:
    """The model (on the device) and the first `samples` images of the dataset, with the model's predictions."""
    if spec.samples < 1:
        raise ValueError(f"samples must be >= 1, got {spec.samples}")
    device = resolve_device(spec.device)
    model = model_of(spec, device)
    data = load_dataset(spec.dataset, spec.samples, model.preprocess.size, getattr(spec, "masks", None))
    if len(data) == 0:
        raise ValueError(f"the dataset {spec.dataset!r} has no readable samples")
    batch = data.load(0, len(data))
    images = model.preprocess(torch.from_numpy(batch.images)).to(device)
    with torch.no_grad():
        target = torch.cat([model(images[i:i + 64]).argmax(1) for i in range(0, len(images), 64)])
    return Inputs(model, images, target, batch.labels, batch.ids, data)


def maps_of(method: str, model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor, spec: ProtocolSpec,
            batch: int = 64, **override: Any) -> np.ndarray:
    """(N, H, W) float32 maps of `method` on `images`, `batch` images per call."""
    params = {**spec.method_params(method), **override}
    return np.concatenate([xm.attribute(method, model, images[i:i + batch], target=target[i:i + batch],
                                        **params).detach().cpu().float().numpy()
                           for i in range(0, len(images), batch)])


def nanmean(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean over `axis` ignoring NaN (undefined similarities), and how many were undefined."""
    undefined = np.isnan(values).sum(axis)
    with np.errstate(invalid="ignore"):
        total = np.where(np.isnan(values), 0.0, values).sum(axis)
        count = (~np.isnan(values)).sum(axis)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan), undefined
