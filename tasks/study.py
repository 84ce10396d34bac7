"""Prefect tasks of a study: plan the store, ingest a block, attribute a block, summarise.

`StudySpec` is the one definition of a study's options: the flow's signature (and so the
Prefect UI's form), the command line's flags and the validation all derive from its fields.
Tasks take and return small, JSON-friendly values (paths, names, receipts) so that they can
run in another process (a Dask worker) and show readably in the Prefect UI. Write tasks are
never cached by Prefect: the store's ``ingested``/``done`` flags are the only record of what
is finished.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.cache_policies import NO_CACHE

import storage
import xai_methods as xm
import zoo
from xai_methods import metrics as xmet
from xai_methods.shared import shares_pass

from .memory import images_per_pass, in_passes, to_device
from .pipeline import Unit, caught_warnings, overlapped


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
    model: str = option("shapes-cnn", "built-in name (shapes-cnn), a torchvision architecture (resnet18), timm:NAME "
                                      "or your factory package.module:function, the last three with --weights")
    methods: list[str] = option(["saliency", "gradcam", "occlusion"],
                                "attribution methods (see `saliency-atlas methods`)", type="names")
    masks: str | None = option(None, "ground-truth masks of a folder dataset: a folder MASKS/<class>/<image "
                                     "stem>.png (non-zero = object) or a CSV of boxes file,y0,x0,y1,x1 in the "
                                     "image's pixels; default: IMAGE.mask.png beside an image, when present")
    strict: bool = option(False, "refuse masks with problems (rows of a boxes file outside their image or naming "
                                 "files the dataset does not have) instead of warning", flag="--strict",
                          switch_on=True, switch="refuse masks with problems (boxes outside their image, rows naming "
                                                 "missing files) instead of warning")
    samples: int | None = option(256, "how many samples of the dataset (None / 'all': every sample)",
                                 type="samples")
    store: str = option("runs/shapes.zarr", "Zarr store path or fsspec URL; an existing store of the same "
                                            "study is resumed, and grows by new samples or methods")
    weights: str | None = option(None, "local state-dict file of the model (loaded with weights_only=True; "
                                       "nothing is downloaded); a model card W.json / W.yaml beside W.pt may give "
                                       "input_size, mean, std, classes and accuracy")
    model_args: dict[str, Any] = option({}, "arguments of a factory model (package.module:function) or of a "
                                            "timm:NAME architecture; on the command line NAME=VALUE, e.g. "
                                            "num_classes=10",
                                        flag="--model-arg", type="kv", group="model")
    input_size: list[int] | None = option(None, "the model's input size H,W (or one side); None: the "
                                                "architecture's or the model card's", type="ints", group="model")
    mean: list[float] | None = option(None, "per-channel mean the model was trained with, e.g. 0.5,0.5,0.5; "
                                            "None: the architecture's or the model card's", type="floats", group="model")
    std: list[float] | None = option(None, "per-channel std the model was trained with; None: the "
                                           "architecture's or the model card's", type="floats", group="model")
    classes: str | None = option(None, "text file of the model's class names, one a line, in output order "
                                       "(folder classes are matched to them by name)", group="model")
    layer: str | None = option(None, "layer of layer methods (dotted module name); None: the last spatial layer")
    block_size: int = option(64, "samples per block: the unit of work, of resumption and of Zarr chunks")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (a GPU when there is one)")
    batch: int | None = option(None, "images per model pass inside a block (predictions, maps); None / auto: the "
                                     "whole block on a CPU, on a GPU what its free memory holds (one probe on two "
                                     "images; a pass out of memory is redone in halves). Maps agree across batches "
                                     "to rounding", type="batch")
    params: dict[str, dict[str, Any]] = option({}, "per-method parameters, e.g. {\"occlusion\": {\"window\": 8}}",
                                               flag="--param", type="param")
    metrics: list[str] = option([], "evaluation metrics, each scored per image into the store's `score` "
                                    "(see `saliency-atlas metrics`)", type="names")
    metric_params: dict[str, dict[str, Any]] = option({}, "per-metric parameters, e.g. {\"deletion\": {\"steps\": 16}}",
                                                      flag="--metric-param", type="param")
    baselines: bool = option(True, "with metrics, also study the baseline maps (random_map, centre_map, edge_map) "
                                   "to read every score against chance", flag="--no-baselines",
                             switch="with metrics, do not add the baseline maps")
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

    @property
    def studied(self) -> list[str]:
        """The methods of the study: the user's, then (with metrics) the baseline maps not already named."""
        extra = [b for b in BASELINE_MAPS if b not in self.methods] if self.metrics and self.baselines else []
        return [*self.methods, *extra]

    def metric_arguments(self, metric: str) -> dict[str, Any]:
        """The metric's defaults merged with the user's: what the store records (the method that
        max_sensitivity recomputes is the study's own, supplied per method by the task)."""
        p = {**xmet.spec(metric).defaults, **self.metric_params.get(metric, {})}
        return {k: v for k, v in p.items() if k not in TASK_SUPPLIED}

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


