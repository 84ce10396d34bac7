"""The reliability protocols as Prefect flows: sanity, invariance, manipulate, roar.

One flow per row of `tasks.protocols.PROTOCOLS`, all made by `protocol_flow`: open or resume the store
(once: the protocol's tasks in this process reuse what it loaded), run each stage's pending units on the
task runner the spec asks for (this process, `--workers` for a local Dask cluster, `--dask-address` for an
existing one), draw the figure, return the `--json` summary. A unit another run on the same store is
computing is passed over, then waited for at the end of its stage, so two runs share the work and no unit
is computed twice. The flows' parameters are the fields of the protocol's spec, so the Prefect form, the
command line and the validation agree.
"""
from __future__ import annotations

from typing import Any

from prefect import Flow, flow, get_run_logger
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner
from tqdm.auto import tqdm

from tasks.drawing.artifacts import publish_figure
from tasks.protocols import PROTOCOLS, Protocol, Stage, UnitReceipt

from .running import reported_here, spec_signature, task_runner


def _figure(p: Protocol, spec: Any) -> str | None:
    if not spec.figure:
        return None
    path = p.plot(spec.store, spec.figure)
    publish_figure(path, f"{p.name}-figure", f"{p.name}: {spec.store}")
    get_run_logger().info("figure written to %s (and shown in the run's artifacts)", path)
    return path


def run_stage(runner: TaskRunner, spec: Any, stage: Stage) -> list[UnitReceipt]:
    """Every unit of `stage` on `runner`, passing over those another run holds; then those, waiting for each
    claim (a unit the other run finished is skipped, one it left is done here). Receipts in completion order."""
    log, receipts, units = get_run_logger(), [], list(stage.units)
    with tqdm(total=len(units), desc=stage.name, unit="unit", disable=None) as bar:
        for wait in (False, True):
            futures = [runner.submit(stage.task, {"spec": spec, "unit": u, "wait": wait}) for u in units]
            units = []
            for future in as_completed(futures):
                r: UnitReceipt = future.result()
                if r.deferred:
                    units.append(r.unit)
                    continue
                if r.line:
                    getattr(log, r.level)("%s", r.line)
                receipts.append(r)
                bar.update()
    return receipts


def run_protocol(p: Protocol, options: dict[str, Any]) -> dict[str, Any]:
    """The body of a protocol's flow."""
    log = get_run_logger()
    spec = p.spec(**options)
    runner = task_runner(spec.workers, spec.dask_address, spec.device)  # checked before the store is touched
    stages = p.stages(spec, p.opened(spec))
    log.info("%s store %s: %s", p.name, spec.store, "; ".join(f"{s.name} {len(s.units)} unit(s) to compute"
                                                              for s in stages))
    skipped = 0
    with reported_here(), runner:
        for stage in stages:
            skipped += sum(r.skipped for r in run_stage(runner, spec, stage))
    if skipped:
        log.info("%d unit(s) were finished by another run on the same store meanwhile", skipped)
    _figure(p, spec)
    return p.summary(spec.store)


def protocol_flow(p: Protocol) -> Flow:
    """The Prefect flow of protocol `p`, named like it, its parameters (the UI's form) `p.spec`'s fields."""

    def body(**options: Any) -> dict[str, Any]:
        return run_protocol(p, options)

    body.__name__ = body.__qualname__ = p.name
    body.__doc__ = p.help[0].upper() + p.help[1:] + "."
    body.__module__ = __name__
    return flow(name=p.name)(spec_signature(p.spec)(body))


FLOWS: dict[str, Flow] = {name: protocol_flow(p) for name, p in PROTOCOLS.items()}
globals().update(FLOWS)  # flows.protocols.sanity ...: the entrypoints of prefect.yaml's deployments
