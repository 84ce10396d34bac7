"""Seconds of the meta-evaluation (`tasks.meta.rank`, what `saliency-atlas rank` prints) on 20,000 images x 10
methods x every metric (issue 35: under a minute on two cores), beside the floor (the per-metric means alone)
and, as ratios, beside the reference implementations on the same scores: Krippendorff's alpha against the
`krippendorff` package, the Nemenyi test against scikit-posthocs.

Run: .venv/bin/python benchmarks/meta_at_scale.py [IMAGES [METHODS]]     (default 20000 10)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def seconds(f, repeat: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - started) / repeat


def main(images: int = 20_000, methods: int = 10) -> None:
    import xarray as xr

    from tasks import meta
    from xai_methods import catalogue

    metrics, rng = catalogue.metrics(), np.random.default_rng(0)
    values = rng.normal(size=(methods, images, len(metrics))) + 0.02 * np.arange(methods)[:, None, None]
    values[rng.random(values.shape) < 0.01] = np.nan  # undefined scores, as a study has them
    ds = xr.Dataset({"score": (("xai_method", "sample", "metric"), values.astype(np.float32))},
                    coords={"xai_method": [f"method_{i}" for i in range(methods)], "metric": metrics})
    o = meta.oriented(ds)
    floor = seconds(lambda: meta.means(o))
    whole = seconds(lambda: meta.rank(ds))
    print(f"{images:,} images x {methods} methods x {len(metrics)} metrics")
    print(f"rank (1000 resamples, every part)   {whole:7.2f} s   {whole / floor:8.0f}x the means alone ({floor:.3f} s)")
    ranks = meta.scores.ranks(o.complete(metrics[0]))
    rows = [("Krippendorff's alpha, one metric", lambda: meta.krippendorff_alpha(ranks), "krippendorff",
             lambda k: k.alpha(reliability_data=ranks, level_of_measurement="interval")),
            ("Nemenyi after Friedman, one metric", lambda: meta.nemenyi(o.complete(metrics[0])), "scikit_posthocs",
             lambda k: k.posthoc_nemenyi_friedman(-o.complete(metrics[0])))]
    for name, ours, package, theirs in rows:
        try:
            peer = __import__(package)
        except ImportError:
            print(f"{name:<36} {seconds(ours, 3):7.3f} s   ({package} not installed)")
            continue
        mine, reference = seconds(ours, 3), seconds(lambda: theirs(peer), 3)
        print(f"{name:<36} {mine:7.3f} s   {reference / mine:6.1f}x the speed of {package} ({reference:.3f} s)")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
