"""What a study's tasks hand each other: `Work` (one unit of work), `Receipt` (what a unit did) and `Pending`
(the store prepared, and the work left in it). Small frozen dataclasses, so a Dask worker gets and returns
them as they are, and the Prefect UI shows them readably."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STAGES = ("ingest", "attribute", "evaluate")  # in the order they run: each reads what the one before wrote


@dataclass(frozen=True)
class Work:
    """One unit of a study's work, claimed, computed and flagged as one: a block to ingest, one block's maps of
    `methods` (several when they share their passes: `xai_methods.shared`), or one block's scores of a method
    by a metric."""

    stage: str
    block: int
    methods: tuple[str, ...] = ()
    metric: str | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")

    @classmethod
    def ingest(cls, block: int) -> Work:
        return cls("ingest", block)

    @classmethod
    def attribute(cls, methods: list[str] | tuple[str, ...] | str, block: int) -> Work:
        return cls("attribute", block, (methods,) if isinstance(methods, str) else tuple(methods))

    @classmethod
    def evaluate(cls, method: str, metric: str, block: int) -> Work:
        return cls("evaluate", block, (method,), metric)

    @property
    def claims(self) -> list[str]:
        """The claims it is computed under: each method's block on its own, so runs that group methods
        differently still never compute one block twice."""
        if self.stage == "ingest":
            return [f"ingest-{self.block}"]
        if self.stage == "attribute":
            return [f"maps-{m}-{self.block}" for m in self.methods]
        return [f"scores-{self.methods[0]}-{self.metric}-{self.block}"]

    def receipts(self, **fields: Any) -> list[Receipt]:
        """One receipt per method (one for an ingested block) with `fields`."""
        methods = self.methods or (None,)
        return [Receipt(self.stage, self.block, m, self.metric, **fields) for m in methods]


@dataclass(frozen=True)
class Receipt:
    """What a unit did for one method (or block): `deferred` when another run held its claim (the flow comes
    back to it), `skipped` when another run had finished it; else the samples it computed, the seconds of its
    compute, of loading its inputs and of writing its result, the failed maps and the batch that ran."""

    stage: str
    block: int
    xai_method: str | None = None
    metric: str | None = None
    samples: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0
    write_seconds: float = 0.0
    failed: int = 0
    batch: int | None = None
    deferred: bool = False
    skipped: bool = False


@dataclass(frozen=True)
class TaskReceipts:
    """A task's units' receipts (a list per unit, in the order of its units) and the seconds the task took."""

    receipts: list[list[Receipt]]
    seconds: float


@dataclass(frozen=True)
class Pending:
    """The store created, checked or grown for a run, and the work still to do in it, per stage in order."""

    store: str
    created: bool
    added: dict[str, Any]
    samples: int
    blocks: int
    skipped_files: list[str] = field(default_factory=list)
    mask_problems: list[str] = field(default_factory=list)
    work: dict[str, list[Work]] = field(default_factory=dict)

    @property
    def units(self) -> int:
        return sum(len(w) for w in self.work.values())
