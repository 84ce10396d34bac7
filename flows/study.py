"""The ``study`` flow: attribution maps of a model over a dataset, into a resumable store.

The flow only composes tasks. Its parameters are `tasks.StudySpec`'s fields: the signature
and the docstring Prefect reads for the UI's form are made from them (`spec_signature`), so
the options are defined once for the flow, the form and the command line.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import TaskRunner
from tqdm.auto import tqdm

from tasks import StudySpec, accuracy, block_units, prepare_store, render_figure
from tasks.drawing.artifacts import publish_figure
from tasks.drawing.evaluation import render_evaluation
from tasks.study.accuracy import accuracy_warning
from tasks.study.pipeline import STOP

from .running import reported_here, spec_signature, task_runner
from .sizing import io_seconds, units_per_task








def compute_blocks(
    runner: TaskRunner, spec: StudySpec, todo_ingest: list[int], todo: list[tuple[list[str], int]],
    todo_scores: list[tuple[str, str, int]], total: int, already: int,
) -> dict[str, Any]:
    """Ingest, attribute, then score the pending blocks as task runs of the calling flow run, submitted to
    `runner` (chosen per run by `task_runner`) as `Task.submit` would; returns the receipts, the seconds spent
    inside the tasks and the seconds of the whole. Not a subflow: a flow run costs its start and, at its end,
    up to a second's wait for its heartbeat thread."""
    receipts: list[dict[str, Any]] = []
    in_tasks, started_all = 0.0, time.perf_counter()
    per_task: dict[str, int] = {}  # units per task, per stage, once measured
    workers = spec.workers or (4 if spec.dask_address else 1)  # an existing cluster: assume a few workers

    def submit(kind: str, units: list[tuple], wait: bool) -> PrefectFuture[dict[str, Any]]:
        return runner.submit(block_units, {"spec": spec, "kind": kind, "units": units, "wait": wait})

    STOP.clear()
    with runner, tqdm(total=total, initial=already, desc="study", unit="block", disable=None) as bar, \
            stopping_on_interrupt():

        def collect(group: list[tuple], got: dict[str, Any], retry: list[tuple]) -> bool:
            """File a task's receipts (a unit of several methods has several); units another run holds go
            to `retry`. True when the task computed something (a measure of the work per unit)."""
            nonlocal in_tasks
            computed, in_tasks = False, in_tasks + got["seconds"]
            for unit, result in zip(group, got["results"]):
                result = result if isinstance(result, list) else [result]
                if any(r.get("deferred") for r in result):
                    retry.append(unit)
                    continue
                receipts.extend(result)
                bar.update(len(result))
                computed = computed or not any(r.get("skipped") for r in result)
            return computed

        def stage(kind: str, units: list[tuple]) -> None:
            """Every unit, passing over those another run on the store is computing; then those, waiting
            for each claim (the other run's finished units are skipped, its killed ones are done here).
            Until two units have been computed, tasks hold one unit each, and those two measure Prefect's
            cost per task, and the loading and writing of a unit, against its compute (the lower Prefect cost
            of the two, as the first also pays for a worker's start; the mean of the rest, as units differ);
            then tasks hold as many units as keep what a task pays once (Prefect's cost, its first load, its
            last write) under 5% of the work (`units_per_task`)."""
            measured: list[tuple[float, float, float]] = []  # (Prefect's, I/O, compute seconds) per computed unit
            for wait in (False, True):
                todo, retry = list(units), []
                while todo and kind not in per_task:
                    started = time.perf_counter()
                    unit, todo = todo[:1], todo[1:]
                    got = submit(kind, unit, wait).result()
                    if collect(unit, got, retry):
                        io = min(io_seconds(got["results"]), got["seconds"])
                        measured.append((time.perf_counter() - started - got["seconds"], io, got["seconds"] - io))
                    if len(measured) == 2 or (measured and not todo):
                        prefect = min(m[0] for m in measured)  # and a unit's mean I/O and compute
                        io, work = (sum(m[i] for m in measured) / len(measured) for i in (1, 2))
                        per_task[kind] = units_per_task(prefect + io, work, len(todo), workers)
                        get_run_logger().info("%s: Prefect's cost per task %.0f ms and a unit's loading and writing "
                                              "%.0f ms against its %.0f ms of compute: %d unit(s) per task", kind,
                                              1000 * prefect, 1000 * io, 1000 * work, per_task[kind])
                k = per_task.get(kind, 1)
                groups = [todo[i:i + k] for i in range(0, len(todo), k)]
                futures = {submit(kind, g, wait): g for g in groups}
                for future in as_completed(list(futures)):
                    collect(futures[future], future.result(), retry)
                units = retry

        # Inputs and targets first, all of them: attribution reads what ingestion writes.
        stage("ingest", [(b,) for b in todo_ingest])
        stage("attribute", todo)
        stage("evaluate", todo_scores)  # reads the maps just written
    return {"receipts": receipts, "in_tasks": in_tasks, "seconds": time.perf_counter() - started_all}


@contextlib.contextmanager
def stopping_on_interrupt() -> Iterator[None]:
    """On SIGTERM or Ctrl-C (Prefect's TerminationSignal, KeyboardInterrupt) while blocks run, the tasks in
    flight stop before their next unit (`tasks.study.pipeline.STOP`), so leaving the task runner waits for one
    unit at most, not for every unit of a task."""
    try:
        yield
    except BaseException as e:
        if not isinstance(e, Exception):
            STOP.set()
        raise


