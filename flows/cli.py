"""The ``saliency-atlas`` command line."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import time
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
  saliency-atlas figure runs/shapes.zarr --samples 0,1,2 --out figure.png --shared-scale
  saliency-atlas clusters runs/shapes.zarr --method gradcam --class square
  saliency-atlas report runs/shapes.zarr --out runs/shapes.report
  saliency-atlas aggregate runs/shapes.zarr --plot runs/shapes.means.png
  saliency-atlas evaluate runs/shapes.zarr --metrics pointing_game,deletion,insertion
  saliency-atlas metrics
  saliency-atlas sanity --methods saliency,guided_backprop,gradcam --data-randomization --json
  saliency-atlas invariance --methods saliency,integrated_gradients --baseline shifted
  saliency-atlas manipulate --method saliency --target-map other --samples 8
  saliency-atlas roar --methods saliency,gradcam --fractions 0.1,0.5,0.9 --seeds 3 --workers 2

A study is resumable: run the same command again after an interruption and only
the blocks not yet done are computed. Open the result in Python with
  import xarray as xr; ds = xr.open_zarr("runs/shapes.zarr")
"""


EVALUATE_EXAMPLES = """\
examples:
  saliency-atlas evaluate runs/shapes.zarr --metrics pointing_game,relevance_mass,deletion,insertion
  saliency-atlas evaluate runs/shapes.zarr --metrics deletion --metric-param deletion.steps=16 --json
  saliency-atlas evaluate runs/shapes.zarr --metrics pointing_game --compare gradcam:saliency --by label

Metrics that need ground truth (pointing_game, relevance_mass, relevance_rank, outside_mask_share)
use the store's `mask`; region_share needs --metric-param region_share.region=[y0,x0,y1,x1].
"""

CLUSTER_EXAMPLES = """\
examples:
  saliency-atlas clusters runs/shapes.zarr --method gradcam
  saliency-atlas clusters runs/shapes.zarr --method gradcam --class square --json
  saliency-atlas clusters runs/audit.zarr --method gradcam --clusters 2 --recompute

Each cluster is listed with its size, the model's accuracy on it and the mean of every stored
metric over its maps; the figure shows its mean map and its most typical samples.
"""

STUDY_EXAMPLES = """\
examples:
  saliency-atlas study --methods saliency,gradcam --samples 128 --store runs/a.zarr
  saliency-atlas study ... --samples 512              # the same store grows: only the new samples run
  saliency-atlas study ... --param occlusion.window=8 --param occlusion.stride=4
  saliency-atlas study ... --workers 2                # a local Dask cluster of two processes

A killed study resumes with the same command; a store of another model, data or parameters
is refused, naming what differs, and left untouched.
"""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = [tuple(p.split(":")) for p in text.split(",") if p.strip()]
    if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
        raise argparse.ArgumentTypeError(f"expected A:B pairs of methods like gradcam:saliency, got {text!r}")
    return pairs  # type: ignore[return-value]