def options_of(cls: type) -> dict[str, dataclasses.Field]:
    """The options of a spec class (`StudySpec`, a protocol's spec) by name, in definition order."""
    return {f.name: f for f in dataclasses.fields(cls)}


OPTIONS = options_of(StudySpec)
BASELINE_MAPS = tuple(xm.of_category("baseline"))  # random_map, centre_map, edge_map: chance levels
TASK_SUPPLIED = ("method", "method_params", "layer", "contrast")


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


@dataclass(frozen=True)
class StudyPlan:
    template: storage.Template  # the store as this run wants it (stored samples first, then new ones)
    dataset: zoo.Dataset
    model: torch.nn.Module
    exists: bool  # the store is already there


def spec_of_store(store: str, **changes: Any) -> StudySpec:
    """The options of the study that made `store` (model, data, methods and their parameters, layout),
    with `changes` (e.g. more metrics): what `saliency-atlas evaluate` runs, so only new work is done."""
    s = storage.Store(store, mode="r")  # no store, or an unfinished one: one line that says so
    a = s.attrs
    params = {m: dict(p) for m, p in a["params"].items()}
    layers = {p.pop("layer") for p in params.values() if "layer" in p}
    stored_metrics = json.loads(a.get("metric_params", "{}"))
    options = dict(
        dataset=a["dataset"], model=a["model"], weights=None if a.get("model_weights") == "built-in" else a["model_weights"],
        methods=s.methods(), samples=s.n_samples, store=store, block_size=s.block_size, params=params,
        layer=next(iter(layers - {None}), None), contrast=a.get("contrast", "runner-up"), metrics=s.metrics(),
        metric_params=stored_metrics, baselines=False, keep_images=bool(a.get("images_stored", True)),
        compression=a.get("compression", "zstd"), masks=a.get("masks"), **json.loads(a.get("model_options", "{}")),
    )
    merged = {**options, **changes}
    merged["metrics"] = list(dict.fromkeys([*options["metrics"], *changes.get("metrics", [])]))
    merged["metric_params"] = {**stored_metrics, **changes.get("metric_params", {})}
    return StudySpec(**merged)


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
    if spec.batch is not None and (isinstance(spec.batch, bool) or not isinstance(spec.batch, int) or spec.batch < 1):
        raise ValueError(f"batch must be a positive number of images per pass or None (auto), got {spec.batch!r}")
    for m in spec.params:
        if m not in spec.studied:
            raise ValueError(f"parameters given for {m!r}, which is not among the methods {list(spec.studied)}")
    unknown = [m for m in spec.metrics if m not in xmet.available()]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {', '.join(xmet.available())}")
    for m, given in spec.metric_params.items():
        if m not in spec.metrics:
            raise ValueError(f"parameters given for metric {m!r}, which is not among the metrics {list(spec.metrics)}")
        supplied = sorted(set(given) & set(TASK_SUPPLIED))
        if supplied:
            raise ValueError(f"metric_params: {m}'s {supplied} are the study's own (each method, its parameters); "
                             "give the other parameters only")
    resolve_device(spec.device)


def check_metrics(spec: StudySpec, model: torch.nn.Module, size: tuple[int, int], has_masks: bool) -> None:
    """Every metric's parameters, and the ground truth the metric needs, before any work."""
    for m in spec.metrics:
        if xmet.spec(m).needs_mask and not has_masks:
            raise ValueError(f"metric {m} needs ground-truth masks; the dataset {spec.dataset!r} has none "
                             "(the built-in shapes has them)")
        try:
            xmet.check(m, size, model, **spec.metric_params.get(m, {}))
        except (ValueError, TypeError) as err:
            raise type(err)(f"metric {m}: {err}") from None


