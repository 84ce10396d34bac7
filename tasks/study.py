"""Prefect tasks of a study: plan the store, ingest a block, attribute a block, render the figure.

Tasks take and return small, JSON-friendly values (paths, names, receipts) so that
they can run in another process (a Dask worker) and show readably in the Prefect UI.
Write tasks are never cached by Prefect: the store's ``ingested``/``done`` flags are
the only record of what is finished.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage
import xai_methods as xm
import zoo


def resolve_device(device: str) -> str:
    """cpu, cuda, cuda:N or auto. Plain "cuda" inside a local Dask worker means that
    worker's own GPU (workers are numbered 0..N-1 and there are at most as many as GPUs),
    so each GPU runs one task at a time."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but this machine has no CUDA GPU; use --device cpu")
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
def load_model(name: str, weights: str | None, device: str) -> torch.nn.Module:
    """The model, loaded once per process (tasks of one worker share it)."""
    return zoo.load_model(name, weights=weights).to(device)


def load_dataset(name: str, samples: int | None, size: tuple[int, int]) -> zoo.Dataset:
    return zoo.load_dataset(name, split="test", size=size, limit=samples)


@dataclass(frozen=True)
class StudySpec:
    """What a user asks of a study; the flow's parameters, validated."""

    dataset: str = "shapes"
    model: str = "shapes-cnn"
    methods: tuple[str, ...] = ("saliency", "gradcam", "occlusion")
    samples: int | None = 256
    store: str = "runs/shapes.zarr"
    weights: str | None = None
    layer: str | None = None
    block_size: int = 64
    device: str = "cpu"
    params: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # per-method parameters, hashable
    contrast: str = "runner-up"  # contrastive methods: "runner-up" or a class name of the model
    # Layout of a new store (an existing store keeps the layout it was made with):
    dtype: str = "float32"
    compression: str = "zstd"
    chunk_samples: int | None = None
    keep_images: bool = True

    def method_params(self, method: str) -> dict[str, Any]:
        """Defaults of the method merged with the user's, plus the layer for layer methods."""
        spec = xm.spec(method)
        p = dict(spec.defaults)
        p.update(dict(dict(self.params).get(method, ())))
        if spec.needs_layer:
            p["layer"] = self.layer
        return p


def freeze_params(params: dict[str, dict[str, Any]] | None) -> tuple:
    return tuple(sorted((m, tuple(sorted(p.items()))) for m, p in (params or {}).items()))


@dataclass(frozen=True)
class Plan:
    template: storage.Template  # the store as this run wants it (stored samples first, then new ones)
    dataset: zoo.Dataset
    model: torch.nn.Module
    exists: bool  # the store is already there


def plan(spec: StudySpec) -> Plan:
    """Validate a study, build its store template and, for an existing store, check that
    it belongs to this study (refusing with StoreMismatch otherwise). Raises with a clear
    message on any bad argument, before anything is written."""
    unknown = [m for m in spec.methods if m not in xm.available()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(xm.available())}")
    if not spec.methods:
        raise ValueError("--methods is empty; name at least one of: " + ", ".join(xm.available()))
    if spec.samples is not None and spec.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {spec.samples}")
    if spec.block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {spec.block_size}")
    for m, _ in spec.params:
        if m not in spec.methods:
            raise ValueError(f"parameters given for {m!r}, which is not among --methods {list(spec.methods)}")
    model = load_model(spec.model, spec.weights, "cpu")
    pre = model.preprocess
    contrast_class(spec, model)  # validates --contrast
    for m in spec.methods:
        params = dict(dict(spec.params).get(m, ()))
        xm.check(m, model, pre.size, spec.layer if xm.spec(m).needs_layer else None, **params)
    dataset = load_dataset(spec.dataset, spec.samples, pre.size)
    if len(dataset) == 0:
        raise ValueError(f"the dataset {spec.dataset!r} has no readable samples")
    with torch.no_grad():
        n_classes = model(torch.zeros(1, len(pre.mean), *pre.size)).shape[1]
    classes = model.classes or (dataset.classes if len(dataset.classes) == n_classes else None)
    classes = classes or [f"class_{i}" for i in range(n_classes)]
    exists = storage.exists(spec.store)
    stored = storage.sample_ids(spec.store) if exists else []
    known = set(stored)
    ids = stored + [i for i in dataset.ids(0, len(dataset)) if i not in known]  # growth appends
    template = storage.Template(
        sample_ids=ids,
        classes=list(classes),
        methods=list(spec.methods),
        image_shape=(len(pre.mean), *pre.size),
        block_size=spec.block_size,
        has_masks=dataset.has_masks,
        params={m: spec.method_params(m) for m in spec.methods},
        dtype=spec.dtype,
        compression=spec.compression,
        chunk_samples=spec.chunk_samples,
        keep_images=spec.keep_images,
        attrs={
            "model": spec.model,
            "model_weights": spec.weights or "built-in",
            "model_fingerprint": zoo.model_fingerprint(model),
            "dataset": spec.dataset,
            "dataset_fingerprint": dataset.digest(ids),
            "dataset_classes": list(dataset.classes),
            "image_mean": list(pre.mean),
            "image_std": list(pre.std),
            "package_version": metadata.version("saliency-atlas"),
            "contrast": spec.contrast,
        },
    )
    if exists:
        storage.check_compatible(spec.store, template, stored_digest=dataset.digest(stored))
    return Plan(template, dataset, model, exists)


