"""Speed of the reliability protocols: the sanity check beside Quantus 0.6's MPRT and the floor,
and ROAR's retrains on 1 and 2 Dask workers.

Sanity workload: shapes-cnn, `--images` test images of `shapes` (64 x 64), `--methods`, cascading
randomisation of its 11 layers from the logits down, CPU. Per randomised model and method:

- floor: the maps of the randomised model, nothing else (the passes a sanity check cannot avoid);
- ours: `tasks.protocols.sanity`'s step (the randomised copy, the maps, all four similarity measures), in-process;
- ours, spearman only: the same with Quantus's one measure, for a like-for-like ratio;
- Quantus MPRT: `quantus.MPRT(layer_order="top_down")` with the same explain function (ours),
  the same images and the original maps given (so it does not recompute them), Spearman only.

ROAR workload (`--roar`): the `roar` flow on a small configuration, wall time with 1 and 2 workers.

    .venv/bin/python benchmarks/bench_protocols.py --images 32
    .venv/bin/python benchmarks/bench_protocols.py --images 32 --roar
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import xai_methods as xm  # noqa: E402
import zoo  # noqa: E402
from xai_methods import surgery  # noqa: E402
from benchlib.timing import timed  # noqa: E402
from xai_methods.metrics.similarity import MEASURES, similarities  # noqa: E402


def sanity(n: int, methods: list[str]) -> None:
    import quantus

    model = zoo.load_model("shapes-cnn")
    x = model.preprocess(torch.from_numpy(zoo.load_dataset("shapes", limit=n).load(0, n).images))
    with torch.no_grad():
        t = model(x).argmax(1)
    layers = surgery.execution_order(model, x)[::-1]
    original = {m: xm.attribute(m, model, x, target=t).numpy() for m in methods}
    models = [surgery.randomized(model, layers[:k + 1], 0) for k in range(len(layers))]

    def floor() -> None:
        for r in models:
            for m in methods:
                xm.attribute(m, r, x, target=t)

    def ours(measures: tuple[str, ...]) -> None:
        for k in range(len(layers)):
            r = surgery.randomized(model, layers[:k + 1], 0)
            for m in methods:
                similarities(original[m], xm.attribute(m, r, x, target=t).numpy(), measures)

    def explain(model, inputs, targets, method, **_):  # Quantus also passes device=
        return xm.attribute(method, model, torch.as_tensor(inputs), target=torch.as_tensor(targets)).numpy()[:, None]

    def peer() -> None:
        for m in methods:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantus.MPRT(layer_order="top_down", return_sample_correlation=True, disable_warnings=True)(
                    model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=original[m][:, None],
                    explain_func=explain, explain_func_kwargs={"method": m}, device="cpu", batch_size=n)

    units = len(layers) * len(methods)
    rows = [("floor (maps only)", timed(floor)), ("ours, 4 measures", timed(lambda: ours(MEASURES))),
            ("ours, spearman only", timed(lambda: ours(("spearman_abs",)))), ("Quantus MPRT (spearman)", timed(peer))]
    base = rows[0][1]
    print(f"sanity check: {n} images, methods {', '.join(methods)}, {len(layers)} layers cascading, "
          f"torch threads {torch.get_num_threads()}")
    print("| what | ms per randomised model and method | x floor |\n|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {1000 * seconds / units:.1f} | {seconds / base:.2f} |")


def roar_workers() -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.protocols import roar

    args = dict(methods=["saliency", "gradcam"], fractions=[0.5, 0.9], seeds=2, train_samples=1000,
                test_samples=200, epochs=2, figure=None)
    with prefect_test_harness(server_startup_timeout=120), tempfile.TemporaryDirectory() as tmp:
        roar(store=f"{tmp}/warm.zarr", **{**args, "fractions": [0.5], "seeds": 1, "methods": ["saliency"]})
        print("| workers | retrains | wall s |\n|---:|---:|---:|")
        for workers in (1, 2):
            path = f"{tmp}/w{workers}.zarr"
            seconds = timed(lambda: roar(store=path, workers=workers if workers > 1 else None, **args))
            print(f"| {workers} | {(len(args['methods']) + 1) * 2 * 2} | {seconds:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--methods", default="saliency,guided_backprop,gradcam")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--roar", action="store_true", help="also time ROAR's retrains on 1 and 2 Dask workers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sanity(args.images, args.methods.split(","))
    if args.roar:
        roar_workers()


if __name__ == "__main__":
    main()