def plan(spec: StudySpec) -> StudyPlan:
    """Validate a study, build its store template and, for an existing store, check that
    it belongs to this study (refusing with StoreMismatch otherwise). Raises with a clear
    message on any bad argument, before anything is written."""
    check_options(spec)
    storage.check_path(spec.store, "study")
    check_writable(spec.store)
    exists = storage.exists(spec.store)
    model = model_of(spec, "cpu")
    pre = model.preprocess
    n_classes = output_classes(spec, model)
    fixed = contrast_class(spec, model)
    if fixed is not None and not 0 <= fixed < n_classes:
        raise ValueError(f"contrast {spec.contrast!r} is outside the model's classes 0..{n_classes - 1}")
    for m in spec.studied:
        xm.check(m, model, pre.size, spec.layer if xm.spec(m).needs_layer else None, **spec.params.get(m, {}))
    dataset = load_dataset(spec.dataset, spec.samples, pre.size, spec.masks)
    if len(dataset) == 0:
        raise ValueError(f"the dataset {spec.dataset!r} has no readable samples")
    check_metrics(spec, model, pre.size, dataset.has_masks)
    if spec.strict and dataset.mask_problems:
        raise ValueError(dataset.mask_problems[0] + "; fix the rows, or run without --strict to warn and go on")
    classes = model.classes or (dataset.classes if len(dataset.classes) == n_classes else None)
    classes = classes or [f"class_{i}" for i in range(n_classes)]
    stored = storage.Store(spec.store, mode="r").sample_ids() if exists else []
    known = set(stored)
    digest = stored_digest(spec, dataset) if exists else None  # refuses another dataset first
    ids = stored + [i for i in dataset.ids(0, len(dataset)) if i not in known]  # growth appends
    template = storage.Template(
        sample_ids=ids, classes=list(classes), methods=spec.studied, image_shape=(len(pre.mean), *pre.size),
        block_size=spec.block_size, has_masks=dataset.has_masks,
        params={m: spec.method_params(m) for m in spec.studied},
        defaults={m: spec.method_defaults(m) for m in spec.studied},
        metrics=list(spec.metrics), metric_params={m: spec.metric_arguments(m) for m in spec.metrics},
        metric_defaults={m: {k: v for k, v in xmet.spec(m).defaults.items() if k not in TASK_SUPPLIED}
                         for m in spec.metrics},
        curve_points=max([xmet.spec(m).points(spec.metric_arguments(m)) for m in spec.metrics
                          if xmet.spec(m).curve] or [0]),
        status_codes=dict(xmet.STATUS),
        dtype=spec.dtype, compression=spec.compression, chunk_samples=spec.chunk_samples,
        keep_images=spec.keep_images,
        attrs={
            "model": spec.model, "model_weights": spec.weights or "built-in",
            "model_fingerprint": zoo.model_fingerprint(model),
            "dataset": spec.dataset, "dataset_fingerprint": dataset.digest(ids),
            "dataset_classes": list(dataset.classes), "image_mean": list(pre.mean), "image_std": list(pre.std),
            "model_card": model.card.get("path"), "model_card_accuracy": model.card.get("accuracy"),
            "model_options": model_options(spec), "masks": spec.masks,
            "package_version": metadata.version("saliency-atlas"), "contrast": spec.contrast,
            "failure_codes": json.dumps({str(k): v for k, v in xm.FAILURES.items()}),
        },
    )
    if exists:
        storage.Store(spec.store, mode="r").check_compatible(template, stored_digest=digest)
    return StudyPlan(template, dataset, model, exists)


def output_classes(spec: StudySpec, model: torch.nn.Module) -> int:
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


