"""What a study store holds, told in seconds at any size: blocks done per method, failures, sizes and identity
from flags and attributes (`status`), the empty masks only when asked (they read every mask). A mixin of
`Store`, which owns the arrays."""
from __future__ import annotations

from typing import Any

import numpy as np

from .schema import SCHEMA, block_slice


class Summary:
    """The status half of `Store` (it provides `group`, `attrs`, `path`, `n_samples`, `block_size`, `methods`,
    `metrics` and `map_grid`)."""

    group: Any
    attrs: Any
    path: str
    n_samples: int
    block_size: int
    map_grid: Any
    methods: Any
    metrics: Any

    def failure_counts(self) -> dict[str, dict[int, int]]:
        """Per method, the number of failed maps by failure code (methods without failures are left out)."""
        if "failure" not in self.group:
            return {}
        codes = self.group["failure"][:]
        out = {}
        for i, m in enumerate(self.methods()):
            found, counts = np.unique(codes[i][codes[i] > 0], return_counts=True)
            if found.size:
                out[m] = {int(c): int(n) for c, n in zip(found, counts)}
        return out

    def empty_masks(self) -> int | None:
        """How many ingested samples have an empty ground-truth mask (None: the study has no masks), read a
        block at a time."""
        if "mask" not in self.group:
            return None
        n, b, arr = self.n_samples, self.block_size, self.group["mask"]
        return sum(int((~arr[block_slice(k, n, b)].any(axis=(1, 2))).sum())
                   for k in np.flatnonzero(self.group["ingested"][:]))

    def _scored(self) -> np.ndarray | None:
        return self.group["scored"][:] if "scored" in self.group else None

    def status(self, masks: bool = False) -> dict[str, Any]:
        """Blocks done per method, plus the store's identity and size: flags and attributes only, in seconds at
        any size. `masks`: also count the empty masks, which reads every mask (`status --verify` does)."""
        g, a = self.group, self.attrs
        done = g["done"][:]
        n, b = self.n_samples, self.block_size
        sizes = [len(range(n)[block_slice(k, n, b)]) for k in range(done.shape[1])]
        maps_done = int((done * np.array(sizes)).sum())
        stored = {v.name: int(g[v.name].nbytes_stored()) for v in SCHEMA if v.guard and v.name in g}
        return {
            "bytes_stored": stored,
            "bytes_per_map": stored["attribution"] / maps_done if maps_done else None,
            "map_dtype": str(g["attribution"].dtype),
            "map_grid": list(self.map_grid) if self.map_grid else None,
            "compression": a.get("compression"),
            "path": self.path,
            "samples": n,
            "blocks": int(done.shape[1]),
            "ingested": int(g["ingested"][:].sum()),
            "methods": {m: int(done[i].sum()) for i, m in enumerate(self.methods())},
            "failures": self.failure_counts(),
            "empty_masks": self.empty_masks() if masks else None,
            "params": a["params"],
            "scored": ({k: {m: int(scored[i, j].sum()) for i, m in enumerate(self.methods())}
                        for j, k in enumerate(self.metrics())} if (scored := self._scored()) is not None else {}),
            **{k: a.get(k) for k in ("model", "dataset", "model_fingerprint", "dataset_fingerprint", "failure_codes")},
        }