def contrast_class(spec: StudySpec, model: torch.nn.Module) -> int | None:
    """The model's class index named by ``spec.contrast``; None for "runner-up"."""
    if spec.contrast == "runner-up":
        return None
    classes = model.classes or []
    if spec.contrast in classes:
        return classes.index(spec.contrast)
    if spec.contrast.isdigit() and not classes:  # an unnamed head: class indices
        return int(spec.contrast)
    valid = ", ".join(["runner-up", *classes]) if classes else "runner-up or a class index"
    raise ValueError(f"--contrast {spec.contrast!r} is not a class of the model; valid: {valid}")


def contrasts_of(spec: StudySpec, model: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample, the class contrastive methods contrast the target with: the --contrast class,
    or the runner-up (the best class other than the target) where the target is that class, or
    for "runner-up"."""
    runner_up = xm.contrasts(logits, None, target)
    fixed = contrast_class(spec, model)
    if fixed is None:
        return runner_up
    if not 0 <= fixed < logits.shape[1]:
        raise ValueError(f"--contrast {fixed} is outside the model's classes 0..{logits.shape[1] - 1}")
    return torch.where(target == fixed, runner_up, torch.full_like(target, fixed))


def finished(p: Plan, store: str) -> bool:
    """True when an existing store already holds every sample, method and block of the plan."""
    if not p.exists or len(storage.sample_ids(store)) != len(p.template.sample_ids):
        return False
    stored = storage.methods(store)
    return all(m in stored and not storage.pending(store, m) for m in p.template.methods) and not storage.pending(store)


@task(cache_policy=NO_CACHE)
def prepare_store(spec: StudySpec) -> dict[str, Any]:
    """Create the store, or check an existing one and add this run's new samples and methods."""
    p = plan(spec)
    added = storage.grow(spec.store, p.template) if p.exists else {"samples": 0, "methods": []}
    if not p.exists:
        storage.create(spec.store, p.template)
    n = len(p.template.sample_ids)
    return {
        "store": spec.store,
        "created": not p.exists,
        "added": added,
        "samples": n,
        "blocks": storage.n_blocks(n, spec.block_size),
        "skipped_files": [f"{f} ({why})" for f, why in p.dataset.skipped],
    }


def label_map(spec: StudySpec, model: torch.nn.Module) -> np.ndarray:
    """Dataset class index -> the model's class index, matched by name (-1: a class the
    model does not know). A folder's classes are its sorted sub-folder names, which need
    not be in the model's order."""
    dataset = load_dataset(spec.dataset, spec.samples, model.preprocess.size)
    classes = model.classes
    if classes is None:  # an unnamed head: the folder's own classes, when the counts agree
        return np.arange(len(dataset.classes), dtype=np.int64)
    return np.array([classes.index(c) if c in classes else -1 for c in dataset.classes], dtype=np.int64)


def model_inputs(spec: StudySpec, block: int, model: torch.nn.Module, device: str) -> tuple[torch.Tensor, zoo.Batch]:
    """The normalised model inputs of one block, made from the dataset by sample id."""
    dataset = load_dataset(spec.dataset, spec.samples, model.preprocess.size)
    ids = storage.read_samples(spec.store, block, "sample_id")["sample_id"]
    batch = dataset.load_ids([str(i) for i in ids])
    return model.preprocess(torch.from_numpy(batch.images).to(device)), batch


@task(cache_policy=NO_CACHE)
def ingest_block(spec: StudySpec, block: int) -> dict[str, Any]:
    """Load one block of samples, normalise them, predict, and write inputs and predictions."""
    device = resolve_device(spec.device)
    model = load_model(spec.model, spec.weights, device)
    images, batch = model_inputs(spec, block, model, device)
    with torch.inference_mode():
        logits = model(images).float()
    prediction = logits.argmax(1)
    arrays = dict(
        image=images.cpu().numpy().astype(np.float32),
        label=label_map(spec, model)[batch.labels],
        logits=logits.cpu().numpy(),
        prediction=prediction.cpu().numpy(),
        target=prediction.cpu().numpy(),  # the class explained: the model's own answer
        contrast=contrasts_of(spec, model, logits, prediction).cpu().numpy(),
    )
    if batch.masks is not None:
        arrays["mask"] = batch.masks
    storage.write_samples(spec.store, block, **arrays)
    return {"block": block, "samples": len(batch.ids)}


@task(cache_policy=NO_CACHE)
def attribute_block(spec: StudySpec, method: str, block: int) -> dict[str, Any]:
    """Compute one method's maps for one block and write them; returns a receipt."""
    if block in storage.pending(spec.store):
        raise RuntimeError(f"block {block} of {spec.store} is not ingested yet: its inputs and targets come first")
    device = resolve_device(spec.device)
    model = load_model(spec.model, spec.weights, device)
    if storage.has(spec.store, "image"):
        images = torch.from_numpy(storage.read_samples(spec.store, block, "image")["image"]).to(device)
    else:  # a store of references only: remake the exact inputs from the dataset
        images, _ = model_inputs(spec, block, model, device)
    stored = storage.read_samples(spec.store, block, "target", "contrast")
    target = torch.from_numpy(stored["target"]).to(device)
    params = spec.method_params(method)
    layer = params.pop("layer", None)
    kwargs: dict[str, Any] = {"layer": layer} if xm.spec(method).needs_layer else {}
    if xm.spec(method).needs_contrast:
        kwargs["contrast"] = torch.from_numpy(stored["contrast"]).to(device)
    t0 = time.perf_counter()
    maps = xm.attribute(method, model, images, target=target, **kwargs, **params)
    seconds = time.perf_counter() - t0
    storage.write_attribution(spec.store, method, block, maps.cpu().numpy())
    return {"xai_method": method, "block": block, "samples": len(images), "seconds": round(seconds, 4)}