def stored_digest(spec: StudySpec, dataset: zoo.Dataset) -> str:
    """The digest of the store's samples (those its fingerprint covers) as `dataset` has them now. A run that
    names another dataset
    than the one the store was made from, and does not hold the same samples (a copied folder does),
    is refused as such, not as a corrupt file of the new one."""
    s = storage.Store(spec.store, mode="r")
    made_from = s.attrs.get("dataset")
    same = made_from == spec.dataset or os.path.realpath(str(made_from)) == os.path.realpath(spec.dataset)
    try:
        digest = dataset.digest(s.fingerprinted_ids())
    except ValueError:
        if same:
            raise
        digest = None
    if not same and digest != s.attrs.get("dataset_fingerprint"):
        raise storage.StoreMismatch(spec.store, [storage.Difference("dataset_name", made_from, spec.dataset)])
    return digest


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
    stored, scored = s.methods(), s.metrics()
    if any(m not in stored or s.pending(m) for m in p.template.methods) or s.pending():
        return False
    return all(k in scored and not s.pending_scores(m, k) for m in p.template.methods for k in p.template.metrics)


@task(cache_policy=NO_CACHE)
def prepare_store(spec: StudySpec) -> dict[str, Any]:
    """Create the store, or check an existing one and add this run's new samples and methods;
    returns the blocks still to ingest and, per method, to attribute."""
    with storage.claim(spec.store, "store"):  # one run creates or grows it; another then finds it made
        p = plan(spec)
        s = storage.Store(spec.store) if p.exists else storage.create(spec.store, p.template)
        added = s.grow(p.template) if p.exists else {"samples": 0, "methods": [], "metrics": []}
    n = len(p.template.sample_ids)
    if isinstance(p.dataset, zoo.FolderDataset):  # pixels kept by the check only for the samples to ingest
        ingested_next = [storage.block_slice(b, n, spec.block_size) for b in s.pending()]
        p.dataset.keep_decoded([i for part in ingested_next for i in p.template.sample_ids[part]])
    log().info("dataset classes -> model classes (%s): %s", "by name" if p.model.classes else "in sorted order",
               ", ".join(f"{c} -> {p.template.classes[k] if k >= 0 else '(unknown to the model)'}"
                         for c, k in zip(p.dataset.classes, label_map(spec, p.model))))
    return {
        "store": spec.store,
        "created": not p.exists,
        "added": added,
        "samples": n,
        "blocks": storage.n_blocks(n, spec.block_size),
        "skipped_files": [f"{f} ({why})" for f, why in p.dataset.skipped],
        "mask_problems": list(p.dataset.mask_problems),
        "todo_ingest": s.pending(),
        "todo": attribution_units(spec, {m: s.pending(m) for m in spec.studied}),
        "todo_scores": sorted([(m, k, b) for m in spec.studied for k in spec.metrics for b in s.pending_scores(m, k)],
                              key=lambda unit: unit[2]),  # block by block: a task reads each block once
    }


def attribution_units(spec: StudySpec, pending: dict[str, list[int]]) -> list[tuple[list[str], int]]:
    """The attribution tasks: per block, the pending methods that share one forward and backward pass
    (`xai_methods.shared`) as one unit, and each other method alone; blocks in order."""
    units = []
    for block in sorted({b for blocks in pending.values() for b in blocks}):
        methods = [m for m in spec.studied if block in pending.get(m, [])]
        shared = [m for m in methods if shares_pass(m, spec.method_params(m))]
        units += [(shared, block)] if len(shared) > 1 else []
        units += [([m], block) for m in methods if len(shared) < 2 or m not in shared]
    return units


def label_map(spec: StudySpec, model: torch.nn.Module) -> np.ndarray:
    """Dataset class index -> the model's class index, matched by name (-1: a class the
    model does not know). A folder's classes are its sorted sub-folder names, which need
    not be in the model's order."""
    dataset = load_dataset(spec.dataset, spec.samples, model.preprocess.size, spec.masks)
    classes = model.classes
    if classes is None:  # an unnamed head: the folder's own classes, when the counts agree
        return np.arange(len(dataset.classes), dtype=np.int64)
    return np.array([classes.index(c) if c in classes else -1 for c in dataset.classes], dtype=np.int64)


def model_inputs(spec: StudySpec, s: storage.Store, block: int, model: torch.nn.Module,
                 device: str) -> tuple[torch.Tensor, zoo.Batch]:
    """The normalised model inputs of one block, made from the dataset by sample id."""
    dataset = load_dataset(spec.dataset, spec.samples, model.preprocess.size, spec.masks)
    ids = s.read_samples(block, "sample_id")["sample_id"]
    batch = dataset.load_ids([str(i) for i in ids])
    return model.preprocess(to_device(batch.images, device)), batch


