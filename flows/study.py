"""The ``study`` flow: attribution maps of a model over a dataset, into a resumable store.

The flow only composes tasks. Its parameters are `tasks.StudySpec`'s fields: the signature
and the docstring Prefect reads for the UI's form are made from them (`spec_signature`), so
the options are defined once for the flow, the form and the command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Iterator

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import TaskRunner
from tqdm.auto import tqdm

import storage
from tasks import StudyPlan, StudySpec, accuracy, block_units, meta, prepare_store, render_figure
from tasks.drawing.agreement import plot_agreement, trust_markdown
from tasks.drawing.artifacts import publish_figure
from tasks.drawing.evaluation import render_evaluation
from tasks.study.accuracy import accuracy_warning
from tasks.study.pipeline import STOP
from tasks.study.planning import hand_on, is_complete
from tasks.study.work import STAGES, Pending, Receipt, TaskReceipts, Work

from .running import reported_here, spec_signature, task_runner
from .sizing import io_seconds, units_per_task








class BlockRun:
    """The pending units of a study run as task runs of the calling flow run, submitted to `runner` (chosen per
    run by `task_runner`) as `Task.submit` would, stage after stage; their receipts, the seconds spent inside
    the tasks, and how many units a task holds per stage, once measured. Not a subflow: a flow run costs its
    start and, at its end, up to a second's wait for its heartbeat thread."""

    def __init__(self, runner: TaskRunner, spec: StudySpec, bar: Any) -> None:
        self.runner, self.spec, self.bar = runner, spec, bar
        self.receipts: list[Receipt] = []
        self.in_tasks = 0.0
        self.per_task: dict[str, int] = {}
        self.workers = spec.workers or (4 if spec.dask_address else 1)  # an existing cluster: assume a few workers

    def submit(self, units: list[Work], wait: bool) -> PrefectFuture[TaskReceipts]:
        return self.runner.submit(block_units, {"spec": self.spec, "units": units, "wait": wait})

    def collect(self, units: list[Work], got: TaskReceipts, retry: list[Work]) -> bool:
        """File a task's receipts (a unit of several methods has several); units another run holds go to
        `retry`. True when the task computed something (a measure of the work per unit)."""
        computed, self.in_tasks = False, self.in_tasks + got.seconds
        for work, receipts in zip(units, got.receipts):
            if any(r.deferred for r in receipts):
                retry.append(work)
                continue
            self.receipts.extend(receipts)
            self.bar.update(len(receipts))
            computed = computed or not any(r.skipped for r in receipts)
        return computed

    def measured(self, stage: str, todo: list[Work], wait: bool, retry: list[Work]) -> list[Work]:
        """Tasks of one unit each until two units have been computed: they measure Prefect's cost per task (the
        lower of the two, as the first also pays for a worker's start) and a unit's loading and writing against
        its compute (their mean, as units differ); then `units_per_task` sets this stage's task size. Returns
        the units not yet submitted."""
        measured: list[tuple[float, float, float]] = []  # (Prefect's, I/O, compute seconds) per computed unit
        while todo and stage not in self.per_task:
            started = time.perf_counter()
            unit, todo = todo[:1], todo[1:]
            got = self.submit(unit, wait).result()
            if self.collect(unit, got, retry):
                io = min(io_seconds(got.receipts), got.seconds)
                measured.append((time.perf_counter() - started - got.seconds, io, got.seconds - io))
            if len(measured) == 2 or (measured and not todo):
                prefect = min(m[0] for m in measured)
                io, work = (sum(m[i] for m in measured) / len(measured) for i in (1, 2))
                self.per_task[stage] = units_per_task(prefect + io, work, len(todo), self.workers)
                get_run_logger().info("%s: Prefect's cost per task %.0f ms and a unit's loading and writing %.0f ms "
                                      "against its %.0f ms of compute: %d unit(s) per task", stage, 1000 * prefect,
                                      1000 * io, 1000 * work, self.per_task[stage])
        return todo

    def stage(self, stage: str, units: list[Work]) -> None:
        """Every unit, passing over those another run on the store is computing; then those, waiting for each
        claim (the other run's finished units are skipped, its killed ones are done here). Tasks hold as many
        units as keep what a task pays once (Prefect's cost, its first load, its last write) under 5% of the
        work, once measured (`measured`)."""
        for wait in (False, True):
            retry: list[Work] = []
            todo = self.measured(stage, list(units), wait, retry)
            k = self.per_task.get(stage, 1)
            futures = {self.submit(g, wait): g for g in (todo[i:i + k] for i in range(0, len(todo), k))}
            for future in as_completed(list(futures)):
                self.collect(futures[future], future.result(), retry)
            units = retry


def compute_blocks(runner: TaskRunner, spec: StudySpec, pending: Pending, total: int) -> dict[str, Any]:
    """Ingest, attribute, then score the pending units (each stage reads what the one before wrote); the
    receipts, the seconds spent inside the tasks and the seconds of the whole."""
    started = time.perf_counter()
    STOP.clear()
    with runner, tqdm(total=total, initial=total - pending.units, desc="study", unit="block", disable=None) as bar, \
            stopping_on_interrupt():
        run = BlockRun(runner, spec, bar)
        for stage in STAGES:
            run.stage(stage, pending.work.get(stage, []))
    return {"receipts": run.receipts, "in_tasks": run.in_tasks, "seconds": time.perf_counter() - started}


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


