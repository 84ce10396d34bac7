"""The reliability protocols' room: one module per protocol (its spec, `open_store`, `stages`, tasks and
`summary`), what they share (`common`), their figures (`plot`), and `PROTOCOLS`, the one table that the
flows, the command line, the report and the Prefect UI's forms read.

Adding a protocol is one module, its spec in `specs` and one row here: the flow, the command
(`saliency-atlas NAME`), its `--help`, the form, the figure in `report --protocol` and `status` follow from
the row. The table and the specs are light to import (`--help` reads them); a row imports its module, and
with it torch, when its work is first asked for."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .._lazy import exports
from . import specs
from .specs import ProtocolSpec

if TYPE_CHECKING:
    from .common import Opened, Stage

__getattr__ = exports(__name__, {
    **{name: name for name in ("common", "invariance", "manipulation", "plot", "resilience", "roar", "sanity")},
    **dict.fromkeys(("Opened", "Stage", "UnitReceipt", "opened"), "common"),
})


@dataclass(frozen=True)
class Protocol:
    """One protocol: its name (the command and the flow), its options, the module that opens its store and
    lays out its work in stages (`open_store`, `stages`) and gives its `--json` summary (`summary`), its
    figure (a function of `plot`), and its help (a line, then examples and notes)."""

    name: str
    spec: type[ProtocolSpec]
    module: str
    figure: str
    help: str
    examples: str

    def _work(self) -> Any:
        return importlib.import_module(f"{__name__}.{self.module}")

    @property
    def open_store(self) -> Callable[[Any], Opened]:
        return self._work().open_store

    @property
    def stages(self) -> Callable[[Any, Opened], list[Stage]]:
        return self._work().stages

    @property
    def summary(self) -> Callable[[str], dict[str, Any]]:
        return self._work().summary

    @property
    def plot(self) -> Callable[[str, str], str]:
        return getattr(importlib.import_module(f"{__name__}.plot"), self.figure)

    def opened(self, spec: ProtocolSpec) -> Opened:
        """The store opened once per process for `spec` (`common.opened`)."""
        from .common import opened

        return opened(spec, self.open_store)


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    Protocol("sanity", specs.SanitySpec, "sanity", "plot_sanity",
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
    Protocol("invariance", specs.InvarianceSpec, "invariance", "plot_invariance",
             "does a map change under an input shift the model compensates? (Kindermans et al. 2019)",
             """examples:
  saliency-atlas invariance --methods saliency,integrated_gradients --baseline zeros --json
  saliency-atlas invariance --methods integrated_gradients,deeplift --baseline shifted --json

The shifted model takes x + shift (in [0, 1] pixel units) and its first layer's bias absorbs
the shift, so both models compute the same function; invariant = relative L1 change of the maps
at most --tolerance."""),
    Protocol("manipulate", specs.ManipulateSpec, "manipulation", "plot_manipulation",
             "move a map to a target with an imperceptible input change (Dombrowski et al. 2019)",
             """examples:
  saliency-atlas manipulate --method saliency --target-map other --samples 8 --json
  saliency-atlas manipulate --method gradcam --target-map corner --steps 300

The attack differentiates the map through a softplus copy of the model (--beta) and keeps the
output (--gamma); "defended" repeats it against the map of a softplus copy with a small beta
(--defence-beta), the defence the paper proposes."""),
    Protocol("roar", specs.RoarSpec, "roar", "plot_roar",
             "remove the top-ranked pixels, retrain, test: does accuracy fall faster than at random? (Hooker et al. 2019)",
             """examples:
  saliency-atlas roar --methods saliency,gradcam --fractions 0.1,0.5,0.9 --seeds 3 --json
  saliency-atlas roar ... --workers 2                 # retrains in parallel on a local Dask cluster

Each (method, fraction, seed) retrain is one resumable unit of the store; rerun to resume."""),
    Protocol("resilience", specs.ResilienceSpec, "resilience", "plot_resilience",
             "is a metric resilient to what should not change its scores, and reactive to what should? (MetaQuantus)",
             """examples:
  saliency-atlas resilience --methods saliency,gradcam,input_x_gradient --metrics pointing_game,deletion --json
  saliency-atlas resilience ... --draws 5 --input-noise 0.02 --weight-noise 0.01
  saliency-atlas resilience --dataset DIR --model my.pkg:net --weights w.pt --metrics "deletion[substrate=blur]"

Every method's maps are scored by every metric, then again after minor perturbations that should not
change the scores (input noise, weight noise that keeps the predictions: only the images whose class
they keep count) and disruptive ones that should (a randomised model, maps shuffled across images).
Per metric and family (input, model), MetaQuantus's criteria: IAC_NR, the Wilcoxon p-value of the
scores before and after a minor perturbation (high: unmoved); IAC_AR, 1 - that p under a disruptive
one; IEC_NR, the share of the methods' order kept; IEC_AR, the share of scores that got worse; MC,
their mean (1 is best). The --json has the forward passes it costs, per stage; each (test, draw) is
one resumable unit."""),
]}

__all__ = ["PROTOCOLS", "Opened", "Protocol", "ProtocolSpec", "Stage", "UnitReceipt", "invariance", "manipulation",
           "plot", "resilience", "roar", "sanity", "specs"]