def prepared(spec: StudySpec, claims: list[str], deferred: Any, load: Callable[[storage.Store], Unit],
             wait: bool) -> Unit:
    """Hold the claims on `claims` (in sorted order, the same for every run: no two runs wait on each other)
    and `load` the unit's inputs from the store; the claims go with the unit (`tasks.pipeline`). When another
    run holds a claim: wait for it, or with `wait` False return `deferred` at once."""
    with contextlib.ExitStack() as stack:  # released here unless the unit is handed on with them
        for c in sorted(claims):
            if not stack.enter_context(storage.claim(spec.store, c, wait=wait)):
                return Unit(done=deferred)
        t0 = time.perf_counter()
        unit = load(storage.Store(spec.store))
        unit.seconds = time.perf_counter() - t0
        if unit.compute is not None:
            unit.claims = stack.pop_all()
        return unit


def skipped(receipt: dict[str, Any]) -> dict[str, Any]:
    """The receipt of a unit that another run finished while this one waited: not redone."""
    return {**receipt, "samples": 0, "seconds": 0.0, "skipped": "finished by another run"}


def timed(receipt: dict[str, Any], unit: Unit, t0: float, share: int = 1) -> dict[str, Any]:
    """A receipt with the unit's seconds of loading and of writing (since `t0`), split over `share` receipts."""
    return {**receipt, "load_seconds": round(unit.seconds / share, 4),
            "write_seconds": round((time.perf_counter() - t0) / share, 4)}


def io_seconds(results: list[Any]) -> float:
    """The seconds a task's units spent loading and writing, from their receipts (`timed`)."""
    receipts = [r for result in results for r in (result if isinstance(result, list) else [result])]
    return sum(r.get("load_seconds", 0.0) + r.get("write_seconds", 0.0) for r in receipts)


@task(cache_policy=NO_CACHE)
def ingest_block(spec: StudySpec, block: int, wait: bool = True) -> dict[str, Any]:
    """Load one block of samples, normalise them, predict, and write inputs and predictions."""
    return run_units(spec, "ingest", [(block,)], wait)[0]


def prepare_ingest(spec: StudySpec, block: int, wait: bool) -> Unit:
    def load(s: storage.Store) -> Unit:
        if block not in s.pending():
            return Unit(done=skipped({"block": block}))
        device = resolve_device(spec.device)
        model = model_of(spec, device)
        images, batch = model_inputs(spec, s, block, model, device)
        unit = Unit(compute=lambda: _predict(spec, model, images, batch))

        def write(arrays: dict[str, Any]) -> dict[str, Any]:
            t0, seconds = time.perf_counter(), arrays.pop("seconds")
            s.write_samples(block, **arrays)
            return timed({"block": block, "samples": len(batch.ids), "seconds": seconds}, unit, t0)

        unit.write = write
        return unit

    return prepared(spec, [f"ingest-{block}"], {"block": block, "deferred": True}, load, wait)


def _predict(spec: StudySpec, model: torch.nn.Module, images: torch.Tensor, batch: zoo.Batch) -> dict[str, Any]:
    t0 = time.perf_counter()
    with torch.inference_mode():  # forward only: a pass of the whole block unless `batch` says less
        logits = in_passes(lambda part: {"logits": model(images[part]).float()}, len(images),
                           spec.batch or len(images))[0]["logits"]
    prediction = logits.argmax(1)
    arrays = dict(
        image=images.cpu().numpy().astype(np.float32, copy=False),
        label=label_map(spec, model)[batch.labels],
        logits=logits.cpu().numpy(),
        prediction=prediction.cpu().numpy(),
        target=prediction.cpu().numpy(),  # the class explained: the model's own answer
        contrast=contrasts_of(spec, model, logits, prediction).cpu().numpy(),
    )
    if batch.masks is not None:
        arrays["mask"] = batch.masks
    return {**arrays, "seconds": time.perf_counter() - t0}


