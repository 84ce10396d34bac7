"""`evaluate` and `metrics`: score a study's maps, and what can score them."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .options import _names, _pairs, _param, fold_params, print_rows


EVALUATE_EXAMPLES = """\
examples:
  saliency-atlas evaluate runs/shapes.zarr --metrics pointing_game,relevance_mass,deletion,insertion
  saliency-atlas evaluate runs/shapes.zarr --metrics deletion --metric-param deletion.steps=16 --json
  saliency-atlas evaluate runs/shapes.zarr --metrics pointing_game --compare gradcam:saliency --by label
  saliency-atlas evaluate runs/shapes.zarr --metrics deletion,pointing_game --variants

--variants also scores each metric's parameter variants (deletion over substrates and step counts, ROAD
over fractions, pointing game over tolerances...: `saliency-atlas metrics` lists them), stored beside it
as metrics named like deletion[substrate=blur], and says whether the metric ranks the methods alike
over them (its internal consistency; `saliency-atlas rank` has each variant's agreement).

Metrics that need ground truth (pointing_game, relevance_mass, relevance_rank, outside_mask_share)
use the store's `mask`; region_share needs --metric-param region_share.region=[y0,x0,y1,x1].
"""

def cmd_metrics() -> None:
    from xai_methods import catalogue, variants

    rows = [("name", "family", "needs", "better", "passes/image (64x64)", "variants of", "what it is")]
    for m in catalogue.load()["metrics"]:
        needs = "+".join(n for n in ("mask", "model", "method") if m[f"needs_{n}"]) or "-"
        rows.append((m["name"], m["family"], needs, "higher" if m["higher_is_better"] else "lower",
                     "-" if m["passes"] is None else str(m["passes"]), ",".join(dict.fromkeys(k for v in m["variants"] for k in variants.parse(v)[1])) or "-", m["summary"]))
    print_rows(rows)

def default_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """The first two methods against each other, and every method against random_map."""
    from tasks.study import BASELINE_MAPS

    real = [m for m in methods if m not in BASELINE_MAPS]
    pairs = [(real[0], real[1])] if len(real) > 1 else []
    return pairs + [(m, "random_map") for m in real if "random_map" in methods]

def print_score_table(ds: Any, by: str | None, pairs: list[tuple[str, str]]) -> None:
    import storage
    from xai_methods import metrics as xmet

    ds = ds.assign(score=ds.score.load(), score_status=ds.score_status.load())  # read once: the table, then pairs
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

def params_variants(metrics: list[str]) -> list[str]:
    """The standard parameter variants of `metrics` (`saliency-atlas metrics` lists them), refusing a list
    without any."""
    from xai_methods import catalogue

    found = [v for m in metrics for v in catalogue.metric(m)["variants"]]
    if not found:
        having = [m["name"] for m in catalogue.load()["metrics"] if m["variants"]]
        raise ValueError(f"--variants: none of {', '.join(metrics)} has parameter variants; those that do: "
                         + ", ".join(having))
    return found


def variant_params(names: list[str], params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The parameters the user gave a metric, for each of its variants `names` too (less the one the variant
    sets), so that a variant differs from its metric in its own parameter only."""
    from xai_methods import variants

    out = {}
    for v in names:
        own = variants.parse(v)[1]
        given = {k: x for k, x in params.get(variants.base(v), {}).items() if k not in own}
        if given:
            out[v] = given
    return out


def cmd_evaluate(args: argparse.Namespace) -> None:
    import storage
    from flows.study import run, task_runner
    from tasks import plan, spec_of_store
    from tasks.study.spec import BASELINE_MAPS, baseline_choice

    baselines = args.baselines if args.baselines is not None else baseline_choice(args.store)
    params, extra = fold_params(args.metric_params), params_variants(args.metrics) if args.variants else []
    if extra:
        params.update(variant_params(extra, params))
    spec = spec_of_store(args.store, metrics=[*args.metrics, *extra], metric_params=params,
                         baselines=baselines is not False, device=args.device, workers=args.workers)
    task_runner(spec.workers, spec.dask_address, spec.device)  # --workers, --device
    p = plan(spec)  # validates the metrics and their parameters before any work
    unknown = sorted({m for pair in args.compare or [] for m in pair} - set(spec.studied))
    if unknown:
        raise ValueError(f"--compare names {', '.join(unknown)}, not among the store's methods; valid: "
                         + ", ".join(spec.studied))
    added = [m for m in spec.studied if m in BASELINE_MAPS and m not in spec.methods]
    if added:  # said before any work: they are maps the user did not name
        print(f"adding the baseline maps {', '.join(added)} beside the store's methods, so that every score reads "
              "against chance (--no-baselines: leave them out)", flush=True)
    if extra:
        print(f"scoring {len(extra)} parameter variants beside {', '.join(args.metrics)}: {', '.join(extra)}", flush=True)
    run(spec, p)  # nothing when the store holds every score already
    ds = storage.open_dataset(args.store)
    if args.json:
        print(json.dumps(storage.means(ds.sel(metric=[*args.metrics, *extra]))))
        return
    show_evaluation(ds, args, extra, args.compare or default_pairs(spec.studied))


def show_evaluation(ds: Any, args: argparse.Namespace, extra: list[str], pairs: list[tuple[str, str]]) -> None:
    """`evaluate`'s output: the table of `args.metrics` with the paired comparisons, the variants' table, how far
    to trust them (`tasks.meta.trust`), and the figures."""
    from tasks import meta

    print_score_table(ds.sel(metric=list(args.metrics)), args.by, pairs)
    if extra:
        print("\nthe parameter variants:")
        print_score_table(ds.sel(metric=extra), args.by, [])
    print("\n".join(meta.trust(meta.rank(ds, args.metrics))))
    if (args.plot or "").lower() != "none":
        from tasks.drawing.evaluation import plot_evaluation

        prefix = args.plot or os.path.splitext(args.store.rstrip("/"))[0]
        for path in plot_evaluation(ds, prefix):
            print(f"figure:  {path}")


def add_parsers(sub: Any) -> None:
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
    ev.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                    help="add the baseline maps (random_map, centre_map, edge_map) to the store, or not (default: "
                         "as the store was scored before; a store never scored gets them, saying so first)")
    ev.add_argument("--compare", type=_pairs, default=None, metavar="A:B[,C:D]",
                    help="paired comparisons to print (default: the first two methods, and each method against "
                         "random_map)")
    ev.add_argument("--by", choices=("label", "prediction"), default=None, help="also one row per class")
    ev.add_argument("--variants", action="store_true",
                    help="also score each metric's parameter variants and measure its internal consistency")
    ev.add_argument("--json", action="store_true", help="print {metric: {xai_method: mean}} only")
    ev.add_argument("--plot", default=None, metavar="PREFIX",
                    help="curve and score-distribution figures PREFIX.curves.png, PREFIX.scores.png "
                         "(default: the store path; 'none' for no figure)")
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ev.add_argument("--workers", type=int, default=None, help="score on a local Dask cluster of N processes")

    ev.set_defaults(func=cmd_evaluate, computes=True)
    sub.add_parser("metrics", help="list the evaluation metrics, their family and cost").set_defaults(
        func=lambda args: cmd_metrics())
