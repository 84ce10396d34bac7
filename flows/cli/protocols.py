"""The reliability protocols' commands: `sanity`, `invariance`, `manipulate`, `roar`."""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from .options import add_study_options, spec_from_args


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
        p.set_defaults(func=cmd_protocol)

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
