"""A study's plan: its options validated against the model and the data, the store's template,
and the store created, checked or grown once per run (`prepare_store`)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage
import xai_methods as xm
import zoo
from xai_methods import metrics as xmet
from xai_methods.shared import shares_pass

from ..loading import _listing, check_writable, load_dataset, log, model_of, model_options, output_classes, stamp
from .spec import TASK_SUPPLIED, StudySpec, check_options
from .work import Pending, Work


@dataclass(frozen=True)
class StudyPlan:
    template: storage.Template  # the store as this run wants it (stored samples first, then new ones)
    dataset: zoo.Dataset
    model: torch.nn.Module
    exists: bool  # the store is already there
    key: tuple | None = None  # the store and files as they were before this plan read them (`_plan_key`)


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
    key = _plan_key(spec)  # before the store is read: a run that creates it meanwhile changes the key
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
        map_grid=storage.Store(spec.store, mode="r").map_grid if exists else map_grid(spec, model),
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
    return StudyPlan(template, dataset, model, exists, key)


def map_grid(spec: StudySpec, model: torch.nn.Module) -> tuple[int, int] | None:
    """The grid `spec.map_size` names for a new store of `model`'s maps (None: the input size)."""
    size, asked = tuple(model.preprocess.size), storage.grid.parse(spec.map_size)
    if asked == "input":
        return None
    grid = layer_grid(model, spec.layer, size) if asked == "native" else asked
    if any(g > n for g, n in zip(grid, size)):
        raise ValueError(f"map_size {spec.map_size} is larger than the model's input {size[0]},{size[1]}; give a grid "
                         "at most that, native, or input")
    return None if tuple(grid) == size else tuple(grid)  # type: ignore[return-value]


def layer_grid(model: torch.nn.Module, layer: str | None, size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the output of `layer` (None: the layer methods' default) for an input of `size`: one probe."""
    from xai_methods._core import default_layer, layer_output, resolve_layer

    probe = torch.zeros(1, len(model.preprocess.mean), *size)
    name = layer or default_layer(model, probe)
    with torch.no_grad(), layer_output(resolve_layer(model, name)) as captured:
        model(probe)
    shape = tuple(captured.outputs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"map_size native needs a layer whose output is a (C, h, w) grid; {name}'s is {shape[1:]}: "
                         "give a grid H,W instead")
    return shape[2], shape[3]


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


def is_complete(p: StudyPlan, store: str) -> bool:
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


_HANDED: dict[tuple, StudyPlan] = {}  # the plan the command line made to validate, for the flow it runs next


def _plan_key(spec: StudySpec) -> tuple | None:
    """What a handed-on plan is valid for: this spec, the store's metadata and coordinates as they are (a run
    that created or grew it since changed them), the weights and the data's files (None: an fsspec URL)."""
    if "://" in spec.store:
        return None
    stamps = [os.path.join(spec.store, *p) for p in (["zarr.json"], ["sample_id", "zarr.json"])]
    return (repr(spec), *(stamp(s) for s in stamps), stamp(spec.weights), _listing(spec.dataset),
            _listing(spec.masks) if spec.masks else None)


def hand_on(spec: StudySpec, p: StudyPlan | None) -> None:
    """Leave `p` for the study flow this process runs next on `spec`: planning (loading the model, listing and
    hashing the data, checking the store) is done once per run. None: forget what was left. The plan is kept by
    the state it read, taken before it read it: a store another run created or grew since is planned again."""
    _HANDED.clear()
    if p is not None and p.key is not None:
        _HANDED[p.key] = p


def planned(spec: StudySpec) -> StudyPlan:
    """The plan handed on for exactly this spec, store and files (`hand_on`), else a new one."""
    key = _plan_key(spec)
    handed = _HANDED.pop(key, None) if key is not None else None
    _HANDED.clear()
    return handed or plan(spec)


@task(cache_policy=NO_CACHE)
def prepare_store(spec: StudySpec) -> Pending:
    """Create the store, or check an existing one and add this run's new samples and methods; returns
    the work still to do in it."""
    with storage.claim(spec.store, "store"):  # one run creates or grows it; another then finds it made
        p = planned(spec)
        s = storage.Store(spec.store) if p.exists else storage.create(spec.store, p.template)
        added = s.grow(p.template) if p.exists else {"samples": 0, "methods": [], "metrics": []}
    n = len(p.template.sample_ids)
    if isinstance(p.dataset, zoo.FolderDataset):  # pixels kept by the check only for the samples to ingest
        ingested_next = [storage.block_slice(b, n, spec.block_size) for b in s.pending()]
        p.dataset.keep_decoded([i for part in ingested_next for i in p.template.sample_ids[part]])
    log().info("dataset classes -> model classes (%s): %s", "by name" if p.model.classes else "in sorted order",
               ", ".join(f"{c} -> {p.template.classes[k] if k >= 0 else '(unknown to the model)'}"
                         for c, k in zip(p.dataset.classes, label_map(spec, p.model))))
    scores = [Work.evaluate(m, k, b) for m in spec.studied for k in spec.metrics for b in s.pending_scores(m, k)]
    work = {"ingest": [Work.ingest(b) for b in s.pending()],
            "attribute": attribution_units(spec, {m: s.pending(m) for m in spec.studied}),
            "evaluate": sorted(scores, key=lambda w: w.block)}  # block by block: a task reads each block once
    return Pending(spec.store, not p.exists, added, n, storage.n_blocks(n, spec.block_size),
                   [f"{f} ({why})" for f, why in p.dataset.skipped], list(p.dataset.mask_problems), work)


def attribution_units(spec: StudySpec, pending: dict[str, list[int]]) -> list[Work]:
    """The attribution units: per block, the pending methods that share one forward and backward pass
    (`xai_methods.shared`) as one unit, and each other method alone; blocks in order."""
    units = []
    for block in sorted({b for blocks in pending.values() for b in blocks}):
        methods = [m for m in spec.studied if block in pending.get(m, [])]
        shared = [m for m in methods if shares_pass(m, spec.method_params(m))]
        units += [Work.attribute(shared, block)] if len(shared) > 1 else []
        units += [Work.attribute(m, block) for m in methods if len(shared) < 2 or m not in shared]
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
