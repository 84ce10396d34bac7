"""Speed and agreement of `xai_methods.metrics` beside Quantus 0.6 and beside the floor.

Workload: the built-in shapes-cnn, `--images` test images of `shapes` (64 x 64), saliency maps
(continuous: no ties, so rankings agree), CPU, 2 threads. For each metric both libraries have:
ours and Quantus on the same images, maps and parameters, alternating over `--repeats` rounds
(median, ms per image), their ratio, and the largest difference of the per-image scores (or of
the deletion curves) where Quantus's definition is the same. Deletion is also set beside its
floor: its (steps + 1) forward passes per image run alone, batched like the metric.

`--store-images N` also times the evaluation of a study: N images x 6 methods, 4 metrics
(pointing_game, relevance_mass, deletion, sparseness) through `saliency-atlas evaluate`'s flow,
reporting images x methods per second and the split between the metrics' own computation (their
tasks' compute time, model passes included) and the rest (store reads and writes, orchestration).

    .venv/bin/python benchmarks/bench_metrics.py --images 64 --repeats 3
    .venv/bin/python benchmarks/bench_metrics.py --store-images 2000
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import xai_methods as xm  # noqa: E402
import zoo  # noqa: E402
from xai_methods import metrics as xmet  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def workload(n: int):
    model = zoo.load_model("shapes-cnn")
    batch = zoo.load_dataset("shapes", limit=n).load(0, n)
    x = model.preprocess(torch.from_numpy(batch.images))
    with torch.no_grad():
        t = model(x).argmax(1)
    maps = xm.attribute("saliency", model, x, target=t)
    return model, x, t, maps, torch.from_numpy(batch.masks)


def cases(model, x, t, maps, mask):
    """metric -> (ours, quantus, how to compare): each a callable returning per-image values."""
    import quantus

    xn, an, sn, yn = x.numpy(), maps[:, None].numpy(), mask[:, None].numpy().astype(np.float32), t.numpy()
    kw = dict(model=None, x_batch=xn, y_batch=yn, a_batch=an, s_batch=sn, device="cpu")
    plain = dict(abs=False, normalise=False, disable_warnings=True)
    steps = 32
    def quantus_curves():
        # Quantus 0.6 checks that features_in_step divides H x W but flips C x H x W channel values (the
        # map broadcast over channels, a pixel's three adjacent in the order): 128 per step is 42 2/3
        # pixels, 96 steps. After every third step whole pixels are flipped: 128, 256, ... as ours.
        flip = quantus.PixelFlipping(features_in_step=64 * 64 // steps, perturb_baseline=0.0, **plain)
        flip(model=model, x_batch=xn, y_batch=yn, a_batch=an, device="cpu", softmax=False)
        return np.asarray(flip.evaluation_scores)[:, 2::3]  # (B, steps): the logit after 128, 256, ... pixels

    def our_curves():
        return xmet.measure("deletion", model, x, maps, t, steps=steps, substrate=0.0, score="logit").curve[:, 1:].numpy()

    def ours(name, **p):
        return lambda: xmet.evaluate(name, model, x, maps, t, mask=mask, **p).numpy()

    return {
        "relevance_mass": (ours("relevance_mass"), lambda: quantus.RelevanceMassAccuracy(**plain)(**kw), True),
        "relevance_rank": (ours("relevance_rank"), lambda: quantus.RelevanceRankAccuracy(**plain)(**kw), True),
        "sparseness": (ours("sparseness"), lambda: quantus.Sparseness(**plain)(**kw), True),
        "pointing_game": (ours("pointing_game", tolerance=0), lambda: quantus.PointingGame(**plain)(**kw), True),
        "deletion (curves, 32 steps)": (our_curves, quantus_curves, True),
        "max_sensitivity (10 samples)": (
            ours("max_sensitivity", method="saliency", samples=10, radius=0.2),
            lambda: quantus.MaxSensitivity(nr_samples=10, lower_bound=0.2, **plain)(
                model=model, x_batch=xn, y_batch=yn, a_batch=an, device="cpu",
                explain_func=quantus.explain, explain_func_kwargs={"method": "Saliency"}),
            False),
        "road_morf (9 fractions)": (
            ours("road_morf"), lambda: quantus.ROAD(noise=0.01, percentages=list(range(10, 100, 10)), **plain)(
                model=model, x_batch=xn, y_batch=yn, a_batch=np.repeat(an, 3, axis=1), device="cpu"), False),
    }


def deletion_floor(model, x, maps, steps: int = 32, chunk: int = 64) -> float:
    """(steps + 1) forward passes per image on deletion's own inputs (built beforehand, untimed), batched in
    `chunk`: what deletion cannot avoid. (On shapes-cnn a forward pass of the perturbed images costs ~20%
    more than one of the clean images: the floor must see the same data.)"""
    from xai_methods.metrics.faithfulness import ranks

    order, hw = ranks(maps, 0), maps.shape[1] * maps.shape[2]
    counts = torch.round(torch.arange(steps + 1) * hw / steps).long()
    img, k = torch.arange(len(x)).repeat_interleave(steps + 1), torch.arange(steps + 1).repeat(len(x))
    inputs = torch.where((order[img] < counts[k][:, None]).view(-1, 1, *maps.shape[1:]), 0.0, x[img])
    with torch.inference_mode():
        return timed(lambda: [model(inputs[i:i + chunk]) for i in range(0, len(inputs), chunk)])


def compare(args: argparse.Namespace) -> None:
    model, x, t, maps, mask = workload(args.images)
    rows = []
    for name, (ours, theirs, same) in cases(model, x, t, maps, mask).items():
        a, b, values = [], [], {}
        try:
            for r in range(args.repeats):
                for label, fn, acc in (("ours", ours, a), ("quantus", theirs, b))[:: 1 if r % 2 == 0 else -1]:
                    start = time.perf_counter()
                    values[label] = np.asarray(fn(), float)
                    acc.append(time.perf_counter() - start)
        except Exception as err:  # a peer that fails on this workload is a row, not the end of the run
            rows.append((name, statistics.median(a) if a else None, None, f"Quantus failed: {type(err).__name__}: "
                         f"{str(err)[:80]}"))
            continue
        agree = f"{np.nanmax(np.abs(values['ours'] - values['quantus'])):.2g}" if same else "other definition"
        rows.append((name, statistics.median(a), statistics.median(b), agree))
    floor, ours_deletion = [], []
    for _ in range(args.repeats):  # alternating
        floor.append(deletion_floor(model, x, maps))
        ours_deletion.append(timed(lambda: xmet.evaluate("deletion", model, x, maps, t, steps=32, substrate=0.0)))
    floor, ours_deletion = statistics.median(floor), statistics.median(ours_deletion)
    n = args.images
    print(f"shapes-cnn, {n} images 64x64, saliency maps, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}, median of {args.repeats} alternating rounds")
    print("| metric | ours ms/img | Quantus 0.6 ms/img | ours / Quantus | max abs difference |")
    print("|---|---|---|---|---|")
    for name, ours_s, theirs_s, agree in rows:
        shown = [f"{1000 * v / n:.3f}" if v else "-" for v in (ours_s, theirs_s)]
        ratio = f"{ours_s / theirs_s:.3f}" if ours_s and theirs_s else "-"
        print(f"| {name} | {shown[0]} | {shown[1]} | {ratio} | {agree} |")
    print(f"\ndeletion (32 steps): {1000 * ours_deletion / n:.2f} ms/img against its floor, 33 batched forward passes "
          f"of its own inputs, {1000 * floor / n:.2f} ms/img: {ours_deletion / floor:.2f}x")


def store_run(args: argparse.Namespace) -> None:
    import dataclasses

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.study import study
    from tasks import spec_of_store

    methods = ["saliency", "gradcam", "input_x_gradient", "random_map", "centre_map", "edge_map"]
    metrics = ["pointing_game", "relevance_mass", "deletion", "sparseness"]
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "bench.zarr")
        made = timed(lambda: study(store=store, samples=args.store_images, methods=methods, block_size=64,
                                   device="cpu", figure=None))
        spec = spec_of_store(store, metrics=metrics, device="cpu")
        holder = {}
        wall = timed(lambda: holder.update(summary=study(**dataclasses.asdict(spec))))
        compute = sum(holder["summary"]["evaluation_seconds"].values())
    n = args.store_images * len(methods)
    print(f"\nstore: {args.store_images} images x {len(methods)} methods (study: {made:.0f} s), "
          f"{len(metrics)} metrics {', '.join(metrics)}")
    print(f"evaluation wall {wall:.1f} s: {n / wall:.1f} images x methods per second (all 4 metrics)")
    print(f"  metric computation (model passes included) {compute:.1f} s = {100 * compute / wall:.0f}%; "
          f"store reads/writes and orchestration {wall - compute:.1f} s = {100 * (wall - compute) / wall:.0f}%")
    print("  per metric: " + ", ".join(f"{k} {v:.1f} s" for k, v in holder["summary"]["evaluation_seconds"].items()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--store-images", type=int, default=0, help="also time a study's evaluation (0: skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    compare(args)
    if args.store_images:
        store_run(args)


if __name__ == "__main__":
    main()