def time_split(receipts: list[Receipt]) -> dict[str, float]:
    """Seconds of a stage's units spent loading inputs, computing and writing (they overlap within a task)."""
    return {"load": round(sum(r.load_seconds for r in receipts), 3), "compute": round(sum(r.seconds for r in receipts), 3),
            "write": round(sum(r.write_seconds for r in receipts), 3)}


def run_summary(spec: StudySpec, pending: Pending, blocks: dict[str, Any]) -> dict[str, Any]:
    """The flow's `--json` summary of what this run computed, skipped, and how long each stage took."""
    receipts, methods = blocks["receipts"], spec.studied
    done = [r for r in receipts if not r.skipped]  # skipped: another run on the store finished it
    maps = [r for r in done if r.stage == "attribute"]
    return {
        "store": spec.store, "samples": pending.samples, "blocks": pending.blocks,
        "ingested_blocks": sum(1 for r in done if r.stage == "ingest"),
        "computed_blocks": {m: sum(1 for r in maps if r.xai_method == m) for m in methods},
        "scored_blocks": {k: sum(1 for r in done if r.metric == k) for k in spec.metrics},
        "skipped_blocks": len(receipts) - len(done),
        "failed_maps": {m: n for m in methods if (n := sum(r.failed for r in maps if r.xai_method == m))},
        "attribution_seconds": {m: round(sum(r.seconds for r in maps if r.xai_method == m), 3) for m in methods},
        "batch": sorted({r.batch for r in maps}),  # images per pass that ran (`tasks.study.memory`)
        "evaluation_seconds": {k: round(sum(r.seconds for r in receipts if r.metric == k), 3) for k in spec.metrics},
        "seconds": {**{stage: time_split([r for r in done if r.stage == stage]) for stage in STAGES},
                    "in_tasks": round(blocks["in_tasks"], 3), "blocks": round(blocks["seconds"], 3)},
        "accuracy": accuracy(spec.store), "accuracy_warning": accuracy_warning(spec.store),
        "skipped_files": pending.skipped_files, "mask_problems": pending.mask_problems,
    }


def _figures(spec: StudySpec, summary: dict[str, Any]) -> None:
    """The overview figure and, with metrics, the evaluation figures: written, and shown in the run's artifacts."""
    log = get_run_logger()
    shown = [s for s in spec.figure_samples if s < summary["samples"]]
    summary["figure"] = render_figure(spec.store, spec.figure, shown)
    publish_figure(summary["figure"], "study-figure", f"maps of {', '.join(spec.studied)}: {spec.store}")
    log.info("figure written to %s", summary["figure"])
    if spec.metrics:
        summary["evaluation_figures"] = render_evaluation(spec.store, os.path.splitext(spec.figure)[0])
        for path in summary["evaluation_figures"]:  # PREFIX.curves.png, PREFIX.scores.png
            publish_figure(path, "study-" + path.rsplit(".", 2)[-2], f"evaluation: {os.path.basename(path)}")
        log.info("evaluation figures: %s", ", ".join(summary["evaluation_figures"]))
        judged = meta.rank(storage.open_dataset(spec.store))  # how far to trust the scores, in the UI too
        figure = plot_agreement(judged, f"{os.path.splitext(spec.figure)[0]}.agreement.png")
        create_markdown_artifact(markdown=trust_markdown(judged, figure), key="study-trust",
                                 description=f"how far to trust the scores of {spec.store} (saliency-atlas rank)")
        summary["agreement_figure"] = figure


def _log_pending(pending: Pending, total: int) -> None:
    log = get_run_logger()
    for skipped in pending.skipped_files:
        log.warning("skipped unreadable file %s", skipped)
    for problem in pending.mask_problems:
        log.warning("%s", problem)
    log.info("%s store %s: %d samples in %d blocks", "created" if pending.created else "resuming",
             pending.store, pending.samples, pending.blocks)
    if pending.added["samples"] or pending.added["methods"]:
        log.info("added %d new samples and methods %s to the store", pending.added["samples"], pending.added["methods"])
    log.info("%d of %d block tasks already done; %d to compute", total - pending.units, total, pending.units)


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
    pending = prepare_store(spec)
    total = pending.blocks * (1 + len(spec.studied) * (1 + len(spec.metrics)))
    _log_pending(pending, total)
    with reported_here():
        blocks = compute_blocks(runner, spec, pending, total)
    summary = run_summary(spec, pending, blocks)
    if summary["accuracy"] is not None:
        log.info("model accuracy on the study's samples: %.2f%%", 100 * summary["accuracy"])
    if summary["accuracy_warning"]:
        log.warning("%s", summary["accuracy_warning"])
    if summary["failed_maps"]:
        log.warning("failed maps (stored as NaN with their failure code, left out of every score): %s",
                    summary["failed_maps"])
    if summary["skipped_blocks"]:
        log.info("%d block tasks were finished by another run on the same store meanwhile", summary["skipped_blocks"])
    if spec.figure:
        _figures(spec, summary)
    summary["seconds"]["flow"] = round(time.perf_counter() - started, 3)  # the body: not Prefect's start and end
    return summary


def run(spec: StudySpec, p: StudyPlan) -> dict[str, Any] | None:
    """Run the study flow on `spec`, already planned as `p` (every argument checked: the command line plans
    first, so that a bad one is one clear line), unless the store holds everything already (None: Prefect and
    its temporary server are skipped altogether). The plan is handed on: the flow does not make it again."""
    if is_complete(p, spec.store):
        return None
    hand_on(spec, p)
    try:
        return study(**dataclasses.asdict(spec))
    finally:
        hand_on(spec, None)
