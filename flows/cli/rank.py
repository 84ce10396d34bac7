"""`rank`: which method and which metric to believe, from a study's stored scores (`tasks.meta`)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from .options import _names

RANK_EXAMPLES = """\
examples:
  saliency-atlas rank runs/shapes.zarr
  saliency-atlas rank runs/shapes.zarr --metrics pointing_game,deletion,insertion --json
  saliency-atlas rank runs/shapes.zarr --boot 2000 --seed 1
  saliency-atlas rank runs/shapes.zarr --methods gradcam,saliency,occlusion   # without the baseline maps

Per metric: each method's rank by mean score (1 = best) with a 95% bootstrap interval over images and
the share of resamples in which it comes first; the groups the data cannot tell apart (Friedman's test
over images, then Nemenyi's at 0.05); the methods that do not beat random_map; the metric's reliability
(Krippendorff's alpha, images as raters of the methods: 0.8 and up reliable, 0.667 tentative, below not),
and, for a metric scored with its variants (`evaluate --variants`), its internal consistency over them.
Then the consensus over metrics (mean rank, and its spread: the metrics' disagreement) and Kendall's tau
between every two metrics' orderings of the methods. Nothing is computed but statistics of the scores.
"""


def cmd_rank(args: argparse.Namespace) -> None:
    import storage
    from tasks import meta

    ds = storage.open_dataset(args.store)
    if args.methods:
        unknown = [m for m in args.methods if m not in ds.xai_method.values]
        if unknown:
            raise ValueError(f"--methods names {', '.join(unknown)}, not in the store; it has "
                             + ", ".join(map(str, ds.xai_method.values)))
        ds = ds.sel(xai_method=args.methods)
    result = meta.rank(ds, args.metrics, n_boot=args.boot, seed=args.seed)
    if args.json:
        print(json.dumps(result))
        return
    for line in describe(result):
        print(line)
    if args.plot:
        from tasks.drawing.agreement import plot_agreement

        print(f"figure:  {plot_agreement(result, args.plot) or 'none (one metric: nothing to agree)'}")


def describe(r: dict[str, Any]) -> list[str]:
    """The meta-evaluation `r` (`tasks.meta.rank`) as the lines `rank` prints."""
    from xai_methods import catalogue

    lines = []
    for k, ranking in r["ranking"].items():
        better = "higher" if catalogue.metric(k)["higher_is_better"] else "lower"
        test, rel = r["tests"][k], r["reliability"][k]
        p = "" if test["p"] is None else f", p = {test['p']:.2g}"
        n = next(iter(ranking.values()))["n"]
        lines.append(f"{k} ({better} is better; {n} images scored by every method; {test['test']}{p})")
        for m, v in sorted(ranking.items(), key=lambda kv: (kv[1]["rank"] is None, kv[1]["rank"])):
            if v["rank"] is None:
                continue
            flag = "" if r["beats_random"][k].get(m) is not False else "  does not beat random_map"
            lines.append(f"  {v['rank']:>4g} [{v['low']:g}, {v['high']:g}]  {m:<24} P(first) {v['p_first']:.2f}{flag}")
        tied = [g for g in r["groups"][k] if len(g) > 1]
        if tied:
            lines.append("  cannot be told apart: " + "; ".join("{" + ", ".join(g) + "}" for g in tied))
        alpha = "-" if rel["alpha"] is None else f"{rel['alpha']:.2f}"
        lines.append(f"  reliability: alpha {alpha} ({rel['images']} images as raters): {rel['verdict']}")
        if "internal" in rel:
            inner = rel["internal"]
            lines.append(f"  internal consistency over its parameter variants: alpha "
                         f"{'-' if inner['alpha'] is None else format(inner['alpha'], '.2f')}: {inner['verdict']}")
            lines.extend(f"    {v}: tau {_tau(a)} against {k}'s ordering" for v, a in inner["variants"].items())
    order = sorted(r["consensus"].items(), key=lambda kv: (kv[1]["mean_rank"] is None, kv[1]["mean_rank"]))
    lines.append(f"consensus over {len(r['ranking'])} metrics (mean rank +- spread, the metrics' disagreement):")
    lines.append("  " + ", ".join(f"{m} {v['mean_rank']:.2f} +- {v['spread']:.2f}" for m, v in order
                                  if v["mean_rank"] is not None))
    if r["agreement"]:
        lines.append("agreement (Kendall's tau of two metrics' orderings of the methods, 95% interval):")
        for pair, a in r["agreement"].items():
            lines.append(f"  {pair.replace('|', ' ~ ')}: {_tau(a)}")
    return lines


def _tau(a: dict[str, Any]) -> str:
    """A Kendall tau with its interval, as `rank` prints it."""
    return "-" if a["tau"] is None else f"{a['tau']:+.2f} [{a['low']:+.2f}, {a['high']:+.2f}]"


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("rank", help="which method and which metric to believe: rankings with intervals, metric "
                                    "agreement and reliability", description="Meta-evaluate a study's stored scores: "
                       "rankings with their uncertainty, groups the data cannot tell apart, the consensus and "
                       "disagreement of the metrics, and each metric's reliability.", epilog=RANK_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    p.add_argument("--metrics", type=_names, default=None, help="comma-separated metrics (default: every scored one)")
    p.add_argument("--methods", type=_names, default=None,
                   help="comma-separated methods to rank (default: every one, the baseline maps included)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the images (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resamples (default 0)")
    p.add_argument("--json", action="store_true", help="print the one JSON object other tools read")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the metrics' agreement (Kendall's tau, "
                   "clustered, each metric with its alpha) to this file")
    p.set_defaults(func=cmd_rank)