@task(cache_policy=NO_CACHE)
def attribute_block(spec: StudySpec, methods: list[str] | str, block: int, wait: bool = True) -> list[dict[str, Any]]:
    """Compute the maps of one block for `methods` (those of one unit share their passes) and write
    them; returns a receipt per method. Each method's block is claimed on its own, so runs that group
    the methods differently still never compute a block twice at once."""
    return run_units(spec, "attribute", [(methods, block)], wait)[0]


def prepare_attribution(spec: StudySpec, methods: list[str] | str, block: int, wait: bool,
                        last: LastBlock) -> Unit:
    methods = [methods] if isinstance(methods, str) else list(methods)

    def load(s: storage.Store) -> Unit:
        todo = [m for m in methods if block in s.pending(m)]
        done = [skipped({"xai_method": m, "block": block}) for m in methods if m not in todo]
        if not todo:
            return Unit(done=done)
        if block in s.pending():
            raise RuntimeError(f"block {block} of {spec.store} is not ingested yet: its inputs and targets come first")
        device = resolve_device(spec.device)
        model = model_of(spec, device)
        images, stored = last.inputs(spec, s, block, model, device)
        unit = Unit(compute=lambda: _attribute(spec, model, images, stored, todo, block, device))

        def write(computed: tuple[dict[Any, torch.Tensor], float, int]) -> list[dict[str, Any]]:
            maps, seconds, batch = computed
            t0 = time.perf_counter()
            written = [{**_write_maps(s, m, block, maps[m], stored["logits"], maps.get((m, "success")), seconds),
                        "batch": batch} for m in todo]
            return done + [timed(r, unit, t0, len(todo)) for r in written]

        unit.write = write
        return unit

    return prepared(spec, [f"maps-{m}-{block}" for m in methods],
                    [{"xai_method": m, "block": block, "deferred": True} for m in methods], load, wait)


def _attribute(spec: StudySpec, model: torch.nn.Module, images: torch.Tensor, stored: dict[str, np.ndarray],
               methods: list[str], block: int, device: str) -> tuple[dict[Any, torch.Tensor], float, int]:
    """The maps of `methods` on one block, in passes of the study's batch (`tasks.memory`; one shared pass
    where they share it), with what the methods reported of their success under (method, "success"), each
    method's seconds (a shared pass's time split evenly) and the batch that ran."""
    params = {m: spec.method_params(m) for m in methods}
    for m in methods:
        if not xm.spec(m).needs_layer:
            params[m].pop("layer", None)
    target, contrast = (torch.from_numpy(stored[k]).to(device) for k in ("target", "contrast"))

    def attribute(part: slice) -> dict[Any, torch.Tensor]:
        reports: dict[str, dict[str, Any]] = {m: {} for m in methods}
        for m in methods:
            if "report" in params[m]:  # a method that can say it did not succeed
                params[m]["report"] = reports[m].update
        maps: dict[Any, torch.Tensor] = xm.attribute_many(methods, model, images[part], target=target[part],
                                                          params=params, contrast=contrast[part])
        return {**maps, **{(m, "success"): r["success"] for m, r in reports.items() if "success" in r}}

    t0 = time.perf_counter()
    with caught_warnings() as caught:  # this thread's only: the loader and writer threads run meanwhile
        key = (id(model), json.dumps(params, sort_keys=True, default=repr), tuple(images.shape[1:]), device)
        batch = images_per_pass(spec.batch, device, len(images), lambda k: attribute(slice(0, k)), key)
        maps, batch = in_passes(attribute, len(images), batch)
    seconds = (time.perf_counter() - t0) / len(methods)
    for text in dict.fromkeys(str(w.message) for w in caught):
        log().warning("%s, block %d: %s", "+".join(methods), block, text)
    return maps, seconds, batch


def _write_maps(s: storage.Store, method: str, block: int, maps: torch.Tensor, logits: np.ndarray,
                success: Any, seconds: float) -> dict[str, Any]:
    """Record the block's failures, write its maps, and say what was done."""
    codes = xm.failures(maps, logits=torch.from_numpy(logits), success=success)
    s.write_attribution(method, block, xm.without_failures(maps, codes).cpu().numpy(), codes.cpu().numpy())
    failed = {xm.FAILURES[int(c)]: int((codes == c).sum()) for c in codes.unique().tolist() if c}
    if failed:
        log().warning("%s, block %d: %d failed map(s) recorded as failures, not as maps: %s", method, block,
                      sum(failed.values()), failed)
    return {"xai_method": method, "block": block, "samples": len(maps), "seconds": round(seconds, 4),
            "failed": sum(failed.values())}


