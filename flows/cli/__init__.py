"""The ``saliency-atlas`` command line: one module per group of commands, each adding its parsers and
setting the function that runs it (`func`); this module builds the parser, runs the command, and turns
errors and signals into one line."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from .errors import error_line
from .options import _batch, add_study_options, flag_of, fold_params, spec_from_args
from .study import study_spec

# what scripts and tests import from here (the modules own them)
__all__ = ["main", "build_parser", "run_command", "error_line", "study_spec", "spec_from_args", "add_study_options",
           "flag_of", "fold_params", "_batch", "Terminated"]

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
  saliency-atlas rank runs/shapes.zarr --json
  saliency-atlas sanity --methods saliency,guided_backprop,gradcam --data-randomization --json
  saliency-atlas invariance --methods saliency,integrated_gradients --baseline shifted
  saliency-atlas manipulate --method saliency --target-map other --samples 8
  saliency-atlas roar --methods saliency,gradcam --fractions 0.1,0.5,0.9 --seeds 3 --workers 2

A study is resumable: run the same command again after an interruption and only
the blocks not yet done are computed. Open the result in Python with
  import xarray as xr; ds = xr.open_zarr("runs/shapes.zarr")
"""


def build_parser() -> argparse.ArgumentParser:
    from . import evaluate, protocols, rank, stores, study

    p = argparse.ArgumentParser(
        prog="saliency-atlas",
        description="Compute, store and compare attribution maps (saliency) of image classifiers over whole datasets.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    study.add_parsers(sub)
    evaluate.add_parsers(sub)
    rank.add_parsers(sub)
    protocols.add_protocol_parsers(sub)
    stores.add_parsers(sub)
    return p


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
    if getattr(args, "computes", False):  # a command that runs a flow: before the flow starts its threads
        from tasks.study.memory import retain_freed_memory

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
        return args.func(args) or 0
    except BrokenPipeError:  # `saliency-atlas methods | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python exits
        return 0
    except (ValueError, TypeError, KeyError, OSError, ImportError) as e:
        if os.environ.get("SALIENCY_ATLAS_DEBUG"):
            raise  # the full traceback, for bug reports
        print(f"saliency-atlas: error: {error_line(e, args)}", file=sys.stderr)
        return 2
