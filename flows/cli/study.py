"""`methods` and `study`: what can explain, and a study into a resumable store."""
from __future__ import annotations

import argparse
from typing import Any

from .options import add_study_options, print_rows, spec_from_args


STUDY_EXAMPLES = """\
examples:
  saliency-atlas study --methods saliency,gradcam --samples 128 --store runs/a.zarr
  saliency-atlas study ... --samples 512              # the same store grows: only the new samples run
  saliency-atlas study ... --param occlusion.window=8 --param occlusion.stride=4
  saliency-atlas study ... --workers 2                # a local Dask cluster of two processes
  saliency-atlas study ... --samples all --dry-run     # its passes and bytes, before starting it

A killed study resumes with the same command; a store of another model, data or parameters
is refused, naming what differs, and left untouched.
"""

def study_spec(args: argparse.Namespace) -> Any:
    """The `StudySpec` of parsed `study` arguments."""
    from tasks import OPTIONS, StudySpec

    return spec_from_args(StudySpec, OPTIONS, args)

def cmd_methods() -> None:
    from xai_methods import catalogue

    rows = [("name", "category", "layer", "contrast", "passes/image (64x64)", "what it is")]
    for m in sorted(catalogue.load()["methods"], key=lambda m: m["name"]):
        fwd, bwd = m["passes"]
        rows.append((m["name"], m["category"], "yes" if m["needs_layer"] else "-",
                     "yes" if m["needs_contrast"] else "-", f"{fwd} fwd + {bwd} bwd", m["summary"]))
    print_rows(rows)
    print("\nand any method of a peer, run through its own library (--param NAME.PARAM=VALUE as for the others):\n"
          "  captum:CLASS (captum:IntegratedGradients, captum:LayerGradCam...), gradcam:CLASS (gradcam:ScoreCAM...),\n"
          "  zennit:COMPOSITE (zennit:EpsilonPlusFlat...), package.module:function (fn(model, images, target, **params)\n"
          "  -> (B, H, W) maps)")

def cmd_study(args: argparse.Namespace) -> None:
    from flows.study import run, task_runner
    from tasks import plan

    spec = study_spec(args)
    # Validate everything before the flow starts, so a bad argument is one clear line.
    task_runner(spec.workers, spec.dask_address, spec.device)
    p = plan(spec)  # raises on a bad argument or a store of another study
    for problem in p.dataset.mask_problems:
        print(f"warning: {problem} (--strict refuses such masks)")
    if args.dry_run:  # the plan's size, and nothing written
        from tasks.study.estimate import describe_estimate, estimate

        print("\n".join(describe_estimate(estimate(p.template))))
        print(f"store:   {spec.store} " + ("exists: only what it lacks would run" if p.exists else "would be created"))
        return
    summary = run(spec, p)
    if summary is None:  # nothing to compute: Prefect (and its temporary server) skipped altogether
        print(f"store:   {spec.store} is complete: every block of {', '.join(spec.methods)} is done")
        if spec.figure:
            from tasks import render

            print(f"figure:  {render(spec.store, spec.figure, spec.figure_samples)}")
        return
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


def add_parsers(sub: Any) -> None:
    sub.add_parser("methods", help="list the attribution methods, their category and cost").set_defaults(
        func=lambda args: cmd_methods())

    s = sub.add_parser("study", help="explain a model over a dataset into a resumable Zarr store",
                       description="Explain a model over a dataset with several attribution methods, block by "
                                   "block, into one resumable Zarr store. The same options are the parameters "
                                   "of the `study` flow in the Prefect UI.",
                       epilog=STUDY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_options(s)
    s.add_argument("--dry-run", action="store_true",
                   help="check every option, then print the passes of the model and the bytes the study would take "
                        "(to size a large run) and stop: nothing is written")
    s.set_defaults(func=cmd_study, computes=True)