ORCHESTRATION_SHARE = 0.05  # batching keeps what a task pays once below this share of its work
MAX_TASK_SECONDS = 30.0  # ... but a task holds at most this much work, so that progress shows


@task(cache_policy=NO_CACHE)
def block_units(spec: StudySpec, kind: str, units: list[tuple], wait: bool = True) -> dict[str, Any]:
    """Several units of one stage ("ingest", "attribute", "evaluate") in one task, so that Prefect's
    cost per task is paid once for all of them; each unit is claimed, computed and flagged as alone, the
    next one loading and the last one writing while one computes (`tasks.pipeline.overlapped`)."""
    t0 = time.perf_counter()
    results = run_units(spec, kind, units, wait)
    return {"results": results, "seconds": time.perf_counter() - t0}


def run_units(spec: StudySpec, kind: str, units: list[tuple], wait: bool) -> list[Any]:
    """The receipts of `units` of one stage, overlapped. The device is resolved here, in the task's own
    thread: in a Dask worker plain "cuda" means that worker's GPU, which only the task's thread can tell."""
    last = LastBlock()  # the passes and metrics over one block that follow each other read it once
    prepare = {"ingest": prepare_ingest, "attribute": functools.partial(prepare_attribution, last=last),
               "evaluate": functools.partial(prepare_evaluation, last=last)}[kind]
    spec = dataclasses.replace(spec, device=resolve_device(spec.device))
    with listed_once():  # the loader and writer threads run in copies of this context
        return overlapped(list(units), lambda unit: prepare(spec, *unit, wait))


def units_per_task(overhead: float, per_unit: float, remaining: int, workers: int) -> int:
    """How many units one task should hold: enough that `overhead`, what a task pays once (Prefect's cost
    per task, and the loading of its first unit and the writing of its last, which no compute overlaps:
    `tasks.pipeline`), stays under `ORCHESTRATION_SHARE` of the work, `per_unit` seconds of compute a unit;
    at most `MAX_TASK_SECONDS` of work, and (with several workers) at most a share that leaves each worker
    two tasks."""
    if remaining < 1:
        return 1
    wanted = math.ceil(max(overhead, 0.0) / (ORCHESTRATION_SHARE * max(per_unit, 1e-6)))
    cap = max(1, int(MAX_TASK_SECONDS / max(per_unit, 1e-6)))
    if workers > 1:
        cap = min(cap, max(1, math.ceil(remaining / (2 * workers))))
    return max(1, min(wanted, cap, remaining))


