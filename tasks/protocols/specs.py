"""The protocols' options, one frozen dataclass of `option` fields per protocol, deriving from `RunSpec` like
`StudySpec`: the flow's signature (the Prefect form), the command line's flags and the validation derive
from each. Light to import (no torch): `--help` and the Prefect form read them; each protocol's module
does the work."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from xai_methods import catalogue

from ..spec import RunSpec, option

if TYPE_CHECKING:
    import torch

    import zoo

TARGET_MAPS = ("other", "corner")  # what `manipulate` moves a map to


@dataclass(frozen=True)
class ProtocolSpec(RunSpec):
    """The options every protocol has beyond a run's: how many images, the seed and the figure (each
    protocol adds its methods and store)."""

    samples: int = option(32, "how many images of the dataset (its first ones) are explained")
    seed: int = option(0, "seed of every random draw of the protocol (re-initialisations, permutations, training)")
    figure: str | None = option(None, "figure to write (PNG); None: none (the command line defaults to the "
                                      "store path with .png; 'none' for no figure)")

    def identity(self, model: torch.nn.Module, dataset: zoo.Dataset, ids: list[str]) -> dict[str, Any]:
        """What a stored result depends on: refusing to mix results of another model, data or options."""
        import zoo

        skip = {"device", "figure", "workers", "dask_address", "store"}
        options = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return {**options, "model_fingerprint": zoo.model_fingerprint(model), "dataset_fingerprint": dataset.digest(ids),
                "package_version": version("saliency-atlas")}


@dataclass(frozen=True)
class SanitySpec(ProtocolSpec):
    methods: list[str] = option(["saliency", "guided_backprop", "gradcam", "guided_gradcam"],
                                "attribution methods to check", type="names")
    store: str = option("runs/sanity.zarr", "the protocol's Zarr store; rerun to resume")
    study: str | None = option(None, "a study store of the same model and data whose maps are reused as the "
                                     "unrandomised ones")
    data_randomization: bool = option(False, "also retrain the model on permuted labels and compare its maps",
                                      flag="--data-randomization", switch_on=True)
    train_samples: int = option(2000, "training images of the label-randomised retrain")
    epochs: int = option(10, "epochs of the label-randomised retrain")
    batch_size: int = option(32, "images per training step of the label-randomised retrain")


@dataclass(frozen=True)
class InvarianceSpec(ProtocolSpec):
    methods: list[str] = option(["saliency", "input_x_gradient", "integrated_gradients", "deeplift", "gradcam"],
                                "attribution methods to check", type="names")
    store: str = option("runs/invariance.zarr", "the protocol's Zarr store; rerun to resume")
    shift: float = option(-1.0, "the constant added to every [0, 1] pixel (Kindermans et al.: -1)", type="float")
    baseline: str = option("zeros", "the reference of methods that take one: zeros (the same zero input for both "
                                    "models) or shifted (moved with the input)", choices=("zeros", "shifted"))
    tolerance: float = option(1e-2, "largest relative L1 change of the maps still called invariant", type="float")


@dataclass(frozen=True)
class ManipulateSpec(ProtocolSpec):
    method: str = option("saliency", f"the method attacked: {', '.join(catalogue.load()['manipulable'])}")
    store: str = option("runs/manipulate.zarr", "the protocol's Zarr store; rerun to resume")
    samples: int = option(8, "how many images of the dataset (its first ones) are attacked")
    target_map: str = option("other", "the map to move to: other (the next image's map) or corner (a square in "
                                      "the corner farthest from the map's mass)", choices=TARGET_MAPS)
    steps: int = option(200, "optimisation steps of the attack")
    lr: float = option(1e-3, "Adam step size of the perturbation, in [0, 1] pixel units", type="float")
    beta: float = option(10.0, "softplus beta of the copy the attack differentiates through", type="float")
    defence_beta: float = option(2.0, "softplus beta of the defended (smoothed) explanation", type="float")
    gamma: float = option(1e3, "weight of keeping the output in the attack's loss", type="float")
    epsilon: float = option(0.05, "largest change of a pixel (L-inf budget, [0, 1] units; 0.05 is about 13/255)",
                            type="float")


@dataclass(frozen=True)
class RoarSpec(ProtocolSpec):
    methods: list[str] = option(["saliency", "integrated_gradients", "smoothgrad_sq", "vargrad", "gradcam"],
                                "attribution methods whose rankings are removed", type="names")
    store: str = option("runs/roar.zarr", "the protocol's Zarr store; rerun to resume")
    fractions: list[float] = option([0.1, 0.3, 0.5, 0.7, 0.9], "fractions of each image's pixels removed",
                                    type="floats")
    seeds: int = option(3, "retrains per (method, fraction), seeds 0..K-1")
    train_samples: int = option(2000, "training images of each retrain")
    test_samples: int = option(500, "test images of each retrain")
    epochs: int = option(10, "epochs of each retrain (shapes-cnn from scratch needs about 600 steps: 2000 "
                              "images, 10 epochs, batches of 32 reach 99.8% test accuracy; 3 epochs stay at chance)")
    batch_size: int = option(32, "images per training step of each retrain")


@dataclass(frozen=True)
class ResilienceSpec(ProtocolSpec):
    methods: list[str] = option(["saliency", "gradcam", "input_x_gradient"], "attribution methods whose maps the "
                                "metrics score (two or more: the ranking criteria compare them)", type="names")
    metrics: list[str] = option(["pointing_game", "relevance_mass", "deletion", "sparseness"],
                                "metrics to meta-evaluate (a variant too, e.g. deletion[steps=16])", type="names")
    store: str = option("runs/resilience.zarr", "the protocol's Zarr store; rerun to resume")
    draws: int = option(3, "seeded draws of each perturbation")
    input_noise: float = option(0.02, "standard deviation of the minor input noise, in [0, 1] pixel units",
                                type="float")
    weight_noise: float = option(0.01, "standard deviation of the minor multiplicative weight noise (1 + sigma N)",
                                 type="float")
