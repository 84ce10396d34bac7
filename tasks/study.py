"""Prefect tasks of a study: plan the store, ingest a block, attribute a block, summarise.

`StudySpec` is the one definition of a study's options: the flow's signature (and so the
Prefect UI's form), the command line's flags and the validation all derive from its fields.
Tasks take and return small, JSON-friendly values (paths, names, receipts) so that they can
run in another process (a Dask worker) and show readably in the Prefect UI. Write tasks are
never cached by Prefect: the store's ``ingested``/``done`` flags are the only record of what
is finished.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage
import xai_methods as xm
import zoo


def option(default: Any, help: str, **cli: Any) -> Any:
    """A study option: its default, the one-line help the UI form and `--help` show, and
    argparse settings for the command line (``flag``, ``type``, ``choices``, ``group``...)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "cli": cli})
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass(frozen=True)
class StudySpec:
    """What a user asks of a study: the parameters of the ``study`` flow and of `saliency-atlas study`."""

    dataset: str = option("shapes", "built-in name (shapes) or a local folder of class sub-folders of images")
    model: str = option("shapes-cnn", "built-in name (shapes-cnn) or a torchvision architecture name with weights")
    methods: list[str] = option(["saliency", "gradcam", "occlusion"],
                                "attribution methods (see `saliency-atlas methods`)", type="names")
    samples: int | None = option(256, "how many samples of the dataset (None / 'all': every sample)",
                                 type="samples")
    store: str = option("runs/shapes.zarr", "Zarr store path or fsspec URL; an existing store of the same "
                                            "study is resumed, and grows by new samples or methods")
    weights: str | None = option(None, "local state-dict file of the model (loaded with weights_only=True; "
                                       "nothing is downloaded)")
    layer: str | None = option(None, "layer of layer methods (dotted module name); None: the last spatial layer")
    block_size: int = option(64, "samples per block: the unit of work, of resumption and of Zarr chunks")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (a GPU when there is one)")
    params: dict[str, dict[str, Any]] = option({}, "per-method parameters, e.g. {\"occlusion\": {\"window\": 8}}",
                                               flag="--param", type="param")
    contrast: str = option("runner-up", "the foil of contrastive methods ('why the prediction, not CLASS?'): "
                                        "runner-up (each sample's) or a class name")
    figure: str | None = option(None, "overview figure to write (PNG); None: no figure (the command line "
                                      "defaults to the store path with .png; 'none' for no figure)")
    figure_samples: list[int] = option([0, 1, 2, 3], "the samples shown in the figure", type="ints")
    workers: int | None = option(None, "run block tasks on a local Dask cluster of this many processes",
                                 group="where")
    dask_address: str | None = option(None, "run block tasks on an existing Dask cluster (tcp://HOST:PORT); its "
                                            "workers need this package installed", group="where")
    dtype: str = option("float32", "precision of a new store's maps", choices=("float32", "float16"),
                        group="layout")
    compression: str = option("zstd", "codec of a new store's maps, images and masks",
                              choices=("zstd", "blosc", "none"), group="layout")
    chunk_samples: int | None = option(None, "samples per chunk; below block_size each block becomes one "
                                             "shard of such chunks", group="layout")
    keep_images: bool = option(True, "store the model inputs (False: sample ids only; inputs are remade from "
                                     "the dataset)", flag="--no-images", group="layout",
                               switch="store sample ids only, not the model inputs (they are remade from the data)")

    def method_params(self, method: str) -> dict[str, Any]:
        """Defaults of the method merged with the user's, plus the layer for layer methods."""
        spec = xm.spec(method)
        p = {**spec.defaults, **self.params.get(method, {})}
        if spec.needs_layer:
            p["layer"] = self.layer
        return p

    def method_defaults(self, method: str) -> dict[str, Any]:
        """What a key missing from a stored parameter record means (the layer is never missing)."""
        return dict(xm.spec(method).defaults)


OPTIONS = {f.name: f for f in dataclasses.fields(StudySpec)}


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
def load_model(name: str, weights: str | None, device: str) -> torch.nn.Module:
    """The model, loaded once per process (tasks of one worker share it)."""
    return zoo.load_model(name, weights=weights).to(device)


def _listing(name: str) -> tuple | None:
    """What identifies a folder's content without decoding it: every file's path, size and mtime."""
    root = Path(name)
    if not root.is_dir():
        return None
    files = [p for p in root.rglob("*") if p.is_file()]
    return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=4)