def _samples(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of samples or 'all', got {text!r}") from None


def _batch(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images per pass or 'auto', got {text!r}")
    return value


def _param(text: str) -> tuple[str, str, Any]:
    """METHOD.NAME=VALUE, the value read as JSON when it parses (8, 0.5, true, null, "x")."""
    key, sep, raw = text.partition("=")
    method, dot, name = key.partition(".")
    if not (sep and dot and method and name):
        raise argparse.ArgumentTypeError(f"expected OWNER.NAME=VALUE like occlusion.window=8 or deletion.steps=16, "
                                         f"got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return method, name, value


def fold_params(pairs: list[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    """Parsed OWNER.NAME=VALUE pairs (`_param`) as {OWNER: {NAME: VALUE}}, a later pair winning."""
    folded: dict[str, dict[str, Any]] = {}
    for owner, key, value in pairs:
        folded.setdefault(owner, {})[key] = value
    return folded


def _kv(text: str) -> tuple[str, Any]:
    """NAME=VALUE, the value read as JSON when it parses."""
    key, sep, raw = text.partition("=")
    if not (sep and key):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE like num_classes=10, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


STUDY_GROUPS = {
    "model": "your model: its factory's arguments, preprocessing and classes (default: the architecture's, "
             "or a model card beside the weights)",
    "layout": "layout of a new store (an existing store keeps its own)",
    "where": "where block tasks run (default: one at a time in this process)",
}
ARG_TYPES = {"names": _names, "samples": _samples, "batch": _batch, "ints": _int_list, "param": _param}


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.1,0.5, got {text!r}") from None


ARG_TYPES.update(floats=_floats, float=float)


def flag_of(name: str, options: dict[str, dataclasses.Field] | None = None) -> str:
    """How the command line spells option `name` (its own flag, else --name-with-dashes)."""
    if options is None:
        from tasks import OPTIONS as options
    return options[name].metadata["cli"].get("flag", "--" + name.replace("_", "-"))


def add_study_options(parser: argparse.ArgumentParser, options: dict[str, dataclasses.Field] | None = None) -> None:
    """One flag per field of `tasks.StudySpec` (or a protocol's spec), with its help text and default
    (the flow's form reads the same)."""
    if options is None:
        from tasks import OPTIONS as options

    used = {f.metadata["cli"].get("group") for f in options.values()}
    groups = {key: parser.add_argument_group(title) for key, title in STUDY_GROUPS.items() if key in used}
    where = groups["where"].add_mutually_exclusive_group() if "where" in groups else None
    for name, f in options.items():
        cli = dict(f.metadata["cli"])
        group = cli.pop("group", None)
        target = where if group == "where" else groups[group] if group else parser
        cli.pop("flag", None)
        flag = flag_of(name, options)
        kind = cli.pop("type", None)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):  # a switch that turns the default around
            action = "store_true" if cli.pop("switch_on", False) else "store_false"
            target.add_argument(flag, dest=name, action=action, help=cli.pop("switch", f.metadata["help"]))
        elif kind == "kv":
            target.add_argument(flag, dest=name, type=_kv, action="append", default=[], metavar="NAME=VALUE",
                                help=f"{f.metadata['help']} (repeatable)".replace("%", "%%"))
        elif kind == "param":
            owner = "METRIC" if name.startswith("metric") else "METHOD"
            example = "deletion.steps=16" if owner == "METRIC" else "occlusion.window=8"
            target.add_argument(flag, dest=name, type=_param, action="append", default=[],
                                metavar=f"{owner}.NAME=VALUE", help=f"a {owner.lower()} parameter, e.g. {example} "
                                                                    "(repeatable)")
        else:
            type_ = ARG_TYPES.get(kind) or (int if f.type in ("int", "int | None") else str)
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            text = f.metadata["help"].replace("%", "%%")  # argparse formats help strings with %
            target.add_argument(flag, dest=name, type=type_, default=default, help=f"{text} (default: {shown})", **cli)


def spec_from_args(cls: type, options: dict[str, dataclasses.Field], args: argparse.Namespace) -> Any:
    """The spec of parsed arguments: --param pairs folded into per-method dicts, the figure defaulted
    to the store path with .png ('none': no figure)."""
    values = {name: getattr(args, name) for name in options}
    for name, f in options.items():
        if f.metadata["cli"].get("type") == "param":
            values[name] = fold_params(values[name])
        elif f.metadata["cli"].get("type") == "kv":
            values[name] = dict(values[name])
    figure = values["figure"] or os.path.splitext(values["store"].rstrip("/"))[0] + ".png"
    return cls(**{**values, "figure": None if figure.lower() == "none" else figure})


def study_spec(args: argparse.Namespace) -> Any:
    """The `StudySpec` of parsed `study` arguments."""
    from tasks import OPTIONS, StudySpec

    return spec_from_args(StudySpec, OPTIONS, args)


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
                       description="Explain a model over a dataset with several attribution methods, block by "
                                   "block, into one resumable Zarr store. The same options are the parameters "
                                   "of the `study` flow in the Prefect UI.",
                       epilog=STUDY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_options(s)

    ev = sub.add_parser("evaluate", help="score a study's maps with evaluation metrics (adds only what is new)",
                        description="Score every stored map of a study with each metric, as resumable block tasks "
                                    "(the model passes are the metric's own; maps are read from the store), then "
                                    "print the mean and a 95%% bootstrap interval per method and metric, the "
                                    "baseline maps beside the methods, and paired comparisons.",
                        epilog=EVALUATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("store")
    ev.add_argument("--metrics", type=_names, required=True, help="comma-separated metrics (see `saliency-atlas metrics`)")
    ev.add_argument("--metric-param", dest="metric_params", type=_param, action="append", default=[],
                    metavar="METRIC.NAME=VALUE", help="a metric parameter, e.g. deletion.steps=16 (repeatable)")
    ev.add_argument("--no-baselines", dest="baselines", action="store_false",
                    help="do not add the baseline maps (random_map, centre_map, edge_map) to the store")
    ev.add_argument("--compare", type=_pairs, default=None, metavar="A:B[,C:D]",
                    help="paired comparisons to print (default: the first two methods, and each method against "
                         "random_map)")
    ev.add_argument("--by", choices=("label", "prediction"), default=None, help="also one row per class")
    ev.add_argument("--json", action="store_true", help="print {metric: {xai_method: mean}} only")
    ev.add_argument("--plot", default=None, metavar="PREFIX",
                    help="curve and score-distribution figures PREFIX.curves.png, PREFIX.scores.png "
                         "(default: the store path; 'none' for no figure)")
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ev.add_argument("--workers", type=int, default=None, help="score on a local Dask cluster of N processes")

    sub.add_parser("metrics", help="list the evaluation metrics, their family and cost")
    add_protocol_parsers(sub)

    st = sub.add_parser("status", help="blocks done per method, and the store's identity",
                        description="Blocks done per method, failed maps, scores, and the store's identity. "
                                    "--verify reads every finished block back and checks it against the "
                                    "checksum recorded with its flag; a damaged block (a chunk file truncated, "
                                    "deleted or overwritten) is named and marked not done, so that rerunning the "
                                    "study recomputes exactly those blocks. Exit status 1 when any was found.")
    st.add_argument("store")
    st.add_argument("--verify", action="store_true", help="check every finished block against its checksum")

    f = sub.add_parser("figure", help="draw inputs and heatmaps of chosen samples")
    f.add_argument("store")
    f.add_argument("--samples", type=_int_list, default=[0, 1, 2, 3], help="comma-separated sample positions")
    f.add_argument("--methods", default=None, help="comma-separated subset of the store's methods (default: all)")
    f.add_argument("--out", default="figure.png", help="output file (.png, .pdf, .svg)")
    f.add_argument("--shared-scale", action="store_true",
                   help="one colour scale per method's column (compare magnitudes down it); default: each map its own")

    c = sub.add_parser("clusters", help="the strategies of a model: SpRAy clusters of one method's maps per class",
                       description="Spectral relevance analysis (Lapuschkin et al. 2019): per true class, the "
                       "method's maps are downsampled, compared by shape in a k-nearest-neighbour graph and "
                       "clustered in its spectral embedding; the eigengap says how many groups the class "
                       "splits into. A cluster apart from the rest is a strategy only some images get (a "
                       "watermark, a background). The clusters are stored in the study (`cluster`, "
                       "`eigengap`) and reused while the store and the parameters stay the same.",
                       epilog=CLUSTER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("store")
    c.add_argument("--method", required=True, help="one of the store's methods")
    c.add_argument("--class", dest="classes", default=None, help="comma-separated true classes to show (default: all)")
    c.add_argument("--clusters", type=int, default=None, help="a fixed number of clusters (default: the eigengap's choice)")
    c.add_argument("--max-clusters", type=int, default=8, help="the most clusters the eigengap may choose")
    c.add_argument("--neighbours", type=int, default=10, help="k of the k-nearest-neighbour affinity graph")
    c.add_argument("--size", type=int, default=16, help="maps are downsampled to SIZE x SIZE before comparing")
    c.add_argument("--seed", type=int, default=0, help="seed of k-means in the embedding")
    c.add_argument("--recompute", action="store_true", help="recompute even when matching clusters are stored")
    c.add_argument("--figure", default=None, help="each cluster's mean map and typical samples (default: "
                   "STORE.clusters.METHOD.png; 'none': no figure)")
    c.add_argument("--json", action="store_true",
                   help='print {class: [{"cluster", "size", "sample_ids", "accuracy", "scores", "eigengap"}...]} only')

    r = sub.add_parser("report", help="one self-contained HTML page to browse a study (no server, no network)",
                       description="Writes DIR/index.html with everything inline: per method a grid of samples "
                       "with their maps, filtered by class, correct or incorrect prediction and a metric's range; "
                       "the metrics table with bootstrap intervals, the baseline maps beside the methods; the "
                       "deletion/insertion curves; the clusters stored by `clusters`; the figures of protocol "
                       "stores given with --protocol. Open it in any browser.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("store")
    r.add_argument("--out", default=None, help="output folder (default: the store path with .report)")
    r.add_argument("--max-samples", type=int, default=200,
                   help="samples shown in the grid (spread evenly over the study; the tables use all)")
    r.add_argument("--shared-scale", action="store_true", help="one colour scale per method over the grid")
    r.add_argument("--protocol", action="append", default=[], metavar="STORE",
                   help="a sanity / invariance / manipulate / roar store whose figure the report includes (repeatable)")

    ag = sub.add_parser("aggregate", help="mean/std maps per class and per correct/incorrect prediction (Dask, out of core)")
    ag.add_argument("store")
    ag.add_argument("--out", default=None, help="aggregate Zarr store (default: the study path with .agg.zarr)")
    ag.add_argument("--plot", default=None, metavar="PNG", help="also draw the mean maps (and correct vs incorrect) to this file")
    ag.add_argument("--by", choices=("label", "prediction"), default="label", help="group classes by the true label or the prediction")
    return p


PROTOCOLS = {
    "sanity": ("do the maps change when the model's layers or the labels are randomised? (Adebayo et al. 2018)",
               """examples:
  saliency-atlas sanity --methods saliency,guided_backprop,gradcam --samples 32 --json
  saliency-atlas sanity ... --data-randomization       # also retrain on permuted labels
  saliency-atlas sanity ... --study runs/shapes.zarr   # reuse the study's maps as the unrandomised ones

Layers are re-initialised from the logits down in the order they run, cascading (all layers down
to this one) and independent (this one alone); each map is compared with the original by Spearman
rank correlation (of |map| and of the signed map), SSIM and the correlation of HOG features.
A method whose maps stay similar when the model is destroyed does not explain the model."""),
    "invariance": ("does a map change under an input shift the model compensates? (Kindermans et al. 2019)",
                   """examples:
  saliency-atlas invariance --methods saliency,integrated_gradients --baseline zeros --json
  saliency-atlas invariance --methods integrated_gradients,deeplift --baseline shifted --json

The shifted model takes x + shift (in [0, 1] pixel units) and its first layer's bias absorbs
the shift, so both models compute the same function; invariant = relative L1 change of the maps
at most --tolerance."""),
    "manipulate": ("move a map to a target with an imperceptible input change (Dombrowski et al. 2019)",
                   """examples:
  saliency-atlas manipulate --method saliency --target-map other --samples 8 --json
  saliency-atlas manipulate --method gradcam --target-map corner --steps 300

The attack differentiates the map through a softplus copy of the model (--beta) and keeps the
output (--gamma); "defended" repeats it against the map of a softplus copy with a small beta
(--defence-beta), the defence the paper proposes."""),
    "roar": ("remove the top-ranked pixels, retrain, test: does accuracy fall faster than at random? (Hooker et al. 2019)",
             """examples:
  saliency-atlas roar --methods saliency,gradcam --fractions 0.1,0.5,0.9 --seeds 3 --json
  saliency-atlas roar ... --workers 2                 # retrains in parallel on a local Dask cluster

Each (method, fraction, seed) retrain is one resumable unit of the store; rerun to resume."""),
}


def add_protocol_parsers(sub: Any) -> None:
    from flows.protocols import SPECS
    from tasks.study import options_of

    for name, (summary, examples) in PROTOCOLS.items():
        p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ". The same options "
                           f"are the parameters of the `{name}` flow in the Prefect UI.", epilog=examples,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_study_options(p, options_of(SPECS[name]))
        p.add_argument("--json", action="store_true", help="print the result as JSON only")


def cmd_protocol(args: argparse.Namespace) -> None:
    from flows import protocols
    from tasks import invariance, manipulation, roar, sanity
    from tasks.study import options_of

    cls = protocols.SPECS[args.command]
    spec = spec_from_args(cls, options_of(cls), args)
    # Every argument is checked (and the store opened or refused) before the flow starts.
    {"sanity": sanity, "invariance": invariance, "manipulate": manipulation, "roar": roar}[args.command].open_store(spec)
    result = protocols.FLOWS[args.command](**dataclasses.asdict(spec))
    if args.json:
        print(json.dumps(result))
        return
    print(f"store:   {spec.store}")
    if spec.figure:
        print(f"figure:  {spec.figure}")
    print(json.dumps(result, indent=1))


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
    import dataclasses as dc

    from flows.study import study, task_runner
    from tasks import finished, plan

    spec = study_spec(args)
    # Validate everything before the flow starts, so a bad argument is one clear line.
    task_runner(spec.workers, spec.dask_address, spec.device)
    p = plan(spec)  # raises on a bad argument or a store of another study
    for problem in p.dataset.mask_problems:
        print(f"warning: {problem} (--strict refuses such masks)")
    if finished(p, spec.store):
        # Nothing to compute: skip Prefect (and its temporary server) altogether.
        print(f"store:   {spec.store} is complete: every block of {', '.join(spec.methods)} is done")
        if spec.figure:
            from tasks import render

            print(f"figure:  {render(spec.store, spec.figure, spec.figure_samples)}")
        return
    summary = study(**dc.asdict(spec))
    print(f"store:   {summary['store']}")
    for path in [summary.get("figure"), *summary.get("evaluation_figures", [])]:
        if path:
            print(f"figure:  {path}")
    if summary["accuracy"] is not None:
        print(f"model accuracy on these samples: {100 * summary['accuracy']:.2f}%")
    if summary["accuracy_warning"]:
        print(f"warning: {summary['accuracy_warning']}")
    if summary["skipped_files"]:
        print(f"skipped {len(summary['skipped_files'])} unreadable file(s): " + "; ".join(summary["skipped_files"]))
    computed = sum(summary["computed_blocks"].values())
    total = summary["blocks"] * len(summary["computed_blocks"])
    print(f"attribution blocks: {computed} computed by this run, {total - computed} of {total} already done before"
          + (f" or by another run meanwhile ({summary['skipped_blocks']} block tasks)" if summary["skipped_blocks"] else ""))
    if summary["failed_maps"]:
        print(f"failed maps: {summary['failed_maps']} (NaN in the store, with a code in `failure`; see status)")


def cmd_metrics() -> None:
    from xai_methods import metrics as xmet

    rows = [("name", "family", "needs", "better", "passes/image (64x64)", "what it is")]
    for name in xmet.available():
        s = xmet.spec(name)
        needs = "+".join(n for n, on in (("mask", s.needs_mask), ("model", s.needs_model), ("method", s.needs_method))
                         if on) or "-"
        cost = "-" if not s.needs_model else str(s.cost(dict(s.defaults), (64, 64)))
        rows.append((name, s.family, needs, "higher" if s.higher_is_better else "lower", cost, s.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])


def default_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """The first two methods against each other, and every method against random_map."""
    real = [m for m in methods if m not in ("random_map", "centre_map", "edge_map")]
    pairs = [(real[0], real[1])] if len(real) > 1 else []
    return pairs + [(m, "random_map") for m in real if "random_map" in methods]


def print_score_table(ds: Any, by: str | None, pairs: list[tuple[str, str]]) -> None:
    import storage
    from xai_methods import metrics as xmet

    rows = storage.score_table(ds, by=by)
    width = max(len(r["xai_method"]) for r in rows)
    for metric in dict.fromkeys(r["metric"] for r in rows):
        better = "higher" if xmet.spec(metric).higher_is_better else "lower"
        print(f"{metric} ({better} is better; mean [95% bootstrap interval], images scored)")
        for r in (r for r in rows if r["metric"] == metric):
            cls = "" if r["class"] == "all" else f" {r['class']}"
            undefined = sum(r["undefined"].values())
            note = f", {undefined} undefined {dict(r['undefined'])}" if undefined else ""
            print(f"  {(r['xai_method'] + cls).ljust(width + 10)} {r['mean']:.4f} [{r['low']:.4f}, {r['high']:.4f}]"
                  f"  n={r['n']}{note}")
    for c in storage.comparisons(ds, pairs):
        print(storage.describe_comparison(c))


def cmd_evaluate(args: argparse.Namespace) -> None:
    import dataclasses as dc

    import storage
    from flows.study import study, task_runner
    from tasks import finished, plan, spec_of_store

    spec = spec_of_store(args.store, metrics=args.metrics, metric_params=fold_params(args.metric_params),
                         baselines=args.baselines,
                         device=args.device, workers=args.workers)
    task_runner(spec.workers, spec.dask_address, spec.device)  # --workers, --device
    p = plan(spec)  # validates the metrics and their parameters before any work
    unknown = sorted({m for pair in args.compare or [] for m in pair} - set(spec.studied))
    if unknown:
        raise ValueError(f"--compare names {', '.join(unknown)}, not among the store's methods; valid: "
                         + ", ".join(spec.studied))
    if not finished(p, spec.store):
        study(**dc.asdict(spec))
    ds = storage.open_dataset(args.store)
    if args.json:
        print(json.dumps(storage.means(ds.sel(metric=list(args.metrics)))))
        return
    print_score_table(ds.sel(metric=list(args.metrics)), args.by, args.compare or default_pairs(spec.studied))
    if (args.plot or "").lower() != "none":
        from tasks.evaluation_plot import plot_evaluation

        prefix = args.plot or os.path.splitext(args.store.rstrip("/"))[0]
        for path in plot_evaluation(ds, prefix):
            print(f"figure:  {path}")


def cmd_clusters(args: argparse.Namespace) -> None:
    from tasks import clusters

    only = args.classes.split(",") if args.classes else None
    record = clusters.ensure(args.store, args.method, args.recompute, only=only, size=args.size,
                             neighbours=args.neighbours, max_clusters=args.max_clusters, clusters=args.clusters,
                             seed=args.seed)
    found = clusters.summarize(args.store, args.method, only)
    if args.json:
        print(json.dumps(found))
        return
    print(f"{args.method}: {record['maps']} maps clustered per true class ({record['size']}x{record['size']} "
          f"downsampled, {record['neighbours']}-nearest-neighbour graph)")
    for name, rows in found.items():
        gap = rows[0]["eigengap"] if rows else None
        print(f"\n{name}: {len(rows)} cluster(s), eigengap {gap}")
        for c in rows:
            scores = "  ".join(f"{k} {v:.3f}" for k, v in c["scores"].items() if v is not None)
            print(f"  cluster {c['cluster']}: {c['size']:>5} maps  accuracy {c['accuracy']}  {scores}")
            print(f"    e.g. {', '.join(c['sample_ids'][:4])}")
    figure = args.figure or f"{os.path.splitext(args.store.rstrip('/'))[0]}.clusters.{args.method}.png"
    if figure.lower() != "none":
        print(f"\nfigure:  {clusters.render_clusters(args.store, args.method, figure, only)}")


def cmd_report(args: argparse.Namespace) -> None:
    from tasks import report
    from tasks.audit import default_report_dir

    out = args.out or default_report_dir(args.store)
    print(f"report:  {report.write(args.store, out, max_samples=args.max_samples, shared_scale=args.shared_scale, protocols=args.protocol)}")


def cmd_protocol_status(store: str) -> None:
    import storage

    st = storage.ResultStore(store, mode="r").status()
    who = st["identity"]
    print(f"store    {st['path']}  ({st['protocol']} protocol)")
    print(f"model    {who.get('model')}  (fingerprint {str(who.get('model_fingerprint'))[:12]})")
    print(f"dataset  {who.get('dataset')}  (fingerprint {str(who.get('dataset_fingerprint'))[:12]})")
    for part, (done, total) in st["parts"].items():
        print(f"  {part.ljust(12)} {done:>5}/{total} units done  [{('#' * round(20 * done / max(total, 1))).ljust(20)}]")


def cmd_verify(store: str) -> int:
    import storage

    s = storage.Store(store)
    damaged = s.verify()
    blocks = int(s.group["ingested"][:].sum() + s.group["done"][:].sum())
    for d in damaged:
        what = "inputs" if d["kind"] == "samples" else f"{d['xai_method']} maps"
        print(f"damaged  block {d['block']} {what}: {d['why']}")
    if not damaged:
        print(f"verified {blocks} finished blocks: every one matches its checksum")
        return 0
    s.mark_damaged(damaged)
    print(f"verify   {len(damaged)} of {blocks} finished blocks damaged and marked not done; rerun the study "
          "(the same command) to recompute exactly them")
    return 1


def cmd_status(store: str, verify: bool = False) -> int | None:
    import storage

    if storage.is_result_store(store):
        if verify:
            raise ValueError(f"--verify checks study stores; {store!r} is a protocol store, which records no checksums")
        return cmd_protocol_status(store)
    st = storage.Store(store, mode="r").status()
    print(f"store    {st['path']}")
    print(f"model    {st['model']}  (fingerprint {str(st['model_fingerprint'])[:12]})")
    print(f"dataset  {st['dataset']}  (fingerprint {str(st['dataset_fingerprint'])[:12]})")
    print(f"samples  {st['samples']} in {st['blocks']} blocks; inputs ingested: {st['ingested']}/{st['blocks']}")
    a = storage.Store(store, mode="r").attrs
    print(f"input    {'x'.join(map(str, a['image_shape'][1:]))}, mean {a.get('image_mean')}, std {a.get('image_std')}"
          + (f" (model card {a['model_card']})" if a.get("model_card") else ""))
    from tasks.study import accuracy_warning

    if (warning := accuracy_warning(store)) is not None:
        print(f"warning  {warning}")
    for c in storage.holders(store):
        print(f"claimed  {c['unit']} by pid {c.get('pid')} on {c.get('host')} for {time.time() - c.get('since', 0):.0f} s "
              "(a run is computing it; the claim ends with that process)")
    if st.get("empty_masks"):
        print(f"masks    {st['empty_masks']} of the ingested samples have an empty mask (the localisation metrics leave "
              "them out); check the dataset's masks or boxes")
    per_map = st["bytes_per_map"]
    print(f"maps     {st['map_dtype']}, {st['compression']}; "
          + (f"{per_map / 1024:.1f} KiB stored per map" if per_map else "no map stored yet"))
    print("stored   " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in st["bytes_stored"].items()))
    width = max(len(m) for m in st["methods"])
    for m, done in st["methods"].items():
        bar = "#" * round(20 * done / st["blocks"])
        params = ", ".join(f"{k}={v}" for k, v in st["params"].get(m, {}).items())
        print(f"  {m.ljust(width)}  {done:>5}/{st['blocks']}  [{bar.ljust(20)}]  {params}")
    codes = json.loads(st.get("failure_codes") or "{}")
    for m, counts in st["failures"].items():
        print(f"  {m}: {sum(counts.values())} failed map(s), stored as NaN and left out of every score: "
              + "; ".join(f"{n} {codes.get(str(c), f'code {c}')}" for c, n in counts.items()))
    for metric, per_method in st["scored"].items():
        print(f"scored by {metric}: " + ", ".join(f"{m} {n}/{st['blocks']}" for m, n in per_method.items()))
    return cmd_verify(store) if verify else None


def cmd_aggregate(args: argparse.Namespace) -> None:
    import storage

    storage.Store(args.store, mode="r")  # no store, an unfinished one, a protocol's: one line that says which
    out = args.out or storage.default_out(args.store)
    agg = storage.aggregate(args.store, out, by=args.by)
    print(f"aggregate: {out}  ({int(agg.map_count_all.sum())} maps of {agg.attrs['samples']} samples x "
          f"{agg.sizes['xai_method']} methods counted; open with xr.open_zarr)")
    if args.plot:
        from tasks.aggregate_plot import plot_means

        for path in plot_means(agg, args.plot):
            print(f"plot:      {path}")


# What a user can do about each way a run differs from its store (storage names the difference).
MISMATCH_ADVICE = {
    "contrast": "use --contrast {stored}",
    "dataset_name": "use --dataset {stored}",
    "preprocessing": "give the store's preprocessing (`saliency-atlas status STORE` shows it)",
    "image_shape": "give the store's --input-size",
    "samples": "use --samples {stored} or more (a run may add samples after the stored ones, not drop them)",
    "block_size": "use --block-size {stored}",
    "schema_version": "an older store is read by xarray but not extended; start a new --store",
    "params": "use the store's parameters (`saliency-atlas status STORE` lists them)",
}


DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}
DISK_ADVICE = {errno.ENOSPC: "free space", errno.EDQUOT: "free space or raise the quota",
               errno.EROFS: "choose a writable --store", errno.EACCES: "choose a --store you can write to"}


def error_line(e: Exception, args: argparse.Namespace) -> str:
    """One line for the user: the problem, and what would be valid or what to do."""
    import storage

    if isinstance(e, storage.StoreMismatch):
        advice = [MISMATCH_ADVICE[d.what].format(stored=d.stored) for d in e.differences if d.what in MISMATCH_ADVICE]
        text = "; ".join([*advice, "or use a new --store path"])
        return f"{e} {text[0].upper()}{text[1:]}."
    if isinstance(e, FileNotFoundError) and "no study store" in str(e) and \
            getattr(args, "command", "") in ("evaluate", "status", "figure", "aggregate", "clusters", "report"):
        try:  # a file, or a folder of other things: say so, not "make one there" (the study would refuse it)
            storage.check_path(args.store, "study")
        except (FileExistsError, ValueError) as found:
            return f"{found}".replace("give a new path or an existing store", "give the path of a study store")
        return f"{e}: make one with `saliency-atlas study --store {args.store}`"
    if isinstance(e, ImportError):  # an fsspec URL whose backend is not installed
        return f"{e} (the store {getattr(args, 'store', None)!r} is at a URL whose fsspec backend is not installed here)"
    if isinstance(e, OSError) and e.errno in DISK_ERRORS:
        store = getattr(args, "store", None)
        return (f"{DISK_ERRORS[e.errno]} while writing {e.filename or store!r}; every block finished before "
                f"is kept (a block's flag is set only after its data): {DISK_ADVICE[e.errno]}, then rerun the same "
                "command to resume")
    message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    from tasks import OPTIONS

    command = getattr(args, "command", "")
    options = OPTIONS if command == "study" else {}
    if command in PROTOCOLS:
        from flows.protocols import SPECS
        from tasks.study import options_of

        options = options_of(SPECS[command])
    first = message.split(" ", 1)[0]
    if first in options:  # the option as this command spells it
        message = flag_of(first, options) + message[len(first):]
    return message


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, systemd and Kubernetes send), raised like Ctrl-C's KeyboardInterrupt so that the
    run stops the same way: the unit in flight finishes, the processes the run started are stopped (Prefect's
    temporary server at exit, a local Dask cluster as its runner closes) and the finished blocks are kept."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def stopped_line(args: argparse.Namespace, e: KeyboardInterrupt) -> str:
    """What a stopped command says: which signal, how far the store got, and how to resume."""
    how = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C (SIGINT)"
    store = getattr(args, "store", None)
    progress = ""
    if args.command in ("study", "evaluate") and store:
        import storage

        try:
            st = storage.Store(store, mode="r").status()
        except (ValueError, OSError):
            st = None
        if st is not None:
            progress = (f" ({st['ingested']}/{st['blocks']} blocks ingested; maps "
                        + ", ".join(f"{m} {n}/{st['blocks']}" for m, n in st["methods"].items()) + ")")
        return (f"stopped by {how}; every finished block is kept in {store}{progress}: run the same command again to "
                "resume")
    return f"stopped by {how} before it finished: run the same command again"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("study", "evaluate", *PROTOCOLS):  # before the flow starts its threads
        from tasks.memory import retain_freed_memory

        retain_freed_memory()
    import signal
    import threading

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        return run_command(args)
    except KeyboardInterrupt as e:
        print(f"saliency-atlas: {stopped_line(args, e)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def run_command(args: argparse.Namespace) -> int:
    try:
        if args.command == "methods":
            cmd_methods()
        elif args.command == "study":
            cmd_study(args)
        elif args.command == "evaluate":
            cmd_evaluate(args)
        elif args.command == "metrics":
            cmd_metrics()
        elif args.command == "status":
            return cmd_status(args.store, args.verify) or 0
        elif args.command == "figure":
            from tasks import render

            methods = args.methods.split(",") if args.methods else None
            print(render(args.store, args.out, args.samples, methods, shared_scale=args.shared_scale))
        elif args.command == "clusters":
            cmd_clusters(args)
        elif args.command == "report":
            cmd_report(args)
        elif args.command == "aggregate":
            cmd_aggregate(args)
        elif args.command in PROTOCOLS:
            cmd_protocol(args)
    except (ValueError, TypeError, KeyError, OSError, ImportError) as e:
        if os.environ.get("SALIENCY_ATLAS_DEBUG"):
            raise  # the full traceback, for bug reports
        print(f"saliency-atlas: error: {error_line(e, args)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