STAGES: dict[str, Callable[[dict[str, Any]], bool]] = {  # which receipts are whose
    "ingest": lambda r: "xai_method" not in r,
    "attribute": lambda r: "xai_method" in r and "metric" not in r,
    "evaluate": lambda r: "metric" in r,
}


def time_split(receipts: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of a stage's units spent loading inputs, computing and writing (they overlap within a task)."""
    keys = {"load": "load_seconds", "compute": "seconds", "write": "write_seconds"}
    return {k: round(sum(r.get(f, 0.0) for r in receipts), 3) for k, f in keys.items()}


@flow(name="study", log_prints=False)
@spec_signature(StudySpec)
def study(**options: Any) -> dict[str, Any]:
    """Explain a model on a dataset with each of several methods and store every map.

    Re-running with the same arguments computes only blocks not yet done; more samples
    or methods are added to an existing store.
    """
    log, started = get_run_logger(), time.perf_counter()
    spec = StudySpec(**options)
    runner = task_runner(spec.workers, spec.dask_address, spec.device)  # checked before the store is touched
    plan = prepare_store(spec)
    for skipped in plan["skipped_files"]:
        log.warning("skipped unreadable file %s", skipped)
    for problem in plan["mask_problems"]:
        log.warning("%s", problem)
    log.info("%s store %s: %d samples in %d blocks", "created" if plan["created"] else "resuming",
             spec.store, plan["samples"], plan["blocks"])
    if plan["added"]["samples"] or plan["added"]["methods"]:
        log.info("added %d new samples and methods %s to the store", plan["added"]["samples"], plan["added"]["methods"])
    todo_ingest, todo = plan["todo_ingest"], [tuple(t) for t in plan["todo"]]
    todo_scores = [tuple(t) for t in plan["todo_scores"]]
    methods = spec.studied
    total = plan["blocks"] * (1 + len(methods) * (1 + len(spec.metrics)))
    pending = len(todo_ingest) + len(todo) + len(todo_scores)
    log.info("%d of %d block tasks already done; %d to compute", total - pending, total, pending)
    with reported_here():
        blocks = compute_blocks(runner, spec, todo_ingest, todo, todo_scores, total, total - pending)
    receipts = blocks["receipts"]
    done = [r for r in receipts if not r.get("skipped")]  # skipped: another run on the store finished it
    maps = [r for r in done if STAGES["attribute"](r)]
    summary: dict[str, Any] = {
        "store": spec.store,
        "samples": plan["samples"],
        "blocks": plan["blocks"],
        "ingested_blocks": sum(1 for r in done if STAGES["ingest"](r)),
        "computed_blocks": {m: sum(1 for r in maps if r["xai_method"] == m) for m in methods},
        "scored_blocks": {k: sum(1 for r in done if r.get("metric") == k) for k in spec.metrics},
        "skipped_blocks": len(receipts) - len(done),
        "failed_maps": {m: n for m in methods if (n := sum(r["failed"] for r in maps if r["xai_method"] == m))},
        "attribution_seconds": {m: round(sum(r["seconds"] for r in maps if r["xai_method"] == m), 3) for m in methods},
        "batch": sorted({r["batch"] for r in maps}),  # images per pass that ran (`tasks.study.memory`)
        "evaluation_seconds": {k: round(sum(r["seconds"] for r in receipts if r.get("metric") == k), 3)
                               for k in spec.metrics},
        "seconds": {**{stage: time_split([r for r in done if kind(r)]) for stage, kind in STAGES.items()},
                    "in_tasks": round(blocks["in_tasks"], 3), "blocks": round(blocks["seconds"], 3)},
        "accuracy": accuracy(spec.store),
        "skipped_files": plan["skipped_files"],
        "mask_problems": plan["mask_problems"],
    }
    if summary["accuracy"] is not None:
        log.info("model accuracy on the study's samples: %.2f%%", 100 * summary["accuracy"])
    summary["accuracy_warning"] = accuracy_warning(spec.store)
    if summary["accuracy_warning"]:
        log.warning("%s", summary["accuracy_warning"])
    if summary["failed_maps"]:
        log.warning("failed maps (stored as NaN with their failure code, left out of every score): %s",
                    summary["failed_maps"])
    if summary["skipped_blocks"]:
        log.info("%d block tasks were finished by another run on the same store meanwhile", summary["skipped_blocks"])
    if spec.figure:
        shown = [s for s in spec.figure_samples if s < plan["samples"]]
        summary["figure"] = render_figure(spec.store, spec.figure, shown)
        publish_figure(summary["figure"], "study-figure", f"maps of {', '.join(methods)}: {spec.store}")
        log.info("figure written to %s", summary["figure"])
        if spec.metrics:
            summary["evaluation_figures"] = render_evaluation(spec.store, os.path.splitext(spec.figure)[0])
            for path in summary["evaluation_figures"]:  # PREFIX.curves.png, PREFIX.scores.png
                publish_figure(path, "study-" + path.rsplit(".", 2)[-2], f"evaluation: {os.path.basename(path)}")
            log.info("evaluation figures: %s", ", ".join(summary["evaluation_figures"]))
    summary["seconds"]["flow"] = round(time.perf_counter() - started, 3)  # the body: not Prefect's start and end
    return summary
