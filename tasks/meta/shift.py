"""Does a metric notice a group of images? Its scores on the images of the group against the rest (of a class),
per method: the finding of a Clever-Hans model (docs/findings.md), where the group is the watermarked images."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def group_shift(ds: Any, inside: np.ndarray, among: np.ndarray | None = None, metrics: Sequence[str] | None = None,
                *, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """{metric: {xai_method: `storage.scores.group_difference` of the images `inside` (bool per sample) against
    the other images `among` (bool per sample; default every image), with `shifts`: its interval leaves 0
    out}} over a study's stored scores (`ds`, an `xarray.Dataset` as `storage.open_dataset` gives it)."""
    from storage.scores import group_difference

    n = ds.sizes["sample"]
    inside = np.asarray(inside, bool)
    among = np.ones(n, bool) if among is None else np.asarray(among, bool)
    if inside.shape != (n,) or among.shape != (n,):
        raise ValueError(f"inside and among must be one bool per sample ({n}), got {inside.shape} and {among.shape}")
    outside = among & ~inside
    chosen = list(metrics or [str(k) for k in ds.metric.values])
    score = ds["score"].sel(metric=chosen).transpose("xai_method", "sample", "metric").values
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for j, k in enumerate(chosen):
        out[k] = {}
        for i, m in enumerate(str(x) for x in ds.xai_method.values):
            d = group_difference(score[i, inside, j], score[i, outside, j], n_boot=n_boot, seed=seed)
            out[k][m] = {**d, "shifts": bool(d["low"] > 0 or d["high"] < 0)}
    return out
