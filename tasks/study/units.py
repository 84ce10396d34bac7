"""A study's units of work as Prefect tasks: ingest a block, attribute a block (methods that share a
pass together), score a block. Each unit is claimed, loaded, computed and written (`pipeline`), and
the store's flags are the only record of what is finished (write tasks are never cached by Prefect).
Tasks take and return small, JSON-friendly values (specs, names, receipts) so that they can run in
another process (a Dask worker) and show readably in the Prefect UI."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from typing import Any, Callable

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import storage
import xai_methods as xm
import zoo
from xai_methods import metrics as xmet

from ..loading import listed_once, load_dataset, log, model_of, resolve_device
from .memory import images_per_pass, in_passes, to_device
from .pipeline import Unit, caught_warnings, overlapped
from .planning import contrasts_of, label_map
from .spec import StudySpec
from .work import Receipt, TaskReceipts, Work


def model_inputs(spec: StudySpec, s: storage.Store, block: int, model: torch.nn.Module,
                 device: str) -> tuple[torch.Tensor, zoo.Batch]:
    """The normalised model inputs of one block, made from the dataset by sample id."""
    dataset = load_dataset(spec.dataset, spec.samples, model.preprocess.size, spec.masks)
    ids = s.read_samples(block, "sample_id")["sample_id"]
    batch = dataset.load_ids([str(i) for i in ids])
    return model.preprocess(to_device(batch.images, device)), batch


def claim_and_load(spec: StudySpec, work: Work, load: Callable[[storage.Store], Unit], wait: bool) -> Unit:
    """Hold `work`'s claims (in sorted order, the same for every run: no two runs wait on each other) and `load`
    its inputs from the store; the claims go with the unit (`tasks.study.pipeline`). When another run holds a
    claim: wait for it, or with `wait` False return deferred receipts at once."""
    with contextlib.ExitStack() as stack:  # released here unless the unit is handed on with them
        for c in sorted(work.claims):
            if not stack.enter_context(storage.claim(spec.store, c, wait=wait)):
                return Unit(result=work.receipts(deferred=True))
        t0 = time.perf_counter()
        unit = load(storage.Store(spec.store))
        unit.seconds = time.perf_counter() - t0
        if unit.compute is not None:
            unit.claims = stack.pop_all()
        return unit


def with_io(receipts: list[Receipt], unit: Unit, t0: float) -> list[Receipt]:
    """`receipts` with the unit's seconds of loading and of writing (since `t0`), split evenly over them."""
    share = len(receipts)
    return [dataclasses.replace(r, load_seconds=round(unit.seconds / share, 4),
                                write_seconds=round((time.perf_counter() - t0) / share, 4)) for r in receipts]


@task(cache_policy=NO_CACHE)
def ingest_block(spec: StudySpec, block: int, wait: bool = True) -> list[Receipt]:
    """Load one block of samples, normalise them, predict, and write inputs and predictions."""
    return run_units(spec, [Work.ingest(block)], wait)[0]


def prepare_ingest(spec: StudySpec, work: Work, wait: bool) -> Unit:
    block = work.block

    def load(s: storage.Store) -> Unit:
        if block not in s.pending():
            return Unit(result=work.receipts(skipped=True))
        device = resolve_device(spec.device)
        model = model_of(spec, device)
        images, batch = model_inputs(spec, s, block, model, device)
        unit = Unit(compute=lambda: _predict(spec, model, images, batch))

        def write(arrays: dict[str, Any]) -> list[Receipt]:
            t0, seconds = time.perf_counter(), arrays.pop("seconds")
            s.write_samples(block, **arrays)
            return with_io(work.receipts(samples=len(batch.ids), seconds=seconds), unit, t0)

        unit.write = write
        return unit

    return claim_and_load(spec, work, load, wait)


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
def attribute_block(spec: StudySpec, methods: list[str] | str, block: int, wait: bool = True) -> list[Receipt]:
    """Compute the maps of one block for `methods` (those of one unit share their passes) and write
    them; returns a receipt per method. Each method's block is claimed on its own, so runs that group
    the methods differently still never compute a block twice at once."""
    return run_units(spec, [Work.attribute(methods, block)], wait)[0]


def prepare_attribution(spec: StudySpec, work: Work, wait: bool, last: LastBlock) -> Unit:
    methods, block = list(work.methods), work.block

    def load(s: storage.Store) -> Unit:
        todo = [m for m in methods if block in s.pending(m)]
        done = [r for r in work.receipts(skipped=True) if r.xai_method not in todo]
        if not todo:
            return Unit(result=done)
        if block in s.pending():
            raise RuntimeError(f"block {block} of {spec.store} is not ingested yet: its inputs and targets come first")
        device = resolve_device(spec.device)
        model = model_of(spec, device)
        images, stored = last.inputs(spec, s, block, model, device)
        unit = Unit(compute=lambda: _attribute(spec, model, images, stored, todo, block, device, s.map_grid))

        def write(computed: tuple[dict[Any, torch.Tensor], float, int]) -> list[Receipt]:
            maps, seconds, batch = computed
            t0 = time.perf_counter()
            written = [Receipt("attribute", block, m, samples=len(maps[m]), seconds=round(seconds, 4), batch=batch,
                               failed=_write_maps(s, m, block, maps[m], stored["logits"], maps.get((m, "success"))))
                       for m in todo]
            return done + with_io(written, unit, t0)

        unit.write = write
        return unit

    return claim_and_load(spec, work, load, wait)


