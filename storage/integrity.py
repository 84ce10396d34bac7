"""Checksums of what a study store's writers wrote: the CRC-32 of each block's sample variables, maps and
scores, recorded just before the block's flag, and `verify`, which reads every finished block back and
names the damaged ones (a chunk truncated, deleted or overwritten) so that `mark_damaged` can unset their
flags and the next run recompute exactly them. A mixin of `Store`, which owns the arrays."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .schema import SAMPLE_VARIABLES, block_slice, checksum


class Checksums:
    """The checksum half of `Store` (it provides `group`, `n_samples`, `block_size`, `methods`, `metrics`)."""

    group: Any
    n_samples: int
    block_size: int

    def _record(self, where: tuple[Any, ...], value: int) -> None:
        name, *index = where
        if name in self.group:  # a store made before checksums were recorded gains them in `grow`
            self.group[name][tuple(index)] = value

    def _sample_checksum(self, block: int, written: dict[str, np.ndarray] | None = None) -> int:
        """The CRC-32 of a block's sample variables as the store holds them: those just `written` (cast to
        their arrays' dtypes) from memory, as the codecs are lossless, and the others read back."""
        s, written = block_slice(block, self.n_samples, self.block_size), written or {}
        return checksum(*(written[v] if v in written else self.group[v][s] for v in SAMPLE_VARIABLES if v in self.group))

    def _map_checksum(self, m: int, block: int, written: tuple[np.ndarray, np.ndarray] | None = None) -> int:
        """The CRC-32 of a block's maps and failure codes: those just `written` (as stored), or read back."""
        s, has_failure = block_slice(block, self.n_samples, self.block_size), "failure" in self.group
        maps, failure = written or (self.group["attribution"][m, s], self.group["failure"][m, s] if has_failure else None)
        return checksum(maps, *([failure] if has_failure else []))

    def _score_checksum(self, m: int, k: int, block: int, written: tuple[np.ndarray, ...] | None = None) -> int:
        """The CRC-32 of a block's scores, statuses and (for a curve metric's store) curves of metric `k`."""
        s = block_slice(block, self.n_samples, self.block_size)
        if written is None:
            g = self.group
            written = (g["score"][m, s, k], g["score_status"][m, s, k], *([g["curve"][m, k, s]] if "curve" in g else []))
        return checksum(*written)

    def verify(self) -> list[dict[str, Any]]:
        """Every finished block read back and checked against the checksum recorded with its flag: one
        entry per damaged block, naming it (kind, method, metric, block) and why."""
        damaged: list[dict[str, Any]] = []

        def check(where: dict[str, Any], recorded: int, now: Callable[[], int]) -> None:
            if recorded < 0:
                return  # finished before checksums were recorded: nothing to compare with
            try:
                found, why = now(), ""
            except Exception as e:  # a truncated chunk fails to decompress
                found, why = None, f"unreadable ({type(e).__name__}: {e})"
            if found != recorded:
                damaged.append({**where, "why": why or f"checksum {found} differs from the recorded {recorded}"})

        g = self.group
        if "ingested_checksum" in g:
            sums = g["ingested_checksum"][:]
            for b in np.flatnonzero(g["ingested"][:]):
                check({"kind": "samples", "xai_method": None, "block": int(b)}, int(sums[b]),
                      lambda b=int(b): self._sample_checksum(b))
        if "checksum" in g:
            sums, done = g["checksum"][:], g["done"][:]
            for m, name in enumerate(self.methods()):  # type: ignore[attr-defined]
                for b in np.flatnonzero(done[m]):
                    check({"kind": "maps", "xai_method": name, "block": int(b)}, int(sums[m, b]),
                          lambda m=m, b=int(b): self._map_checksum(m, b))
        if "score_checksum" in g:
            sums, scored = g["score_checksum"][:], g["scored"][:]
            for m, k, b in np.argwhere(scored):
                where = {"kind": "scores", "xai_method": self.methods()[m], "metric": self.metrics()[k],  # type: ignore[attr-defined]
                         "block": int(b)}
                check(where, int(sums[m, k, b]), lambda m=int(m), k=int(k), b=int(b): self._score_checksum(m, k, b))
        return damaged

    def mark_damaged(self, damaged: list[dict[str, Any]]) -> None:
        """Unset the flags of damaged blocks, so the next run recomputes exactly them (deterministically)."""
        for d in damaged:
            if d["kind"] == "samples":
                self.group["ingested"][d["block"]] = False
            elif d["kind"] == "maps":
                self.group["done"][self._method_index(d["xai_method"]), d["block"]] = False  # type: ignore[attr-defined]
            else:
                m, k = self._method_index(d["xai_method"]), self.metrics().index(d["metric"])  # type: ignore[attr-defined]
                self.group["scored"][m, k, d["block"]] = False