def _load_dataset(name: str, samples: int | None, size: tuple[int, int], listing: tuple | None) -> zoo.Dataset:
    return zoo.load_dataset(name, split="test", size=size, limit=samples)


def load_dataset(name: str, samples: int | None, size: tuple[int, int]) -> zoo.Dataset:
    """The dataset, loaded once per process while a folder's files stay the same (a folder
    dataset decodes every file when it is made)."""
    return _load_dataset(name, samples, tuple(size), _listing(name))


@dataclass(frozen=True)
class StudyPlan:
    template: storage.Template  # the store as this run wants it (stored samples first, then new ones)
    dataset: zoo.Dataset
    model: torch.nn.Module
    exists: bool  # the store is already there


def check_options(spec: StudySpec) -> None:
    """The options that need neither the model nor the data."""
    unknown = [m for m in spec.methods if m not in xm.available()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(xm.available())}")
    if not spec.methods:
        raise ValueError("methods is empty; name at least one of: " + ", ".join(xm.available()))
    if spec.samples is not None and spec.samples < 1:
        raise ValueError(f"samples must be >= 1 or all, got {spec.samples}")
    if spec.block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {spec.block_size}")
    for m in spec.params:
        if m not in spec.methods:
            raise ValueError(f"parameters given for {m!r}, which is not among the methods {list(spec.methods)}")
    resolve_device(spec.device)


def plan(spec: StudySpec) -> StudyPlan:
    """Validate a study, build its store template and, for an existing store, check that
    it belongs to this study (refusing with StoreMismatch otherwise). Raises with a clear
    message on any bad argument, before anything is written."""
    check_options(spec)
    model = load_model(spec.model, spec.weights, "cpu")
    pre = model.preprocess
    contrast_class(spec, model)  # validates the contrast
    for m in spec.methods:
        xm.check(m, model, pre.size, spec.layer if xm.spec(m).needs_layer else None, **spec.params.get(m, {}))
    dataset = load_dataset(spec.dataset, spec.samples, pre.size)
    if len(dataset) == 0:
        raise ValueError(f"the dataset {spec.dataset!r} has no readable samples")
    with torch.no_grad():
        n_classes = model(torch.zeros(1, len(pre.mean), *pre.size)).shape[1]
    classes = model.classes or (dataset.classes if len(dataset.classes) == n_classes else None)
    classes = classes or [f"class_{i}" for i in range(n_classes)]
    exists = storage.exists(spec.store)
    stored = storage.Store(spec.store, mode="r").sample_ids() if exists else []
    known = set(stored)
    ids = stored + [i for i in dataset.ids(0, len(dataset)) if i not in known]  # growth appends
    template = storage.Template(
        sample_ids=ids, classes=list(classes), methods=list(spec.methods), image_shape=(len(pre.mean), *pre.size),
        block_size=spec.block_size, has_masks=dataset.has_masks,
        params={m: spec.method_params(m) for m in spec.methods},
        defaults={m: spec.method_defaults(m) for m in spec.methods},
        dtype=spec.dtype, compression=spec.compression, chunk_samples=spec.chunk_samples,
        keep_images=spec.keep_images,
        attrs={
            "model": spec.model, "model_weights": spec.weights or "built-in",
            "model_fingerprint": zoo.model_fingerprint(model),
            "dataset": spec.dataset, "dataset_fingerprint": dataset.digest(ids),
            "dataset_classes": list(dataset.classes), "image_mean": list(pre.mean), "image_std": list(pre.std),
            "package_version": metadata.version("saliency-atlas"), "contrast": spec.contrast,
        },
    )
    if exists:
        storage.Store(spec.store, mode="r").check_compatible(template, stored_digest=dataset.digest(stored))
    return StudyPlan(template, dataset, model, exists)


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
    raise ValueError(f"contrast {spec.contrast!r} is not a class of the model; valid: {valid}")