def _attribute(spec: StudySpec, model: torch.nn.Module, images: torch.Tensor, stored: dict[str, np.ndarray],
               methods: list[str], block: int, device: str,
               grid: tuple[int, int] | None = None) -> tuple[dict[Any, torch.Tensor], float, int]:
    """The maps of `methods` on one block, in passes of the study's batch (`tasks.study.memory`; one shared pass
    where they share it), with what the methods reported of their success under (method, "success"), each
    method's seconds (a shared pass's time split evenly) and the batch that ran. For a store on a map `grid`,
    methods that upsample a layer's grid return that grid (`storage.grid`: the stored map reads back as theirs)."""
    params = {m: spec.method_params(m) for m in methods}
    for m in methods:
        if not xm.spec(m).needs_layer:
            params[m].pop("layer", None)
        if grid is not None and params[m].get("upsample") is True:
            params[m]["upsample"] = False
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
                success: Any) -> int:
    """Record the block's failures, write its maps (on the store's map grid: `storage.grid`); how many failed."""
    if s.map_grid is not None:
        maps = storage.grid.to_grid(maps, s.input_size, s.map_grid)
    codes = xm.failures(maps, logits=torch.from_numpy(logits), success=success)
    s.write_attribution(method, block, xm.without_failures(maps, codes).cpu().numpy(), codes.cpu().numpy())
    failed = {xm.FAILURES[int(c)]: int((codes == c).sum()) for c in codes.unique().tolist() if c}
    if failed:
        log().warning("%s, block %d: %d failed map(s) recorded as failures, not as maps: %s", method, block,
                      sum(failed.values()), failed)
    return sum(failed.values())


@task(cache_policy=NO_CACHE)
def block_units(spec: StudySpec, units: list[Work], wait: bool = True) -> TaskReceipts:
    """Several units of one stage in one task, so that Prefect's cost per task is paid once for all of them;
    each unit is claimed, computed and flagged as alone, the next one loading and the last one writing while
    one computes (`tasks.study.pipeline.overlapped`)."""
    t0 = time.perf_counter()
    receipts = run_units(spec, units, wait)
    return TaskReceipts(receipts, time.perf_counter() - t0)


def run_units(spec: StudySpec, units: list[Work], wait: bool) -> list[list[Receipt]]:
    """The receipts of `units` (of one stage), overlapped. The device is resolved here, in the task's own
    thread: in a Dask worker plain "cuda" means that worker's GPU, which only the task's thread can tell."""
    last = LastBlock()  # the passes and metrics over one block that follow each other read it once
    prepare = {"ingest": prepare_ingest, "attribute": functools.partial(prepare_attribution, last=last),
               "evaluate": functools.partial(prepare_evaluation, last=last)}
    spec = dataclasses.replace(spec, device=resolve_device(spec.device))
    with listed_once():  # the loader and writer threads run in copies of this context
        return overlapped(list(units), lambda work: prepare[work.stage](spec, work, wait))


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
def evaluate_block(spec: StudySpec, method: str, metric: str, block: int, wait: bool = True) -> list[Receipt]:
    """Score one method's stored maps of one block with one metric; the model passes are the metric's own."""
    return run_units(spec, [Work.evaluate(method, metric, block)], wait)[0]


def prepare_evaluation(spec: StudySpec, work: Work, wait: bool, last: LastBlock) -> Unit:
    (method,), metric, block = work.methods, str(work.metric), work.block

    def load(s: storage.Store) -> Unit:
        if block not in s.pending_scores(method, metric):
            return Unit(result=work.receipts(skipped=True))
        if block in s.pending(method):
            raise RuntimeError(f"block {block} of {method} is not attributed yet: its maps come first")
        device = resolve_device(spec.device)
        model = model_of(spec, device)
        images, stored = last.inputs(spec, s, block, model, device)
        maps = to_device(s.read_maps(method, block), device).float()
        failed = s.read_failures(method, block) > 0
        unit = Unit(compute=lambda: _evaluate(spec, model, images, maps, stored, method, metric, device))

        def write(computed: tuple[xmet.Scores, float]) -> list[Receipt]:
            scores, seconds = computed
            t0 = time.perf_counter()
            value, status = scores.value.cpu().numpy(), scores.status.cpu().numpy()
            curve = None if scores.curve is None else scores.curve.cpu().numpy()
            value[failed], status[failed] = np.nan, xmet.FAILED_MAP  # excluded from every mean, never scored as 0
            if curve is not None:
                curve[failed] = np.nan
            s.write_scores(method, metric, block, value, status, curve)
            return with_io(work.receipts(samples=len(images), seconds=round(seconds, 4)), unit, t0)

        unit.write = write
        return unit

    return claim_and_load(spec, work, load, wait)


def _evaluate(spec: StudySpec, model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor,
              stored: dict[str, np.ndarray], method: str, metric: str, device: str) -> tuple[Any, float]:
    params = spec.metric_arguments(metric)
    if xmet.spec(metric).needs_method:  # the study's own method, as it made the stored maps
        params.update(spec.recomputed(method))
        if xm.spec(method).needs_contrast:
            params["contrast"] = torch.from_numpy(stored["contrast"]).to(device)
    mask = torch.from_numpy(stored["mask"]).to(device) if "mask" in stored else None
    t0 = time.perf_counter()
    scores = xmet.measure(metric, model, images, maps, torch.from_numpy(stored["target"]).to(device), mask, **params)
    return scores, time.perf_counter() - t0
