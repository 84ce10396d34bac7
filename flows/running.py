"""Where and how a flow runs its tasks, for the study and the protocols alike: the flow's signature made
from a spec (the Prefect UI's form), the task runner (this process, a local Dask cluster or an existing one),
and the Prefect API that task runs in other processes report to."""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Callable, Iterator

import torch
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.loading import resolve_device
from tasks.spec import options_of
from tasks.study.memory import MALLOC_TUNABLES

def spec_signature(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give ``fn(**options)`` the signature and the "Args:" docstring of the fields of `cls`
    (`StudySpec`, or a protocol's spec)."""
    fields = options_of(cls)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        defaults = cls()
        params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=getattr(defaults, name),
                                    annotation=f.type) for name, f in fields.items()]
        fn.__signature__ = inspect.Signature(params, return_annotation=dict[str, Any])  # type: ignore[attr-defined]
        args = "\n".join(f"    {name}: {f.metadata['help']}" for name, f in fields.items())
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n{args}\n"
        return fn

    return decorate

def task_runner(workers: int | None, dask_address: str | None, device: str = "cpu") -> TaskRunner:
    """Where block tasks run: one at a time in this process (default), on a local Dask
    cluster of ``workers`` single-threaded processes, or on an existing Dask cluster at
    ``dask_address``. On GPUs, a local cluster has at most one worker per GPU."""
    gpus = torch.cuda.device_count() if resolve_device(device).startswith("cuda") else 0
    if gpus and workers is not None and workers > gpus:
        raise ValueError(f"workers {workers} is more than the {gpus} GPU(s) here: one task per GPU at a time; "
                         f"use {gpus} workers or fewer, or the cpu device")
    if workers is not None and dask_address is not None:
        raise ValueError("give workers (a local Dask cluster) or dask_address (an existing one), not both")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if dask_address is None and (workers or 1) == 1:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if dask_address is not None:
        return DaskTaskRunner(address=dask_address)
    # One single-threaded process per worker, each with its share of the cores for torch. No spilling:
    # tasks return small receipts, and a worker's spill folder, "storage" in its own directory (which
    # Dask puts first on sys.path), would shadow the `storage` package under a default editable install.
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
        "host": "127.0.0.1",  # the scheduler and workers listen on this machine only
        "data": dict,  # in memory, never spilled
        "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,  # and malloc's (tasks.study.memory)
                "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", MALLOC_TUNABLES)},
        "preload": ["tasks"],  # each worker imports torch and the tasks while it starts, all workers at once
    })

@contextlib.contextmanager
def reported_here() -> Iterator[None]:
    """Task runs in other processes (Dask workers, local or not) report to this run's Prefect API. Prefect hands
    its settings to the tasks it submits there, but a run on the temporary server it started has no address in
    them, and each worker process then started a temporary server of its own (15 s each), where its task runs
    went, never reaching the UI of the flow run."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    if PREFECT_API_URL.value() or not server.running:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield
