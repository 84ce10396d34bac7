"""The reliability protocols' room: one module per protocol (its spec, `open_store`, `stages`, tasks and
`summary`), what they share (`common`), their figures (`plot`), and `PROTOCOLS`, the one table that the
flows, the command line, the report and the Prefect UI's forms read.

Adding a protocol is one module and one row here: the flow, the command (`saliency-atlas NAME`), its
`--help`, the form, the figure in `report --protocol` and `status` follow from the row."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import invariance, manipulation, plot, roar, sanity
from .common import Opened, ProtocolSpec, Stage, UnitReceipt, opened


@dataclass(frozen=True)
class Protocol:
    """One protocol: its name (the command and the flow), its options, how its store is opened and its work
    laid out in stages, its `--json` summary and its figure, and its help (a line, then examples and notes)."""

    name: str
    spec: type[ProtocolSpec]
    open_store: Callable[[Any], Opened]
    stages: Callable[[Any, Opened], list[Stage]]
    summary: Callable[[str], dict[str, Any]]
    plot: Callable[[str, str], str]
    help: str
    examples: str

    def opened(self, spec: ProtocolSpec) -> Opened:
        """The store opened once per process for `spec` (`common.opened`)."""
        return opened(spec, self.open_store)


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    Protocol("sanity", sanity.SanitySpec, sanity.open_store, sanity.stages, sanity.summary, plot.plot_sanity,
             "do the maps change when the model's layers or the labels are randomised? (Adebayo et al. 2018)",
             """examples:
  saliency-atlas sanity --methods saliency,guided_backprop,gradcam --samples 32 --json
  saliency-atlas sanity ... --data-randomization       # also retrain on permuted labels
  saliency-atlas sanity ... --study runs/shapes.zarr   # reuse the study's maps as the unrandomised ones
  saliency-atlas sanity --model my.pkg:net --weights w.pt --input-size 112 --mean 0.5,0.5,0.5 --std 0.2,0.2,0.2

Layers are re-initialised from the logits down in the order they run, cascading (all layers down
to this one) and independent (this one alone); each map is compared with the original by Spearman
rank correlation (of |map| and of the signed map), SSIM and the correlation of HOG features.
A method whose maps stay similar when the model is destroyed does not explain the model.
Each randomised model is one resumable unit; --workers / --dask-address spread them."""),
    Protocol("invariance", invariance.InvarianceSpec, invariance.open_store, invariance.stages, invariance.summary,
             plot.plot_invariance,
             "does a map change under an input shift the model compensates? (Kindermans et al. 2019)",
             """examples:
  saliency-atlas invariance --methods saliency,integrated_gradients --baseline zeros --json
  saliency-atlas invariance --methods integrated_gradients,deeplift --baseline shifted --json

The shifted model takes x + shift (in [0, 1] pixel units) and its first layer's bias absorbs
the shift, so both models compute the same function; invariant = relative L1 change of the maps
at most --tolerance."""),
    Protocol("manipulate", manipulation.ManipulateSpec, manipulation.open_store, manipulation.stages,
             manipulation.summary, plot.plot_manipulation,
             "move a map to a target with an imperceptible input change (Dombrowski et al. 2019)",
             """examples:
  saliency-atlas manipulate --method saliency --target-map other --samples 8 --json
  saliency-atlas manipulate --method gradcam --target-map corner --steps 300

The attack differentiates the map through a softplus copy of the model (--beta) and keeps the
output (--gamma); "defended" repeats it against the map of a softplus copy with a small beta
(--defence-beta), the defence the paper proposes."""),
    Protocol("roar", roar.RoarSpec, roar.open_store, roar.stages, roar.summary, plot.plot_roar,
             "remove the top-ranked pixels, retrain, test: does accuracy fall faster than at random? (Hooker et al. 2019)",
             """examples:
  saliency-atlas roar --methods saliency,gradcam --fractions 0.1,0.5,0.9 --seeds 3 --json
  saliency-atlas roar ... --workers 2                 # retrains in parallel on a local Dask cluster

Each (method, fraction, seed) retrain is one resumable unit of the store; rerun to resume."""),
]}

__all__ = ["PROTOCOLS", "Opened", "Protocol", "ProtocolSpec", "Stage", "UnitReceipt", "invariance", "manipulation",
           "plot", "roar", "sanity"]
