"""The device, the model and the dataset a run names, loaded once per process (the tasks of one
worker share them), and the checks that need them before any work."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

import zoo


def resolve_device(device: str) -> str:
    """cpu, cuda, cuda:N or auto. Plain "cuda" inside a local Dask worker means that
    worker's own GPU (workers are numbered 0..N-1 and there are at most as many as GPUs),
    so each GPU runs one task at a time."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but this machine has no CUDA GPU; use cpu")
    if device == "cuda":
        try:
            from distributed import get_worker

            name = get_worker().name
        except (ImportError, ValueError):  # not in a Dask worker
            return device
        if isinstance(name, int):
            return f"cuda:{name % torch.cuda.device_count()}"
    return device


@functools.lru_cache(maxsize=4)
def load_model(name: str, weights: str | None, device: str, options: str = "{}") -> torch.nn.Module:
    """The model, loaded once per process (tasks of one worker share it); `options`: the JSON of
    `model_options`. On a GPU its convolution weights are channels_last (NHWC), the layout of cuDNN's
    fastest kernels; the inputs stay as they are (a convolution follows its weight's layout)."""
    model = zoo.load_model(name, weights=weights, **json.loads(options)).to(device)
    return model.to(memory_format=torch.channels_last) if device.startswith("cuda") else model


def model_options(spec: Any) -> str:
    """A spec's model arguments, preprocessing and class names, as the JSON key `load_model` caches by."""
    keys = ("model_args", "input_size", "mean", "std", "classes")
    return json.dumps({k: getattr(spec, k) for k in keys if getattr(spec, k, None) not in (None, {})}, sort_keys=True)


def model_of(spec: Any, device: str) -> torch.nn.Module:
    """The model a spec names, with its preprocessing and classes, on `device`."""
    return load_model(spec.model, spec.weights, device, model_options(spec))


def _listing(name: str) -> tuple | None:
    """What identifies a folder's content without decoding it: every file's path, size and mtime."""
    root = Path(name)
    if not root.is_dir():
        return None
    files = [p for p in root.rglob("*") if p.is_file()]
    return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def stamp(path: str | None) -> int | None:
    """When the file at `path` (a folder: its zarr.json) last changed, None for no such local file: part of
    what a plan or an opened store is kept by, so that a store made again, or weights trained again, at the
    same path are read again."""
    try:
        return os.stat(os.path.join(path, "zarr.json") if path and os.path.isdir(path) else path).st_mtime_ns  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None


@functools.lru_cache(maxsize=4)
def _load_dataset(name: str, samples: int | None, size: tuple[int, int], masks: str | None,
                  listing: tuple | None) -> zoo.Dataset:
    return zoo.load_dataset(name, split="test", size=size, limit=samples, masks=masks)


# the datasets already listed in this scope (one task: `listed_once`); None outside one
_LISTED: contextvars.ContextVar[dict[tuple, zoo.Dataset] | None] = contextvars.ContextVar("listed", default=None)


def load_dataset(name: str, samples: int | None, size: tuple[int, int], masks: str | None = None) -> zoo.Dataset:
    """The dataset, loaded once per process while a folder's files (and its masks) stay the same (a
    folder dataset decodes every file when it is made). Inside `listed_once`, the folder is listed once."""
    listed, key = _LISTED.get(), (name, samples, tuple(size), masks)
    if listed is not None and key in listed:
        return listed[key]
    listing = (_listing(name), _listing(masks) if masks and Path(masks).is_dir() else
               (masks, Path(masks).stat().st_mtime_ns if masks and Path(masks).is_file() else None))
    dataset = _load_dataset(name, samples, tuple(size), masks, listing)
    if listed is not None:
        listed[key] = dataset
    return dataset


@contextlib.contextmanager
def listed_once():
    """A scope (one task's units) in which `load_dataset` lists each folder once: the units load samples
    by id, and listing every file of a large folder twice per unit made ingestion quadratic in its size."""
    token = _LISTED.set({})
    try:
        yield
    finally:
        _LISTED.reset(token)


def output_classes(spec: Any, model: torch.nn.Module) -> int:
    """The model's number of classes, from one probe; refused unless it returns (batch, classes) logits."""
    pre = model.preprocess
    with torch.no_grad():
        out = model(torch.zeros(2, len(pre.mean), *pre.size))
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or not out.is_floating_point():
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ValueError(f"model {spec.model!r} returns {got} for a batch of 2; a classifier must return a (batch, "
                         "classes) float tensor of logits (wrap a model that returns a dict or a map to do so)")
    return int(out.shape[1])


def check_writable(store: str) -> None:
    """Refuse a local store location this user cannot write, before any work."""
    if "://" in store:
        return
    here = Path(store).absolute()
    while not here.exists():
        here = here.parent
    if not os.access(here, os.W_OK | os.X_OK):
        raise ValueError(f"store {store!r}: {str(here)!r} is not writable by this user (uid {os.getuid()}); choose a "
                         "store path you can write to")


def log() -> Any:
    """Prefect's run logger inside a task or flow; this module's logger outside one (a test, a notebook)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
