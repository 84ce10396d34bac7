"""The ``saliency-atlas`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

EXAMPLES = """\
examples:
  saliency-atlas methods
  saliency-atlas study --dataset shapes --model shapes-cnn \\
      --methods saliency,gradcam,occlusion --samples 256 --store runs/shapes.zarr
  saliency-atlas study --dataset ~/photos --model resnet18 --weights resnet18.pt \\
      --methods gradcam --layer layer4 --store runs/photos.zarr
  saliency-atlas study --methods contrastive_gradcam,cem_pn,cdeepex --contrast square \
      --samples 64 --store runs/why-not-square.zarr
  saliency-atlas status runs/shapes.zarr
  saliency-atlas figure runs/shapes.zarr --samples 0,1,2 --out figure.png
  saliency-atlas aggregate runs/shapes.zarr --plot runs/shapes.means.png

A study is resumable: run the same command again after an interruption and only
the blocks not yet done are computed. Open the result in Python with
  import xarray as xr; ds = xr.open_zarr("runs/shapes.zarr")
"""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None


def _samples(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of samples or 'all', got {text!r}") from None


def _param(text: str) -> tuple[str, str, Any]:
    """METHOD.NAME=VALUE, the value read as JSON when it parses (8, 0.5, true, null, "x")."""
    key, sep, raw = text.partition("=")
    method, dot, name = key.partition(".")
    if not (sep and dot and method and name):
        raise argparse.ArgumentTypeError(f"expected METHOD.NAME=VALUE like occlusion.window=8, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return method, name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="saliency-atlas",
        description="Compute, store and compare attribution maps (saliency) of image classifiers over whole datasets.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("methods", help="list the attribution methods, their category and cost")

    s = sub.add_parser("study", help="explain a model over a dataset into a resumable Zarr store",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--dataset", default="shapes", help="built-in name (shapes) or a folder of class sub-folders of images")
    s.add_argument("--model", default="shapes-cnn", help="built-in name (shapes-cnn) or a torchvision architecture name with --weights")
    s.add_argument("--weights", default=None, help="local state-dict file (loaded with weights_only=True; nothing is downloaded)")
    s.add_argument("--methods", default="saliency,gradcam,occlusion", help="comma-separated method names (see `saliency-atlas methods`)")
    s.add_argument("--samples", type=_samples, default=256, help="how many samples of the dataset, or 'all'")
    s.add_argument("--store", default="runs/shapes.zarr", help="Zarr store path; an existing store of the same study is resumed")
    s.add_argument("--layer", default=None, help="layer for layer methods (dotted module name); default: the last spatial layer")
    s.add_argument("--block-size", type=int, default=64, help="samples per block (the unit of work and of Zarr chunks)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (a GPU when there is one)")
    layout = s.add_argument_group("layout of a new store (an existing store keeps its own)")
    layout.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="precision of stored maps")
    layout.add_argument("--compression", choices=("zstd", "blosc", "none"), default="zstd", help="codec of maps, images, masks")
    layout.add_argument("--chunk-samples", type=int, default=None, metavar="N",
                        help="samples per chunk; below --block-size each block becomes one shard of such chunks")
    layout.add_argument("--no-images", dest="keep_images", action="store_false",
                        help="store sample ids only, not the model inputs (inputs are remade from the dataset)")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None,
                       help="run block tasks on a local Dask cluster of N processes (default: one at a time here)")
    where.add_argument("--dask-address", default=None, metavar="tcp://HOST:PORT",
                       help="run block tasks on an existing Dask cluster (its workers need this package installed)")
    s.add_argument("--contrast", default="runner-up", metavar="runner-up|CLASS",
                   help="contrastive methods explain 'why the prediction, not CLASS?': the runner-up class of each "
                        "sample, or a class name (samples predicted as CLASS fall back to their runner-up)")
    s.add_argument("--param", type=_param, action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="a method parameter, e.g. occlusion.window=8 (repeatable)")
    s.add_argument("--figure", default=None, help="figure path (default: the store path with .png); 'none' for no figure")

    st = sub.add_parser("status", help="blocks done per method, and the store's identity")
    st.add_argument("store")

    f = sub.add_parser("figure", help="draw inputs and heatmaps of chosen samples")
    f.add_argument("store")
    f.add_argument("--samples", type=_int_list, default=[0, 1, 2, 3], help="comma-separated sample positions")
    f.add_argument("--methods", default=None, help="comma-separated subset of the store's methods (default: all)")
    f.add_argument("--out", default="figure.png", help="output file (.png, .pdf, .svg)")

    ag = sub.add_parser("aggregate", help="mean/std maps per class and per correct/incorrect prediction (Dask, out of core)")
    ag.add_argument("store")
    ag.add_argument("--out", default=None, help="aggregate Zarr store (default: the study path with .agg.zarr)")
    ag.add_argument("--plot", default=None, metavar="PNG", help="also draw the mean maps (and correct vs incorrect) to this file")
    ag.add_argument("--by", choices=("label", "prediction"), default="label", help="group classes by the true label or the prediction")
    return p


def cmd_methods() -> None:
    import xai_methods as xm

    rows = [("name", "category", "layer", "contrast", "passes/image (64x64)", "what it is")]
    for name in xm.available():
        s = xm.spec(name)
        fwd, bwd = s.passes((64, 64))
        rows.append((name, s.category, "yes" if s.needs_layer else "-", "yes" if s.needs_contrast else "-",
                     f"{fwd} fwd + {bwd} bwd", s.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])


def cmd_study(args: argparse.Namespace) -> None:
    import storage
    from flows.study import study, task_runner
    from tasks import StudySpec, finished, freeze_params, plan, resolve_device

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    params: dict[str, dict[str, Any]] = {}
    for method, name, value in args.param:
        params.setdefault(method, {})[name] = value
    figure = args.figure or os.path.splitext(args.store.rstrip("/"))[0] + ".png"
    # Validate everything before the flow starts, so a bad argument is one clear line.
    resolve_device(args.device)
    task_runner(args.workers, args.dask_address, args.device)
    spec = StudySpec(dataset=args.dataset, model=args.model, methods=tuple(methods), samples=args.samples,
                     store=args.store, weights=args.weights, layer=args.layer, block_size=args.block_size,
                     device=args.device, params=freeze_params(params), dtype=args.dtype,
                     compression=args.compression, chunk_samples=args.chunk_samples, keep_images=args.keep_images,
                     contrast=args.contrast)
    p = plan(spec)  # raises on a bad argument or a store of another study
    if finished(p, args.store):
        # Nothing to compute: skip Prefect (and its temporary server) altogether.
        print(f"store:   {args.store} is complete: every block of {', '.join(methods)} is done")
        if figure.lower() != "none":
            from tasks import render

            print(f"figure:  {render(args.store, figure)}")
        return
    summary = study(dataset=args.dataset, model=args.model, methods=methods, samples=args.samples,
                    store=args.store, weights=args.weights, layer=args.layer, block_size=args.block_size,
                    device=args.device, params=params or None,
                    figure=None if figure.lower() == "none" else figure,
                    workers=args.workers, dask_address=args.dask_address, dtype=args.dtype,
                    compression=args.compression, chunk_samples=args.chunk_samples, keep_images=args.keep_images,
                    contrast=args.contrast)
    print(f"store:   {summary['store']}")
    if "figure" in summary:
        print(f"figure:  {summary['figure']}")
    if summary["accuracy"] is not None:
        print(f"model accuracy on these samples: {100 * summary['accuracy']:.2f}%")
    computed = sum(summary["computed_blocks"].values())
    total = summary["blocks"] * len(summary["computed_blocks"])
    print(f"attribution blocks: {computed} computed by this run, {total - computed} of {total} already done before")


def cmd_status(store: str) -> None:
    import storage

    st = storage.status(store)
    print(f"store    {st['path']}")
    print(f"model    {st['model']}  (fingerprint {str(st['model_fingerprint'])[:12]})")
    print(f"dataset  {st['dataset']}  (fingerprint {str(st['dataset_fingerprint'])[:12]})")
    print(f"samples  {st['samples']} in {st['blocks']} blocks; inputs ingested: {st['ingested']}/{st['blocks']}")
    per_map = st["bytes_per_map"]
    print(f"maps     {st['map_dtype']}, {st['compression']}; "
          + (f"{per_map / 1024:.1f} KiB stored per map" if per_map else "no map stored yet"))
    print("stored   " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in st["bytes_stored"].items()))
    width = max(len(m) for m in st["methods"])
    for m, done in st["methods"].items():
        bar = "#" * round(20 * done / st["blocks"])
        print(f"  {m.ljust(width)}  {done:>5}/{st['blocks']}  [{bar.ljust(20)}]")


def cmd_aggregate(args: argparse.Namespace) -> None:
    import storage

    if not storage.exists(args.store):
        raise FileNotFoundError(f"no study store at {args.store!r}: run `saliency-atlas study --store {args.store}` first")
    out = args.out or storage.default_out(args.store)
    agg = storage.aggregate(args.store, out, by=args.by)
    print(f"aggregate: {out}  ({int(agg.map_count_all.sum())} maps of {agg.attrs['samples']} samples x "
          f"{agg.sizes['xai_method']} methods counted; open with xr.open_zarr)")
    if args.plot:
        from tasks.aggregate_plot import plot_means

        for path in plot_means(agg, args.plot):
            print(f"plot:      {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import storage

    try:
        if args.command == "methods":
            cmd_methods()
        elif args.command == "study":
            cmd_study(args)
        elif args.command == "status":
            cmd_status(args.store)
        elif args.command == "figure":
            from tasks import render

            methods = args.methods.split(",") if args.methods else None
            print(render(args.store, args.out, args.samples, methods))
        elif args.command == "aggregate":
            cmd_aggregate(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError, storage.StoreMismatch) as e:
        if os.environ.get("SALIENCY_ATLAS_DEBUG"):
            raise  # the full traceback, for bug reports
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"saliency-atlas: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
