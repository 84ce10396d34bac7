"""How many units one task of the study flow holds: the flow's task-sizing policy."""
from __future__ import annotations

import math

from tasks.study.work import Receipt


def io_seconds(receipts: list[list[Receipt]]) -> float:
    """The seconds a task's units spent loading and writing, from their receipts (a list per unit)."""
    return sum(r.load_seconds + r.write_seconds for unit in receipts for r in unit)


ORCHESTRATION_SHARE = 0.05  # batching keeps what a task pays once below this share of its work
MAX_TASK_SECONDS = 30.0  # ... but a task holds at most this much work, so that progress shows


def units_per_task(overhead: float, per_unit: float, remaining: int, workers: int) -> int:
    """How many units one task should hold: enough that `overhead`, what a task pays once (Prefect's cost
    per task, and the loading of its first unit and the writing of its last, which no compute overlaps:
    `tasks.study.pipeline`), stays under `ORCHESTRATION_SHARE` of the work, `per_unit` seconds of compute a unit;
    at most `MAX_TASK_SECONDS` of work, and (with several workers) at most a share that leaves each worker
    two tasks."""
    if remaining < 1:
        return 1
    wanted = math.ceil(max(overhead, 0.0) / (ORCHESTRATION_SHARE * max(per_unit, 1e-6)))
    cap = max(1, int(MAX_TASK_SECONDS / max(per_unit, 1e-6)))
    if workers > 1:
        cap = min(cap, max(1, math.ceil(remaining / (2 * workers))))
    return max(1, min(wanted, cap, remaining))