def contrasts_of(spec: StudySpec, model: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample, the class contrastive methods contrast the target with: the contrast class,
    or the runner-up (the best class other than the target) where the target is that class, or
    for "runner-up"."""
    runner_up = xm.contrasts(logits, None, target)
    fixed = contrast_class(spec, model)
    if fixed is None:
        return runner_up
    if not 0 <= fixed < logits.shape[1]:
        raise ValueError(f"contrast {fixed} is outside the model's classes 0..{logits.shape[1] - 1}")
    return torch.where(target == fixed, runner_up, torch.full_like(target, fixed))


def finished(p: StudyPlan, store: str) -> bool:
    """True when an existing store already holds every sample, method and block of the plan."""
    if not p.exists:
        return False
    s = storage.Store(store, mode="r")
    if len(s.sample_ids()) != len(p.template.sample_ids):
        return False
    stored = s.methods()
    return all(m in stored and not s.pending(m) for m in p.template.methods) and not s.pending()


@task(cache_policy=NO_CACHE)
def prepare_store(spec: StudySpec) -> dict[str, Any]:
    """Create the store, or check an existing one and add this run's new samples and methods;
    returns the blocks still to ingest and, per method, to attribute."""
    p = plan(spec)
    s = storage.Store(spec.store) if p.exists else storage.create(spec.store, p.template)
    added = s.grow(p.template) if p.exists else {"samples": 0, "methods": []}
    n = len(p.template.sample_ids)
    return {
        "store": spec.store,
        "created": not p.exists,
        "added": added,
        "samples": n,
        "blocks": storage.n_blocks(n, spec.block_size),
        "skipped_files": [f"{f} ({why})" for f, why in p.dataset.skipped],
        "todo_ingest": s.pending(),
        "todo": [(m, b) for m in spec.methods for b in s.pending(m)],
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


def model_inputs(spec: StudySpec, s: storage.Store, block: int, model: torch.nn.Module,
                 device: str) -> tuple[torch.Tensor, zoo.Batch]:
    """The normalised model inputs of one block, made from the dataset by sample id."""
    dataset = load_dataset(spec.dataset, spec.samples, model.preprocess.size)
    ids = s.read_samples(block, "sample_id")["sample_id"]
    batch = dataset.load_ids([str(i) for i in ids])
    return model.preprocess(torch.from_numpy(batch.images).to(device)), batch


@task(cache_policy=NO_CACHE)
def ingest_block(spec: StudySpec, block: int) -> dict[str, Any]:
    """Load one block of samples, normalise them, predict, and write inputs and predictions."""
    device = resolve_device(spec.device)
    model = load_model(spec.model, spec.weights, device)
    s = storage.Store(spec.store)
    images, batch = model_inputs(spec, s, block, model, device)
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
    s.write_samples(block, **arrays)
    return {"block": block, "samples": len(batch.ids)}


@task(cache_policy=NO_CACHE)
def attribute_block(spec: StudySpec, method: str, block: int) -> dict[str, Any]:
    """Compute one method's maps for one block and write them; returns a receipt."""
    s = storage.Store(spec.store)
    if block in s.pending():
        raise RuntimeError(f"block {block} of {spec.store} is not ingested yet: its inputs and targets come first")
    device = resolve_device(spec.device)
    model = load_model(spec.model, spec.weights, device)
    if s.has("image"):
        images = torch.from_numpy(s.read_samples(block, "image")["image"]).to(device)
    else:  # a store of references only: remake the exact inputs from the dataset
        images, _ = model_inputs(spec, s, block, model, device)
    stored = s.read_samples(block, "target", "contrast")
    params = spec.method_params(method)
    layer = params.pop("layer", None)
    kwargs: dict[str, Any] = {"layer": layer} if xm.spec(method).needs_layer else {}
    if xm.spec(method).needs_contrast:
        kwargs["contrast"] = torch.from_numpy(stored["contrast"]).to(device)
    t0 = time.perf_counter()
    maps = xm.attribute(method, model, images, target=torch.from_numpy(stored["target"]).to(device),
                        **kwargs, **params)
    seconds = time.perf_counter() - t0
    s.write_attribution(method, block, maps.cpu().numpy())
    return {"xai_method": method, "block": block, "samples": len(images), "seconds": round(seconds, 4)}


@task(cache_policy=NO_CACHE)
def accuracy(store: str) -> float | None:
    """The model's accuracy on the study's labelled samples (None when no sample has a label)."""
    s = storage.Store(store, mode="r")
    label, prediction = s.group["label"][:], s.group["prediction"][:]
    known = label >= 0
    return float((label[known] == prediction[known]).mean()) if known.any() else None
