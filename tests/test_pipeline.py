"""Overlapped block work (`tasks.study.pipeline`): loading ahead and writing behind the compute, bounded, in
order, giving every claim back on an error, with Prefect's logger in its threads."""
import contextlib
import threading
import warnings

import pytest

from tasks.study.pipeline import Unit, caught_warnings, overlapped

WAIT = 20  # seconds an event may take before the test fails instead of hanging


class Claim:
    """A stand-in for a unit's store claims: counts what is held."""

    held: set = set()

    def __init__(self, item):
        self.item = item

    def __enter__(self):
        Claim.held.add(self.item)

    def __exit__(self, *exc):
        Claim.held.discard(self.item)


def units(n, compute=None, write=None, log=None):
    """`prepare` for items 0..n-1: claims, then compute and write as given (default: item -> item)."""
    log = [] if log is None else log

    def prepare(i):
        log.append(("load", i))
        stack = contextlib.ExitStack()
        stack.enter_context(Claim(i))
        return Unit(claims=stack, compute=lambda: (compute or (lambda i: i))(i),
                    write=lambda r: (write or (lambda i, r: r))(i, r))

    return prepare


def test_the_next_unit_loads_and_the_last_one_writes_while_one_computes():
    loaded_1, written_0 = threading.Event(), threading.Event()

    def compute(i):
        if i == 0:  # unit 1 loads while unit 0 computes, or this times out
            assert loaded_1.wait(WAIT)
        if i == 1:  # unit 0 is written while unit 1 computes
            assert written_0.wait(WAIT)
        return i * 10

    def write(i, r):
        written_0.set() if i == 0 else None
        return r + 1

    prepare = units(4, compute, write)

    def prepare_and_signal(i):
        u = prepare(i)
        loaded_1.set() if i == 1 else None
        return u

    assert overlapped(list(range(4)), prepare_and_signal) == [1, 11, 21, 31]
    assert not Claim.held


def test_memory_is_bounded_by_the_queues():
    """With a slow writer, at most depth units wait to be written and depth are loaded ahead."""
    gate, alive, peak = threading.Semaphore(0), set(), [0]

    def track(i, add):
        (alive.add if add else alive.discard)(i)
        peak[0] = max(peak[0], len(alive))

    def prepare(i):
        track(i, True)
        return Unit(compute=lambda: i, write=lambda r: (gate.acquire(timeout=WAIT), track(i, False), r)[-1])

    releaser = threading.Thread(target=lambda: [gate.release() or threading.Event().wait(0.01) for _ in range(12)])
    releaser.start()
    assert overlapped(list(range(12)), prepare, depth=2) == list(range(12))
    releaser.join()
    assert 1 < peak[0] <= 2 * 2 + 1, peak


def test_a_units_inputs_are_freed_when_it_is_written_even_when_its_steps_refer_back_to_it():
    """The study's writes refer to their unit (a reference cycle); with the cyclic garbage collector off, as it
    is between its rare runs, each unit's inputs must still be gone once the unit is written, or memory grows
    with the number of units (issue 34: 30 MB a block, 2 GB after 64 blocks)."""
    import gc
    import weakref

    class Inputs:  # stands for a block's tensors
        pass

    alive: list[weakref.ref] = []

    def prepare(i):
        inputs = Inputs()
        alive.append(weakref.ref(inputs))
        unit = Unit(compute=lambda: (inputs, i)[1])
        unit.write = lambda r: (unit.seconds, r)[1]  # the cycle: unit -> write -> unit
        return unit

    gc.disable()
    try:
        assert overlapped(list(range(6)), prepare) == list(range(6))
        assert [ref() is None for ref in alive] == [True] * 6
    finally:
        gc.enable()


def test_a_finished_unit_passes_its_receipt_through_in_order():
    def prepare(i):
        return Unit(result=f"skipped {i}") if i % 2 else units(1)(i)

    assert overlapped(list(range(5)), prepare) == [0, "skipped 1", 2, "skipped 3", 4]


@pytest.mark.parametrize("step", ["compute", "write", "load"])
def test_an_error_in_any_step_gives_every_claim_back_and_is_raised(step):
    def boom(i, *_):
        raise RuntimeError(f"{step} of {i} failed")

    prepare = units(6, boom if step == "compute" else None, boom if step == "write" else None)
    if step == "load":
        inner = prepare

        def prepare(i):
            return boom(i) if i == 2 else inner(i)

    with pytest.raises(RuntimeError, match=f"{step} of"):
        overlapped(list(range(6)), prepare)
    assert not Claim.held


def test_prefects_logger_works_in_the_pipelines_threads(prefect_api):
    from prefect import flow, get_run_logger, task

    @task
    def run():
        def prepare(i):
            get_run_logger().info("loading %d", i)  # raises MissingContextError outside the task's context
            return Unit(compute=lambda: i, write=lambda r: get_run_logger().name and r)

        return overlapped([0, 1, 2], prepare)

    @flow
    def f():
        return run()

    assert f() == [0, 1, 2]


def test_each_thread_catches_its_own_warnings_and_the_last_out_restores_the_hook():
    """Two scopes in two threads, the first opened closed first (what `catch_warnings` gets wrong):
    each lists only its own thread's warnings, a third thread's show as before while both are open,
    and the process's hook and filters are as they were once both are closed."""
    shown, lists = [], {}
    opened, go = [threading.Event(), threading.Event()], [threading.Event(), threading.Event()]
    hook, filters = warnings.showwarning, list(warnings.filters)

    def scope(i):
        with caught_warnings() as caught:
            opened[i].set()
            assert go[i].wait(WAIT)
            warnings.warn_explicit(f"from {i}", UserWarning, "t", 1)
        lists[i] = [str(w.message) for w in caught]

    threads = [threading.Thread(target=scope, args=(i,)) for i in (0, 1)]
    warnings.showwarning = before = lambda message, *a, **k: shown.append(str(message))
    try:
        for t, o in zip(threads, opened):
            t.start()
            assert o.wait(WAIT)
        third = threading.Thread(target=warnings.warn_explicit, args=("from a third thread", UserWarning, "t", 1))
        third.start(), third.join(WAIT)
        for t, g in zip(threads, go):
            g.set(), t.join(WAIT)
        restored = warnings.showwarning
    finally:
        warnings.showwarning = hook
    assert lists == {0: ["from 0"], 1: ["from 1"]} and shown == ["from a third thread"]
    assert restored is before, "the hook that was there before the first scope is back"
    assert list(warnings.filters) == filters


def test_a_stop_request_ends_a_task_after_its_unit_in_flight_with_every_claim_given_back():
    """SIGTERM or Ctrl-C set `STOP` while unit 1 computes: unit 1 is still written (a flag set has its whole
    block), units 2.. are not computed, and no claim is left held."""
    from tasks.study.pipeline import STOP

    Claim.held = set()

    def compute(i):
        if i == 1:
            STOP.set()
        return i

    try:
        receipts = overlapped(list(range(6)), units(6, compute))
    finally:
        STOP.clear()
    assert receipts == [0, 1]
    assert Claim.held == set()
