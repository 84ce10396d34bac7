"""Overlapped block work: the next unit's inputs load, and the last unit's results are written, while
this unit computes.

A unit of work (one block to ingest, one shared pass of methods over a block, one metric over a block)
comes in three steps: `prepare` claims it and loads its inputs, `compute` runs the model, `write` stores
the result and sets the store's flag. `overlapped` runs the three steps of consecutive units in three
threads (a loader, the caller's, a writer) with bounded queues of `depth` units between them, so that a
task runs at the speed of its slowest step and holds at most 2 x `depth` + 1 units in memory. Each unit's
claims are held from `prepare` until its write has finished (or failed), so a kill at any moment leaves
every block either flagged with its whole result or unflagged and claimed by nobody: a resume recomputes
exactly the unflagged ones.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .memory import give_back_excess

DEPTH = 2  # units loaded ahead, and units waiting to be written

# Set when the run was asked to stop (SIGTERM, Ctrl-C: `flows.study.compute_blocks`): a task returns the
# receipts of the units it finished, before computing the next; the units being written finish, so every
# flag set has its whole block, and the units left keep no claim.
STOP = threading.Event()


@dataclass
class Unit:
    """A prepared unit: either `result` (what it returns with nothing to compute: deferred, or finished by
    another run), or its claims in `claims` with `compute` (inputs loaded) and `write` (compute's result ->
    the unit's result)."""

    result: Any = None
    claims: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    compute: Callable[[], Any] | None = None
    write: Callable[[Any], Any] | None = None
    seconds: float = 0.0  # spent loading


def _write(unit: Unit, result: Any) -> Any:
    with unit.claims:  # released once written, or when the write fails
        try:
            return unit.write(result)  # type: ignore[misc]
        finally:
            unit.write = None  # see `_computed`


def _computed(unit: Unit) -> Any:
    """`unit.compute()`, and the unit let go of it. A unit's steps are closures over its inputs, and a write
    often refers back to its unit (a cycle): dropped once run, the inputs and results are freed as soon as
    the unit is done, by reference counting, instead of waiting for the cyclic garbage collector, which
    runs after so many new Python objects, not bytes (measured: 30 MB per block of 256 still held, 2 GB
    after 64 blocks)."""
    with _released_on_error(unit.claims):
        try:
            return unit.compute()  # type: ignore[misc]
        finally:
            unit.compute = None


def overlapped(items: list[Any], prepare: Callable[[Any], Unit], depth: int = DEPTH) -> list[Any]:
    """The receipts of `prepare(item)`'s units, in the order of `items`, loading ahead and writing behind
    the compute of each (see the module's docstring). An error in any step stops the run: the units
    already prepared release their claims unwritten, the ones being written finish, and it is raised.
    The threads run in copies of the caller's context, so Prefect's run logger works in them."""
    receipts: list[Any] = []
    with ThreadPoolExecutor(1, "block-load") as loader, ThreadPoolExecutor(1, "block-write") as writer:
        loads: deque[Future[Unit]] = deque(_submit(loader, prepare, item) for item in items[:depth])
        writes: deque[Future[Any]] = deque()
        try:
            for i in range(len(items)):
                if STOP.is_set():  # the units left are not computed (the caller is stopping the run)
                    break
                unit = loads.popleft().result()
                if i + depth < len(items):
                    loads.append(_submit(loader, prepare, items[i + depth]))
                if unit.compute is None:
                    writes.append(_resolved(unit.result))
                else:
                    writes.append(_submit(writer, _write, unit, _computed(unit)))
                    give_back_excess()
                del unit
                while len(writes) > depth or (writes and writes[0].done()):
                    receipts.append(writes.popleft().result())
            receipts.extend(w.result() for w in writes)
        finally:
            for pending in loads:  # prepared but never computed: give their claims back
                with contextlib.suppress(BaseException):
                    pending.result().claims.close()
    return receipts


@contextlib.contextmanager
def _released_on_error(claims: contextlib.ExitStack):
    try:
        yield
    except BaseException:
        claims.close()
        raise


def _submit(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Future[Any]:
    return pool.submit(contextvars.copy_context().run, fn, *args)


def _resolved(value: Any) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f


class _Caught(threading.local):
    caught: list[warnings.WarningMessage] | None = None  # what this thread's innermost scope fills


# per thread its scope; for the process the scopes open and the hook that was there before the first
_local, _lock, _open, _previous = _Caught(), threading.Lock(), [0], [warnings.showwarning]


def _dispatch(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    if _local.caught is None:  # another thread's warning: where it went before
        _previous[0](message, category, filename, lineno, file, line)
    else:
        _local.caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))


@contextlib.contextmanager
def caught_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """The warnings this thread shows inside the scope, in a list; other threads' show as before.

    `warnings.catch_warnings` swaps the process's filters and hook and puts back what it saw on
    entry, so two of them open in two threads (a block computing, its neighbour loading) leave the
    process with the other's state. This changes no filter (a warning shows once per place, as
    Python's default has it) and swaps only the hook: the first scope in installs it, the last one
    out puts the previous one back. A warning raised in a thread that the scope's own code starts
    (a CUDA backward's worker, zarr's event loop) is not this thread's and shows as before."""
    with _lock:
        if _open[0] == 0 and warnings.showwarning is not _dispatch:  # (a foreign scope may have put it back)
            _previous[0], warnings.showwarning = warnings.showwarning, _dispatch
        _open[0] += 1
    outer, _local.caught = _local.caught, []
    try:
        yield _local.caught
    finally:
        _local.caught = outer
        with _lock:
            _open[0] -= 1
            if _open[0] == 0 and warnings.showwarning is _dispatch:  # not one installed since
                warnings.showwarning = _previous[0]
