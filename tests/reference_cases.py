"""Calls whose maps are recorded in tests/data/reference_maps.npz (one case per method,
plus the parameters whose code paths a refactor could change: baselines, samplers,
channel variants). `python tests/reference_cases.py` records them again; the test
`test_reference_maps.py` compares every method's maps with the recording, bit for bit.

Every stochastic case is seeded, so a recording is reproducible on the same machine kind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

RECORDING = Path(__file__).parent / "data" / "reference_maps.npz"
IMAGES = 2  # the first test images of the built-in dataset

# case name -> (method, parameters); small step counts keep the whole set a few seconds.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "saliency": ("saliency", {}),
    "input_x_gradient": ("input_x_gradient", {}),
    "deconvnet": ("deconvnet", {}),
    "guided_backprop": ("guided_backprop", {}),
    "integrated_gradients": ("integrated_gradients", {"steps": 8}),
    "integrated_gradients.uniform": ("integrated_gradients", {"steps": 8, "baseline": "uniform", "seed": 3}),
    "integrated_gradients.mean": ("integrated_gradients", {"steps": 8, "baseline": "mean"}),
    "integrated_gradients.blur": ("integrated_gradients", {"steps": 8, "baseline": "blur"}),
    "deeplift": ("deeplift", {}),
    "deeplift.mean": ("deeplift", {"baseline": "mean"}),
    "deeplift.blur": ("deeplift", {"baseline": "blur"}),
    "deeplift_revealcancel": ("deeplift_revealcancel", {}),
    "smoothgrad": ("smoothgrad", {"samples": 4}),
    "smoothgrad_sq": ("smoothgrad_sq", {"samples": 4}),
    "vargrad": ("vargrad", {"samples": 4, "base": "input_x_gradient"}),
    "fullgrad": ("fullgrad", {}),
    "cam": ("cam", {}),
    "gradcam": ("gradcam", {}),
    "hirescam": ("hirescam", {}),
    "xgradcam": ("xgradcam", {}),
    "layercam": ("layercam", {}),
    "gradcam_pp": ("gradcam_pp", {}),
    "scorecam": ("scorecam", {}),
    "ablationcam": ("ablationcam", {}),
    "eigencam": ("eigencam", {}),
    "guided_gradcam": ("guided_gradcam", {}),
    "occlusion": ("occlusion", {}),
    "occlusion.mean": ("occlusion", {"baseline": "mean", "window": 8, "stride": 8}),
    "occlusion.blur": ("occlusion", {"baseline": "blur", "window": 8, "stride": 8}),
    "lime": ("lime", {"samples": 64}),
    "prediction_difference": ("prediction_difference", {"samples": 2, "window": 4, "stride": 4}),
    "prediction_difference.marginal": (
        "prediction_difference", {"samples": 2, "window": 4, "stride": 4, "sampling": "marginal"}),
    "rise": ("rise", {"masks": 128}),
    "meaningful_perturbation": ("meaningful_perturbation", {"steps": 12}),
    "meaningful_perturbation.noise": ("meaningful_perturbation", {"steps": 12, "perturbation": "noise"}),
    "extremal_perturbation": ("extremal_perturbation", {"steps": 12}),
    "extremal_perturbation.channels": ("extremal_perturbation", {"steps": 12, "channels": "stage3"}),
    "contrastive_gradcam": ("contrastive_gradcam", {}),
    "cem_pp": ("cem_pp", {"steps": 8, "c_steps": 1}),
    "cem_pn": ("cem_pn", {"steps": 8, "c_steps": 1}),
    "cdeepex": ("cdeepex", {"steps": 8}),
}

# Cases whose maps a deliberate fix changed, with the reason (the recording predates the fix).
_ONE_BLUR = "baseline='blur' is the project's one blur now (sigma 10 * min(H, W) / 224, replicated border), not min(H, W) / 16 with a reflected border"
_TORCH_OPTIM = ("the masks step with torch.optim (Adam / SGD) instead of a hand-written update: the same rule, other "
                "float rounding, which these cases' optimisation carries past the tolerance (the others stay within it)")
CHANGED: dict[str, str] = {
    "integrated_gradients.blur": _ONE_BLUR,
    "deeplift.blur": _ONE_BLUR,
    "meaningful_perturbation": _TORCH_OPTIM,
    "extremal_perturbation.channels": _TORCH_OPTIM,
}

# Cases whose float32 maps depend on the CPU's rounding far beyond the tolerance, with the reason; the test
# `test_rounding_sensitive_cases_are_so` shows it (their definition is tested by their own tests).
ROUNDING_SENSITIVE: dict[str, str] = {
    "cem_pp": ("8 ISTA steps whose soft threshold and projection act at exact zeros: the same code in float64 moves "
               "the map by about half its largest value, and an AMD EPYC's float32 kernels by as much (0.5 of 0.82)"),
}


def inputs() -> tuple[torch.nn.Module, torch.Tensor]:
    import zoo

    model = zoo.load_model("shapes-cnn")
    batch = zoo.load_dataset("shapes", limit=IMAGES).load(0, IMAGES)
    return model, model.preprocess(torch.from_numpy(batch.images))


def compute(case: str, model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    import xai_methods as xm

    method, params = CASES[case]
    return xm.attribute(method, model, images, **params).numpy()


if __name__ == "__main__":
    torch.set_num_threads(2)
    model, images = inputs()
    maps = {case: compute(case, model, images) for case in CASES}
    RECORDING.parent.mkdir(exist_ok=True)
    np.savez_compressed(RECORDING, **maps)
    print(f"recorded {len(maps)} cases in {RECORDING} ({RECORDING.stat().st_size / 1024:.0f} KiB)")