def log() -> Any:
    """Prefect's run logger inside a task or flow; this module's logger outside one (a test, a notebook)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def stored_inputs(spec: StudySpec, s: storage.Store, block: int, model: torch.nn.Module, device: str) -> torch.Tensor:
    """The exact model inputs of a block: from the store, or remade from the dataset for a store of references."""
    if s.has("image"):
        return to_device(s.read_samples(block, "image")["image"], device)
    return model_inputs(spec, s, block, model, device)[0]


class LastBlock:
    """The stored inputs of the block a task's units read last: the model inputs and the sample variables
    (target, contrast, logits, mask). The next unit on the same block (another pass over it, another metric)
    gets copies instead of reading the store again. One per task, in its loading thread: a block's inputs
    do not change once it is ingested."""

    def __init__(self) -> None:
        self.block: int | None = None
        self.read: tuple[torch.Tensor, dict[str, np.ndarray]] | None = None

    def inputs(self, spec: StudySpec, s: storage.Store, block: int, model: torch.nn.Module,
               device: str) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        if self.block != block or self.read is None:
            names = ["target", "contrast", "logits", *(["mask"] if s.has("mask") else [])]
            self.block, self.read = block, (stored_inputs(spec, s, block, model, device), s.read_samples(block, *names))
        images, samples = self.read
        return images.clone(), {k: v.copy() for k, v in samples.items()}  # a unit may change its own copy


@task(cache_policy=NO_CACHE)
def evaluate_block(spec: StudySpec, method: str, metric: str, block: int, wait: bool = True) -> dict[str, Any]:
    """Score one method's stored maps of one block with one metric; the model passes are the metric's own."""
    return run_units(spec, "evaluate", [(method, metric, block)], wait)[0]


def prepare_evaluation(spec: StudySpec, method: str, metric: str, block: int, wait: bool,
                       last: LastBlock) -> Unit:
    receipt = {"xai_method": method, "metric": metric, "block": block}

    def load(s: storage.Store) -> Unit:
        if block not in s.pending_scores(method, metric):
            return Unit(done=skipped(receipt))
        if block in s.pending(method):
            raise RuntimeError(f"block {block} of {method} is not attributed yet: its maps come first")
        device = resolve_device(spec.device)
        model = model_of(spec, device)
        images, stored = last.inputs(spec, s, block, model, device)
        maps = to_device(s.read_maps(method, block), device).float()
        failed = s.read_failures(method, block) > 0
        unit = Unit(compute=lambda: _evaluate(spec, model, images, maps, stored, method, metric, device))

        def write(computed: tuple[xmet.Scores, float]) -> dict[str, Any]:
            scores, seconds = computed
            t0 = time.perf_counter()
            value, status = scores.value.cpu().numpy(), scores.status.cpu().numpy()
            curve = None if scores.curve is None else scores.curve.cpu().numpy()
            value[failed], status[failed] = np.nan, xmet.FAILED_MAP  # excluded from every mean, never scored as 0
            if curve is not None:
                curve[failed] = np.nan
            s.write_scores(method, metric, block, value, status, curve)
            return timed({**receipt, "samples": len(images), "seconds": round(seconds, 4)}, unit, t0)

        unit.write = write
        return unit

    return prepared(spec, [f"scores-{method}-{metric}-{block}"], {**receipt, "deferred": True}, load, wait)


def _evaluate(spec: StudySpec, model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor,
              stored: dict[str, np.ndarray], method: str, metric: str, device: str) -> tuple[Any, float]:
    params = spec.metric_arguments(metric)
    if xmet.spec(metric).needs_method:  # the study's own method, as it made the stored maps
        own = spec.method_params(method)
        params.update(method=method, layer=own.pop("layer", None), method_params=own)
        if xm.spec(method).needs_contrast:
            params["contrast"] = torch.from_numpy(stored["contrast"]).to(device)
    mask = torch.from_numpy(stored["mask"]).to(device) if "mask" in stored else None
    t0 = time.perf_counter()
    scores = xmet.measure(metric, model, images, maps, torch.from_numpy(stored["target"]).to(device), mask, **params)
    return scores, time.perf_counter() - t0


def accuracy_warning(store: str) -> str | None:
    """One line when the model's accuracy on the labelled samples is near chance, or far below what its
    model card records: the usual cause is preprocessing other than the model was trained with."""
    s = storage.Store(store, mode="r")
    label, prediction = s.group["label"][:], s.group["prediction"][:]
    known = (label >= 0) & (prediction >= 0)
    if known.sum() < 10:
        return None
    a, n = s.attrs, s.group["class"].shape[0]
    acc, chance, recorded = float((label[known] == prediction[known]).mean()), 1 / n, a.get("model_card_accuracy")
    if recorded is not None and acc < recorded - 0.2:
        why = f"far below the {recorded:.1%} its model card records"
    elif acc <= max(1.5 * chance, chance + 0.1):
        why = f"near chance ({chance:.1%} for {n} classes)"
    else:
        return None
    h, w = a["image_shape"][1:]
    return (f"model accuracy on the {int(known.sum())} labelled samples is {acc:.1%}, {why}: the images were given "
            f"to the model at {h}x{w} with mean {a.get('image_mean')} and std {a.get('image_std')}; if it was trained "
            "otherwise, pass --input-size, --mean and --std (or put a model card beside the weights), and --classes "
            "if its classes are not the folder's in sorted order")


@task(cache_policy=NO_CACHE)
def accuracy(store: str) -> float | None:
    """The model's accuracy on the study's labelled samples (None when no sample has a label)."""
    s = storage.Store(store, mode="r")
    label, prediction = s.group["label"][:], s.group["prediction"][:]
    known = label >= 0
    return float((label[known] == prediction[known]).mean()) if known.any() else None
