"""What the reliability protocols share: their common options, the images they explain, the store opened
once per process, the stages and receipts of their flows, maps in batches.

A protocol's options are a frozen dataclass of `option` fields deriving from `RunSpec`, like `StudySpec`:
the flow's signature (the Prefect form), the command line's flags and the validation derive from it.
A protocol's module gives `open_store` (validate, create or reopen: an `Opened`), `stages` (its units of
work, in order) and `summary`; its row in `tasks.protocols.PROTOCOLS` names them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

import storage
import xai_methods as xm
import zoo
from xai_methods._core import forward_logits

from ..loading import _listing, load_dataset, model_of, resolve_device, stamp
from .specs import ProtocolSpec


class Inputs(NamedTuple):
    model: torch.nn.Module
    images: torch.Tensor  # (N, C, H, W) normalised, on the device
    target: torch.Tensor  # (N,) the model's top-1 class: what every map explains
    labels: np.ndarray
    ids: list[str]
    dataset: zoo.Dataset
    masks: torch.Tensor | None = None  # (N, H, W) bool ground truth, on the device; None: the dataset has none


@dataclass(frozen=True)
class Opened:
    """A protocol's store, opened (created or checked) once per process and run, with what its tasks reuse:
    the loaded `inputs`, and the protocol's own `extra` (invariance's shifted model, ROAR's train and test
    images)."""

    store: storage.ResultStore
    inputs: Inputs
    extra: Any = None


@dataclass(frozen=True)
class UnitReceipt:
    """What one unit of a protocol's task did: `line` for the run's log (at `level`), `values` for its
    caller; `deferred` when another run held the unit's claim (the flow comes back to it), `skipped` when
    another run had finished it."""

    unit: tuple[int, ...]
    line: str = ""
    level: str = "info"
    values: dict[str, Any] = field(default_factory=dict)
    deferred: bool = False
    skipped: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class Stage:
    """One step of a protocol's flow: `task(spec, unit, wait)` run for each of `units` (a stage starts when the
    one before it has finished), its progress bar and log named `name`."""

    name: str
    task: Any  # a Prefect task: (spec, unit, wait) -> UnitReceipt
    units: list[tuple[int, ...]]


_OPENED: dict[tuple, Opened] = {}
_OPENING = threading.Lock()


def opened(spec: ProtocolSpec, open_store: Callable[[Any], Opened]) -> Opened:
    """`open_store(spec)` once per process for as long as the spec, its store, its weights and its dataset's
    files stay the same: the flow opens it, and its tasks in this process (or each Dask worker, once) reuse
    the loaded inputs instead of loading the model and the images, predicting and hashing again per task."""
    key = (type(spec).__qualname__, repr(spec), stamp(spec.store), stamp(spec.weights), _listing(spec.dataset))
    with _OPENING:
        if key not in _OPENED:
            _OPENED.clear()  # one run's inputs at a time
            _OPENED[key] = open_store(spec)
            key = (*key[:2], stamp(spec.store), *key[3:])  # the store may have been created just now
            _OPENED[key] = _OPENED.popitem()[1]
        return _OPENED[key]


def open_results(spec: ProtocolSpec, protocol: str, inputs: Inputs, coords: dict[str, Any],
                 parts: list[storage.Part]) -> storage.ResultStore:
    """The protocol's store at `spec.store`, created or reopened (refused when made for another identity)."""
    identity = spec.identity(inputs.model, inputs.dataset, inputs.ids)
    return storage.ResultStore.open_or_create(spec.store, protocol, identity, coords, parts)[0]


def check_methods(methods: list[str], spec: ProtocolSpec, model: torch.nn.Module, allowed: tuple[str, ...] = ()) -> None:
    """Known methods, their parameters and layer valid for `model`, before any work."""
    valid = allowed or tuple(xm.available())
    unknown = [m for m in methods if m not in valid and not (":" in m and not allowed)]  # a peer's: checked below
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
    data = load_dataset(spec.dataset, spec.samples, model.preprocess.size, spec.masks)
    if len(data) == 0:
        raise ValueError(f"the dataset {spec.dataset!r} has no readable samples")
    batch = data.load(0, len(data))
    images = model.preprocess(torch.from_numpy(batch.images)).to(device)
    target = forward_logits(model, images, 64).argmax(1).clone()  # a normal tensor (inference ones cannot be saved)
    masks = None if batch.masks is None else torch.from_numpy(np.asarray(batch.masks, bool)).to(device)
    return Inputs(model, images, target, batch.labels, batch.ids, data, masks)


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
