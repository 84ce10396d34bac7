"""Speed of `xai_methods` side by side with the peers and with the floor.

Workload: torchvision ResNet-18 (``weights=None``, seeded, eval), 224x224
inputs, batch 8, CPU, ``torch.set_num_threads(2)``. For every registered
method (``xai_methods.available()``) the script times

* OURS: ``xai_methods.attribute(name, model, images, target=..., **params)``;
* each PEER with the same parameters (Captum, pytorch-grad-cam), as users run
  it (pytorch-grad-cam computes weight gradients and post-processes in numpy:
  that is part of the peer);
* the FLOOR: the model passes the method cannot avoid, taken from
  ``xai_methods.spec(name).passes(size, **params)`` = (F forward, B backward
  passes per image). A backward pass needs its own forward, so the floor is
  ``(F - B) x one forward under inference_mode`` + ``B x one forward+backward
  to the input only`` (parameters ``requires_grad=False``,
  ``torch.autograd.grad(score.sum(), x)``), all batched like the method:
  ``images x passes`` inputs in chunks of the method's ``internal_batch`` (of
  the batch size when it has none). The floor times up to ``--floor-chunks``
  full chunks per round and extrapolates to the full count of chunks.

OURS, the peers and the floor alternate within every round (the order flips
between rounds) so drifting machine load hits all of them alike; the table
reports the median over rounds in ms per image. Expensive methods are timed on
fewer images and rounds so the whole run fits ``--budget`` seconds per method
(chunked multi-pass methods cost the same per image whatever the batch size);
the table says how many images x rounds each row used.

Run from the repository root::

    .venv/bin/python benchmarks/bench_methods.py --plan           # what would run, estimated duration
    .venv/bin/python benchmarks/bench_methods.py --out docs/performance.md
    .venv/bin/python benchmarks/bench_methods.py --quick --methods saliency,gradcam,occlusion
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's ScoreCAM/AblationCAM print progress bars

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import xai_methods as xm  # noqa: E402
from xai_methods._core import _HOOK_DICTS, default_layer, resolve_layer  # noqa: E402

# Every name of the architecture contract, so a method that is not registered yet still gets a row.
KNOWN_METHODS = (
    "saliency input_x_gradient deconvnet guided_backprop integrated_gradients deeplift deeplift_revealcancel "
    "smoothgrad smoothgrad_sq vargrad fullgrad cam gradcam guided_gradcam gradcam_pp scorecam hirescam layercam "
    "xgradcam eigencam ablationcam occlusion lime prediction_difference meaningful_perturbation "
    "extremal_perturbation rise contrastive_gradcam cem_pp cem_pn cdeepex"
).split()

# Parameters of the workload (from the issues). A key ours does not accept is dropped with a note.
CASE_PARAMS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 32, "internal_batch": 64},
    "smoothgrad": {"samples": 16, "internal_batch": 64},
    "smoothgrad_sq": {"samples": 16, "internal_batch": 64},
    "vargrad": {"samples": 16, "internal_batch": 64},
    "scorecam": {"internal_batch": 64},
    "ablationcam": {"internal_batch": 64},
    "occlusion": {"window": 32, "stride": 16, "baseline": 0.0, "internal_batch": 64},
    "lime": {"samples": 1000, "internal_batch": 64},
    "rise": {"masks": 4000, "internal_batch": 64},
    # Its default (window 4, stride 2) is ~123k forward passes per image at 224x224: far too long to time.
    "prediction_difference": {"window": 16, "stride": 16, "samples": 4, "internal_batch": 64},
}
# --quick caps sample counts (a smoke run, not a measurement).
QUICK_CAPS = {"steps": 8, "samples": 8, "masks": 200}
QUICK_CAPS_BY_METHOD = {"lime": {"samples": 100}}
# Names under which a method may call its superpixel count (used by the LIME peer and the surrogate fit).
SEGMENT_KEYS = ("segments", "superpixels", "n_segments")
DEFAULT_SEGMENTS = 50

TARGETS = {  # kind -> (ratio to the floor, text)
    "single": (1.25, "<= 1.25x floor (its one pass)"),
    "fullgrad": (1.5, "<= 1.5x floor"),
    "multi": (1.1, "<= 1.1x floor (passes x batched fwd(+bwd))"),
    "occlusion": (1.1, "<= 1.1x floor, faster than Captum Occlusion"),
    "rise": (1.1, "<= 1.1x floor (masks x batched fwd)"),
    "lime": (1.1, "<= 1.1x floor (samples x batched fwd + surrogate fit)"),
}


# --------------------------------------------------------------------------- peers


@dataclass
class Setup:
    """What a peer factory gets: the model, the layer ours uses, ours' resolved parameters, the batch."""

    model: nn.Module
    layer: nn.Module
    params: Mapping[str, Any]  # ours' parameters, defaults included
    batch: int
    size: tuple[int, int]


PeerCall = Callable[[Tensor, Tensor], Any]  # (images, target) -> attribution, whatever the peer returns
PeerFactory = Callable[[Setup], PeerCall]


def _captum(cls_name: str, **kwargs: Any) -> PeerFactory:
    """A Captum input attribution method; its (B, C, H, W) result is reduced over channels as ours does."""

    def make(s: Setup) -> PeerCall:
        import captum.attr as ca

        method = getattr(ca, cls_name)(s.model)

        def call(x: Tensor, t: Tensor) -> Tensor:
            return method.attribute(x, target=t, **kwargs).abs().amax(1)

        return call

    return make


def _captum_ig(s: Setup) -> PeerCall:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(s.model)
    steps, ib = s.params.get("steps", 50), s.params.get("internal_batch")

    def call(x: Tensor, t: Tensor) -> Tensor:
        return ig.attribute(x, baselines=0.0, target=t, n_steps=steps, internal_batch_size=ib).sum(1)

    return call


def _captum_deeplift(s: Setup) -> PeerCall:
    from captum.attr import DeepLift

    dl = DeepLift(s.model)

    def call(x: Tensor, t: Tensor) -> Tensor:
        return dl.attribute(x, baselines=0.0, target=t).sum(1)

    return call


def _captum_noise_tunnel(nt_type: str) -> PeerFactory:
    def make(s: Setup) -> PeerCall:
        from captum.attr import NoiseTunnel, Saliency

        nt = NoiseTunnel(Saliency(s.model))
        samples = s.params.get("samples", 16)
        ib = s.params.get("internal_batch")
        # Captum batches nt_samples_batch_size noisy copies *per image*; ours batches internal_batch images in all.
        per_image = None if ib is None else max(1, ib // s.batch)

        def call(x: Tensor, t: Tensor) -> Tensor:
            out = nt.attribute(
                x, nt_type=nt_type, nt_samples=samples, nt_samples_batch_size=per_image, stdevs=0.15, target=t
            )
            return out.amax(1)

        return call

    return make


def _captum_layer_gradcam(s: Setup) -> PeerCall:
    from captum.attr import LayerAttribution, LayerGradCam

    gc = LayerGradCam(s.model, s.layer)

    def call(x: Tensor, t: Tensor) -> Tensor:
        cam = gc.attribute(x, target=t, relu_attributions=True)
        return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")[:, 0]

    return call


def _captum_guided_gradcam(s: Setup) -> PeerCall:
    from captum.attr import GuidedGradCam

    ggc = GuidedGradCam(s.model, s.layer)

    def call(x: Tensor, t: Tensor) -> Tensor:
        return ggc.attribute(x, target=t).abs().amax(1)

    return call


def _captum_occlusion(s: Setup) -> PeerCall:
    from captum.attr import Occlusion

    occ = Occlusion(s.model)
    window, stride = s.params.get("window"), s.params.get("stride")
    if window is None or stride is None:
        raise ValueError("the benchmark sets window and stride explicitly for the Captum peer")
    wh, ww = (window, window) if isinstance(window, int) else tuple(window)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    baseline = s.params.get("baseline", 0.0)
    ib = s.params.get("internal_batch", 64)
    # Captum evaluates perturbations_per_eval perturbations of every image per forward pass.
    per_image = max(1, ib // s.batch)

    def call(x: Tensor, t: Tensor) -> Tensor:
        out = occ.attribute(
            x,
            sliding_window_shapes=(x.shape[1], wh, ww),
            strides=(x.shape[1], sh, sw),
            baselines=baseline,
            target=t,
            perturbations_per_eval=per_image,
        )
        return out.sum(1)

    return call


def _segments(params: Mapping[str, Any]) -> int:
    for key in SEGMENT_KEYS:
        if isinstance(params.get(key), int):
            return int(params[key])
    return DEFAULT_SEGMENTS


def _captum_lime(s: Setup) -> PeerCall:
    import numpy as np
    from captum.attr import Lime
    from skimage.segmentation import slic

    lime = Lime(s.model)
    samples = s.params.get("samples", 1000)
    ib = s.params.get("internal_batch", 64)
    n_segments = _segments(s.params)

    def call(x: Tensor, t: Tensor) -> Tensor:
        # Captum takes the superpixels as a feature mask: segmenting is part of the user's cost. The
        # segmentation is ours' default (SLIC on each image min-max scaled, compactness 1, no CIELAB).
        pixels = x.detach().permute(0, 2, 3, 1).cpu().to(torch.float64).numpy()
        low = pixels.min(axis=(1, 2, 3), keepdims=True)
        pixels = (pixels - low) / np.maximum(pixels.max(axis=(1, 2, 3), keepdims=True) - low, 1e-12)
        seg = np.stack(
            [
                slic(p, n_segments=n_segments, compactness=1.0, convert2lab=False, start_label=0, channel_axis=-1)
                for p in pixels
            ]
        )
        mask = torch.from_numpy(seg)[:, None].to(x.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multiple inputs ... time consuming": that is the point
            out = lime.attribute(
                x, target=t, feature_mask=mask, n_samples=samples, perturbations_per_eval=ib, baselines=0.0
            )
        return out.sum(1)

    return call


def _grad_cam(cls_name: str, batch_size: bool = False) -> PeerFactory:
    """A pytorch-grad-cam method, run as its README shows (context manager, ClassifierOutputTarget)."""

    def make(s: Setup) -> PeerCall:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cls = getattr(pgc, cls_name)
        kwargs: dict[str, Any] = {}
        if cls_name == "AblationCAM":
            kwargs["batch_size"] = s.params.get("internal_batch", 32)
        layers = [] if cls_name == "FullGrad" else [s.layer]

        def call(x: Tensor, t: Tensor) -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with cls(model=s.model, target_layers=layers, **kwargs) as cam:
                    if batch_size:  # ScoreCAM reads its chunk size from an attribute
                        cam.batch_size = s.params.get("internal_batch", 16)
                    return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])

        return call

    return make


# method -> [(peer label, factory)]; pytorch-grad-cam is labelled "grad-cam" (its distribution name).
PEERS: dict[str, list[tuple[str, PeerFactory]]] = {
    "saliency": [("captum Saliency", _captum("Saliency", abs=True))],
    "input_x_gradient": [("captum InputXGradient", _captum("InputXGradient"))],
    "deconvnet": [("captum Deconvolution", _captum("Deconvolution"))],
    "guided_backprop": [("captum GuidedBackprop", _captum("GuidedBackprop"))],
    "integrated_gradients": [("captum IntegratedGradients", _captum_ig)],
    "deeplift": [("captum DeepLift", _captum_deeplift)],
    "smoothgrad": [("captum NoiseTunnel(Saliency)", _captum_noise_tunnel("smoothgrad"))],
    "smoothgrad_sq": [("captum NoiseTunnel(Saliency)", _captum_noise_tunnel("smoothgrad_sq"))],
    "vargrad": [("captum NoiseTunnel(Saliency)", _captum_noise_tunnel("vargrad"))],
    "fullgrad": [("grad-cam FullGrad", _grad_cam("FullGrad"))],
    "gradcam": [("captum LayerGradCam", _captum_layer_gradcam), ("grad-cam GradCAM", _grad_cam("GradCAM"))],
    "guided_gradcam": [("captum GuidedGradCam", _captum_guided_gradcam)],
    "gradcam_pp": [("grad-cam GradCAMPlusPlus", _grad_cam("GradCAMPlusPlus"))],
    "scorecam": [("grad-cam ScoreCAM", _grad_cam("ScoreCAM", batch_size=True))],
    "hirescam": [("grad-cam HiResCAM", _grad_cam("HiResCAM"))],
    "layercam": [("grad-cam LayerCAM", _grad_cam("LayerCAM"))],
    "xgradcam": [("grad-cam XGradCAM", _grad_cam("XGradCAM"))],
    "eigencam": [("grad-cam EigenCAM", _grad_cam("EigenCAM"))],
    "ablationcam": [("grad-cam AblationCAM", _grad_cam("AblationCAM"))],
    "occlusion": [("captum Occlusion", _captum_occlusion)],
    "lime": [("captum Lime", _captum_lime)],
}
NO_PEER_NOTE = {
    "deeplift_revealcancel": "no installed peer (Captum has no RevealCancel rule)",
    "cam": "no installed peer (neither Captum nor grad-cam has plain CAM)",
    "rise": "no installed peer (TorchRay is not installed)",
    "extremal_perturbation": "no installed peer (TorchRay is not installed)",
    "meaningful_perturbation": "no installed peer",
}


# --------------------------------------------------------------------------- timing


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with warnings silenced (peers warn about inputs that do not require grad, batch loops, ...)."""

    def call(*args: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)

    return call


class PassCounter:
    """Forward hook on the model: images seen, images seen with grad, largest batch (the memory proxy)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.images = self.grad_images = self.max_batch = 0

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        x = inputs[0] if inputs else None
        n = x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else 0
        self.images += n
        self.max_batch = max(self.max_batch, n)
        if isinstance(output, Tensor) and output.requires_grad:
            self.grad_images += n

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


class ModelGuard:
    """Snapshot of the model's hooks, modes and requires_grad; `restore` undoes and reports any change,
    so a call that leaks (a peer's hook left behind) cannot slow down the calls timed after it."""

    def __init__(self, model: nn.Module):
        self.modules = list(model.modules())
        self.hooks = [(m, a, set(getattr(m, a))) for m in self.modules for a in _HOOK_DICTS if hasattr(m, a)]
        self.modes = [m.training for m in self.modules]
        self.params = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> list[str]:
        changed = []
        for m, attr, keys in self.hooks:
            extra = set(getattr(m, attr)) - keys
            for key in extra:
                del getattr(m, attr)[key]
            if extra:
                changed.append(f"{len(extra)} {attr.strip('_')} left")
        if any(m.training != mode for m, mode in zip(self.modules, self.modes)):
            changed.append("train/eval mode changed")
        for m, mode in zip(self.modules, self.modes):
            m.training = mode
        if any(p.requires_grad != flag for p, flag in self.params):
            changed.append("requires_grad changed")
        for p, flag in self.params:
            p.requires_grad_(flag)
        return changed


class frozen_params:
    """Parameters requires_grad=False for the floor's backward passes; restored on exit."""

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)


def floor_parts(fwd_images: int, bwd_images: int, chunk: int) -> list[tuple[str, int, int]]:
    """[(kind "fwd" | "bwd", chunk size, number of such chunks)]: full chunks, then the partial one."""
    parts = []
    for kind, n in (("fwd", fwd_images), ("bwd", bwd_images)):
        full, rest = divmod(max(n, 0), chunk)
        if full:
            parts.append((kind, chunk, full))
        if rest:
            parts.append((kind, rest, 1))
    return parts


class Floor:
    """The passes a method cannot avoid, batched in chunks; one call = one round's estimate in seconds.

    fwd_images inputs run forward-only under inference_mode and bwd_images inputs run
    forward + backward to the input, each in chunks of `chunk`. Per call, up to
    `max_chunks` full chunks of each kind are timed and their mean is multiplied by
    the number of full chunks; a final partial chunk is timed as is. `extra` (the
    LIME surrogate fit) is timed and added.
    """

    def __init__(
        self,
        model: nn.Module,
        size: tuple[int, int],
        fwd_images: int,
        bwd_images: int,
        chunk: int,
        classes: int,
        max_chunks: int,
        extra: Callable[[], Any] | None = None,
        seed: int = 0,
    ):
        self.model, self.max_chunks, self.extra = model, max_chunks, extra
        g = torch.Generator().manual_seed(seed)
        self.parts = floor_parts(fwd_images, bwd_images, chunk)
        self.inputs: dict[int, Tensor] = {}
        self.targets: dict[int, Tensor] = {}
        for _, size_b, _ in self.parts:
            if size_b not in self.inputs:
                self.inputs[size_b] = torch.randn(size_b, 3, *size, generator=g)
                self.targets[size_b] = torch.randint(0, classes, (size_b,), generator=g)
        self.extrapolated = any(count > max_chunks for _, _, count in self.parts)

    def _fwd(self, b: int) -> None:
        with torch.inference_mode():
            self.model(self.inputs[b])

    def _bwd(self, b: int) -> None:
        x = self.inputs[b].clone().requires_grad_(True)
        score = self.model(x).gather(1, self.targets[b][:, None]).sum()
        torch.autograd.grad(score, x)

    def __call__(self) -> float:
        total = 0.0
        with frozen_params(self.model):
            for kind, b, count in self.parts:
                step = self._fwd if kind == "fwd" else self._bwd
                times = [_timed(lambda: step(b)) for _ in range(min(count, self.max_chunks))]
                total += statistics.fmean(times) * count
        if self.extra is not None:
            total += _timed(self.extra)
        return total


def lime_surrogate_fit(images: int, samples: int, segments: int, seed: int = 0) -> Callable[[], Any]:
    """The least a LIME surrogate costs: a batched weighted ridge fit of `samples` x `segments` per image."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.rand(images, samples, segments, generator=g) > 0.5).to(torch.float64)
    y = torch.randn(images, samples, 1, generator=g, dtype=torch.float64)

    def fit() -> Tensor:
        design = torch.cat([z, torch.ones_like(z[..., :1])], dim=2)
        distance = 1 - z.mean(2, keepdim=True)  # cosine-like distance to the unperturbed image
        w = torch.exp(-(distance**2) / 0.25**2)
        gram = design.transpose(1, 2) @ (w * design) + 1e-3 * torch.eye(segments + 1, dtype=z.dtype)
        return torch.linalg.solve(gram, design.transpose(1, 2) @ (w * y))

    return fit


# --------------------------------------------------------------------------- one method


@dataclass
class Row:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    images: int = 0
    rounds: int = 0
    passes: tuple[int, int] | None = None  # declared (forward, backward) per image
    observed: tuple[float, float] | None = None  # seen by a forward hook on the model, per image
    ours_ms: float | None = None
    peers: list[tuple[str, float | None, str]] = field(default_factory=list)  # (label, ms/img, failure)
    floor_ms: float | None = None
    kind: str = "single"
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def best_peer(self) -> tuple[str, float] | None:
        timed = [(label, ms) for label, ms, _ in self.peers if ms is not None]
        return min(timed, key=lambda p: p[1]) if timed else None

    @property
    def met(self) -> bool | None:
        if self.ours_ms is None or self.floor_ms is None:
            return None
        ok = self.ours_ms <= TARGETS[self.kind][0] * self.floor_ms
        best = self.best_peer
        if best is not None:
            ok = ok and self.ours_ms <= best[1]
        return ok


def target_kind(name: str, passes: tuple[int, int]) -> str:
    if name in ("fullgrad", "occlusion", "rise", "lime"):
        return name
    f, b = passes
    return "single" if f <= 1 and b <= 1 else "multi"


def method_params(name: str, quick: bool, notes: list[str]) -> dict[str, Any]:
    """The workload's parameters for `name` that ours accepts (defaults for the rest)."""
    s = xm.spec(name)
    wanted = dict(CASE_PARAMS.get(name, {}))
    if quick:
        caps = {**QUICK_CAPS, **QUICK_CAPS_BY_METHOD.get(name, {})}
        for key, cap in caps.items():
            value = wanted.get(key, s.defaults.get(key))
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                wanted[key] = cap
    params = {k: v for k, v in wanted.items() if k in s.defaults}
    dropped = sorted(set(wanted) - set(params))
    if dropped:
        notes.append(f"ours takes no {', '.join(dropped)}: its default used, the peer got the workload value")
    return params


@dataclass
class Calibration:
    """Seconds per image, measured at the start of the run (used only to plan, never reported as results)."""

    fwd_s: float  # forward under inference_mode, batch = the run's batch
    fwd_big_s: float  # forward under inference_mode, batch 64
    bwd_s: float  # forward+backward to the input, batch = the run's batch

    def fwd(self, chunk: int) -> float:
        return self.fwd_big_s if chunk >= 32 else self.fwd_s

    def per_image(self, passes: tuple[int, int], chunk: int) -> float:
        f, b = passes
        return max(f - b, 0) * self.fwd(chunk) + b * self.bwd_s


def calibrate(model: nn.Module, size: tuple[int, int], batch: int, classes: int) -> Calibration:
    small = Floor(model, size, batch, 0, batch, classes, 1)
    big = Floor(model, size, 64, 0, 64, classes, 1)
    back = Floor(model, size, 0, batch, batch, classes, 1)
    small(), back()  # warm-up
    return Calibration(min(small(), small()) / batch, big() / 64, min(back(), back()) / batch)


def warmup_images(est_image_s: float, images: int) -> int:
    """Warm-up on the full batch when cheap, on one image when not, not at all when even that is long."""
    if est_image_s * images <= 5:
        return images
    return 1 if est_image_s <= 30 else 0


@dataclass
class Plan:
    """Cost model of one method's measurement, to choose images x rounds within the budget."""

    calib: Calibration
    passes: tuple[int, int]
    internal_batch: int | None  # the method's chunk size; None = the whole batch per pass
    n_calls: int  # ours + peers
    max_chunks: int

    def chunk(self, images: int) -> int:
        return self.internal_batch or images

    def seconds(self, images: int, rounds: int) -> float:
        f, b = self.passes
        per_image = self.calib.per_image(self.passes, self.chunk(images))
        floor = sum(
            min(count, self.max_chunks) * size * (self.calib.fwd(size) if kind == "fwd" else self.calib.bwd_s)
            for kind, size, count in floor_parts((f - b) * images, b * images, self.chunk(images))
        )
        warm = warmup_images(per_image, images)
        warm_cost = self.n_calls * per_image * warm + floor if warm else 0.0
        return rounds * (self.n_calls * per_image * images + floor) + warm_cost

    def choose(self, batch: int, repeats: int, budget_s: float, multi: bool) -> tuple[int, int]:
        """(images, rounds) within `budget_s`: fewer images first (multi-pass methods only), then fewer rounds."""
        image_options = [batch]
        while multi and image_options[-1] > 1:
            image_options.append(image_options[-1] // 2)
        for rounds in sorted({repeats, min(repeats, 3), 1}, reverse=True):
            for images in image_options:
                if self.seconds(images, rounds) <= budget_s:
                    return images, rounds
        return image_options[-1], 1


def bench_method(name: str, model: nn.Module, *args: Any, **kwargs: Any) -> tuple[Row, float]:
    """Time one method (see `_bench_method`); afterwards the model is restored and any leak is noted."""
    guard = ModelGuard(model)
    try:
        row, planned = _bench_method(name, model, *args, **kwargs)
    finally:
        changed = guard.restore()
    if changed:
        row.notes.append("a call changed the model (restored before the next method): " + ", ".join(changed))
    return row, planned


def _bench_method(
    name: str,
    model: nn.Module,
    images: Tensor,
    target: Tensor,
    contrast: Tensor,
    *,
    repeats: int,
    budget_s: float,
    quick: bool,
    calib: Calibration,
    floor_chunks: int,
    classes: int,
    max_method_s: float = math.inf,
    plan_only: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Row, float]:
    """Time one method; returns its row and the estimated seconds (the plan)."""
    row = Row(method=name)
    if name not in xm.available():
        row.skipped = "not registered yet"
        return row, 0.0
    s = xm.spec(name)
    row.params = method_params(name, quick, row.notes)
    size = tuple(images.shape[-2:])
    try:
        row.passes = s.passes(size, **row.params)
    except Exception as err:  # noqa: BLE001 - a broken cost function is reported, not fatal
        row.skipped = f"cost function failed: {type(err).__name__}: {err}"
        return row, 0.0
    row.kind = target_kind(name, row.passes)
    peers = PEERS.get(name, [])
    if not peers:
        row.notes.append(NO_PEER_NOTE.get(name, "no installed peer"))
    ib = row.params.get("internal_batch", s.defaults.get("internal_batch"))
    plan = Plan(calib, row.passes, ib if isinstance(ib, int) else None, 1 + len(peers), floor_chunks)
    row.images, row.rounds = plan.choose(images.shape[0], repeats, budget_s, multi=row.kind != "single")
    planned = plan.seconds(row.images, row.rounds)
    est_image = calib.per_image(row.passes, plan.chunk(row.images))
    if planned > max_method_s:
        row.skipped = (
            f"too expensive for this run: {row.passes[0]} forward + {row.passes[1]} backward passes per image "
            f"with {_fmt_params(row.params)}, est. {planned:.0f} s > --max-method-s {max_method_s:.0f}"
        )
        return row, 0.0
    if plan_only:
        return row, planned

    x, t, c = images[: row.images], target[: row.images], contrast[: row.images]
    layer_name = default_layer(model, x)  # the layer ours picks with layer=None; the peers get it too
    layer = resolve_layer(model, layer_name)
    call_kwargs: dict[str, Any] = dict(row.params)
    if s.needs_layer:
        call_kwargs["layer"] = layer_name  # given explicitly, like the peers; layer=None adds one probe forward

    def ours(xx: Tensor = x, tt: Tensor = t, cc: Tensor = c) -> Tensor:
        kw = dict(call_kwargs)
        if s.needs_contrast:
            kw["contrast"] = cc
        return xm.attribute(name, model, xx, target=tt, **kw)

    resolved = {**s.defaults, **row.params}
    for key, value in CASE_PARAMS.get(name, {}).items():  # peers get the workload value even if ours lacks it
        resolved.setdefault(key, value)
    setup = Setup(model=model, layer=layer, params=resolved, batch=row.images, size=size)
    peer_calls: list[tuple[str, PeerCall | None, str]] = []
    for label, factory in peers:
        try:
            peer_calls.append((label, _quiet(factory(setup)), ""))
        except Exception as err:  # noqa: BLE001
            peer_calls.append((label, None, _failure(err)))

    f, b = row.passes
    chunk = plan.chunk(row.images)
    extra = None
    if row.kind == "lime":
        extra = lime_surrogate_fit(row.images, int(resolved.get("samples", 1000)), _segments(resolved))
        row.notes.append(f"floor includes a batched weighted ridge fit ({_segments(resolved)} superpixels)")
    floor = Floor(model, size, (f - b) * row.images, b * row.images, chunk, classes, floor_chunks, extra)
    if floor.extrapolated:
        row.notes.append(f"floor: {floor_chunks} chunks of {chunk} timed per round, extrapolated")

    # Warm-up (ours counted by the forward hook), then alternating rounds.
    n_warm = warmup_images(est_image, row.images)
    log(f"  {name}: {row.images} image(s) x {row.rounds} round(s), warm-up on {n_warm}, est. {planned:.0f} s")
    if n_warm == 0:
        row.notes.append("no warm-up (one call is long)")
    elif n_warm < row.images:
        row.notes.append(f"warm-up on {n_warm} image")
    try:
        with PassCounter(model) as counter:
            if n_warm:
                ours(x[:n_warm], t[:n_warm], c[:n_warm])
                seen = n_warm
            else:
                first = _timed(ours)
                seen = row.images
        row.observed = (counter.images / seen, counter.grad_images / seen)
    except Exception as err:  # noqa: BLE001
        row.skipped = f"ours fails: {_failure(err)}"
        return row, planned
    ours_times: list[float] = [] if n_warm else [first]

    live: list[tuple[str, PeerCall, list[float]]] = []
    failed: dict[str, str] = {label: why for label, fn, why in peer_calls if fn is None}
    for label, fn, _ in peer_calls:
        if fn is None:
            continue
        try:
            if n_warm:
                fn(x[:n_warm], t[:n_warm])
            live.append((label, fn, []))
        except Exception as err:  # noqa: BLE001
            failed[label] = _failure(err)
    if n_warm:
        floor()
    floor_times: list[float] = []

    start_round = 0 if n_warm else 1  # without warm-up, the hooked first call of ours is round 0's ours
    for r in range(row.rounds):
        jobs: list[tuple[str, Callable[[], Any], list[float]]] = []
        if r >= start_round or not ours_times:
            jobs.append(("ours", ours, ours_times))
        jobs += [(label, (lambda fn=fn: fn(x, t)), times) for label, fn, times in live]
        jobs.append(("floor", floor, floor_times))
        if r % 2:
            jobs.reverse()
        for label, job, times in jobs:
            if label == "floor":
                times.append(floor())
                continue
            if label != "ours" and label in failed:
                continue
            try:
                times.append(_timed(job))
            except Exception as err:  # noqa: BLE001
                if label == "ours":
                    row.skipped = f"ours fails: {_failure(err)}"
                    return row, planned
                failed[label] = _failure(err)

    per_image = 1000.0 / row.images
    row.ours_ms = statistics.median(ours_times) * per_image
    row.floor_ms = statistics.median(floor_times) * per_image
    for label, _ in peers:
        times = next((tm for lb, _, tm in live if lb == label), [])
        if label in failed:
            row.peers.append((label, None, failed[label]))
        else:
            row.peers.append((label, statistics.median(times) * per_image, ""))
    if row.observed is not None and (round(row.observed[0], 3), round(row.observed[1], 3)) != tuple(
        map(float, row.passes)
    ):
        row.notes.append(
            "passes seen by a forward hook on the model: "
            f"{row.observed[0]:g} fwd ({row.observed[1]:g} with grad) per image, declared {row.passes}"
        )
    return row, planned


def _failure(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


# --------------------------------------------------------------------------- memory


MEMORY_CASES = {  # method -> (images, workload params); the bound is internal_batch inputs per model call
    "integrated_gradients": (4, {"steps": 32}),
    "smoothgrad": (4, {"samples": 16}),
    "scorecam": (1, {}),
}


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_probe(spec_json: str) -> dict[str, Any]:
    """In a fresh process: largest batch the model saw and the growth of peak RSS during one call.

    spec_json: {"method", "params", "images", "size", "threads"}. Peak RSS growth is VmHWM
    after the call (its mark reset just before) minus VmRSS before; where /proc cannot be
    used, the growth of ru_maxrss (which misses peaks below the process's earlier peak).
    """
    job = json.loads(spec_json)
    name, params, images, size = job["method"], job["params"], job["images"], job["size"]
    torch.set_num_threads(job["threads"])
    model, x, t, _ = build_workload(images, size)
    with torch.inference_mode():
        model(x[:1])  # libraries loaded and allocator primed before the baseline is read
    rss_before = _status_kb("VmRSS")
    use_hwm = rss_before is not None and _reset_peak_rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with PassCounter(model) as counter:
        xm.attribute(name, model, x, target=t, **params)
    if use_hwm:
        growth_kb, how = _status_kb("VmHWM") - rss_before, "VmHWM - VmRSS"
    else:
        growth_kb, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before, "ru_maxrss delta"
    return {"max_batch": counter.max_batch, "rss_growth_mb": growth_kb / 1024, "rss_how": how, "images": images}


def run_memory(
    size: int, threads: int, quick: bool, log: Callable[[str], None], methods: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    rows = []
    values = (4, 16) if quick else (8, 32)
    for name, (images, params) in MEMORY_CASES.items():
        if methods is not None and name not in methods:
            continue
        if name not in xm.available():
            rows.append({"method": name, "skipped": "not registered yet"})
            continue
        if "internal_batch" not in xm.spec(name).defaults:
            rows.append({"method": name, "skipped": "takes no internal_batch"})
            continue
        params = {k: v for k, v in params.items() if k in xm.spec(name).defaults}
        if quick:
            images = min(images, 2)
            params = {k: min(v, QUICK_CAPS.get(k, v)) for k, v in params.items()}
        for ib in values:
            log(f"  memory: {name} internal_batch={ib} on {images} image(s)")
            job = {"method": name, "params": {**params, "internal_batch": ib}, "images": images, "size": size}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps({**job, "threads": threads})]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            row: dict[str, Any] = {"method": name, "internal_batch": ib, "params": params, "images": images}
            if proc.returncode:
                row["skipped"] = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            else:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- workload and report


def build_workload(batch: int, size: int, seed: int = 0, model_name: str = "resnet18") -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """Seeded ResNet-18 (random weights), smooth random images, target = top-1, contrast = top-2;
    or the built-in shapes-cnn (with its generative model) on built-in test images."""
    if model_name == "shapes-cnn":
        import zoo

        model = zoo.load_model("shapes-cnn")
        data = zoo.load_dataset("shapes", split="test", limit=batch).load(0, batch)
        images = model.preprocess(torch.from_numpy(data.images))
        with torch.inference_mode():
            top = model(images).topk(2, dim=1).indices
        return model, images, top[:, 0].clone(), top[:, 1].clone()
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None).eval()
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, 14, 14, generator=g)  # smooth blobs, so superpixels are meaningful
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    images = images + 0.1 * torch.randn(batch, 3, size, size, generator=g)
    with torch.inference_mode():
        top = model(images).topk(2, dim=1).indices
    return model, images, top[:, 0].clone(), top[:, 1].clone()


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ("captum", "pytorch_grad_cam", "torchvision"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            try:
                from importlib.metadata import version

                versions[mod] = version({"pytorch_grad_cam": "grad-cam"}.get(mod, mod))
            except Exception:  # noqa: BLE001
                versions[mod] = "not installed"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **versions,
    }


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def _fmt_ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def render_markdown(
    rows: Sequence[Row],
    memory: Sequence[Mapping[str, Any]],
    *,
    command: str,
    info: Mapping[str, str],
    load: tuple[float, float, float],
    date: str,
    workload: str,
    calib: Calibration | None = None,
    duration_s: float | None = None,
) -> str:
    """The performance page: how it was made, then one row per method, then memory."""
    lines = [
        "# Performance: xai_methods against the peers and against the floor",
        "",
        "Generated by",
        "",
        "```",
        command,
        "```",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['threads']} threads, "
        f"Python {info['python']}; captum {info.get('captum')}, grad-cam {info.get('pytorch_grad_cam')}, "
        f"torchvision {info.get('torchvision')}.",
        f"- Date: {date}" + (f"; the run took {duration_s / 60:.1f} min." if duration_s is not None else "."),
        f"- Load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        + (
            " -- **the machine was shared/noisy (load > 1): absolute times are inflated and ratios are less "
            "reliable.**"
            if load[0] > 1
            else " (quiet)."
        ),
        f"- Workload: {workload}",
    ]
    if calib is not None:
        lines.append(
            f"- Calibration: one forward {calib.fwd_s * 1000:.1f} ms/img (inference_mode), "
            f"one forward+backward to the input {calib.bwd_s * 1000:.1f} ms/img, batched."
        )
    lines += [
        "",
        "How to read it: times are medians over rounds, in ms per image. OURS, every peer and the floor "
        "run alternately in each round (order flipped every round). The floor is the model passes the "
        "method cannot avoid, from `xai_methods.spec(name).passes(...)` = (F, B) per image: (F - B) forward "
        "passes under `inference_mode` + B forward+backward passes to the input only (parameters frozen), "
        "batched like the method (chunks of its `internal_batch`, else the batch). `met` needs the ratio "
        "to the floor within the target *and* ours no slower than the fastest peer. Peers run as users run "
        "them (pytorch-grad-cam computes weight gradients and post-processes in numpy). "
        "`images x rounds` below the workload's batch x rounds marks an expensive method measured on fewer "
        "images/rounds to bound the run (chunked multi-pass methods cost about the same per image at any "
        "batch size). With one round or a shared machine, differences of a few percent are noise.",
        "",
        "| method | params | passes F/B | images x rounds | ours ms/img | peer | peer ms/img | ours/peer "
        "| floor ms/img | ours/floor | target | met | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.method} | | | | - | | - | - | - | - | | - | {r.skipped} |")
            continue
        peer_text = "; ".join(
            f"{label}: {_fmt_ms(ms)}" if ms is not None else f"{label}: peer fails: {why}" for label, ms, why in r.peers
        ) or "none"
        best = r.best_peer
        met = r.met
        lines.append(
            "| "
            + " | ".join(
                [
                    r.method,
                    _fmt_params(r.params),
                    f"{r.passes[0]}/{r.passes[1]}" if r.passes else "-",
                    f"{r.images} x {r.rounds}",
                    _fmt_ms(r.ours_ms),
                    peer_text.replace("|", "\\|"),
                    _fmt_ms(best[1]) if best else "-",
                    _fmt_ratio(r.ours_ms, best[1] if best else None),
                    _fmt_ms(r.floor_ms),
                    _fmt_ratio(r.ours_ms, r.floor_ms),
                    TARGETS[r.kind][1] + ("; <= fastest peer" if best else ""),
                    "-" if met is None else ("yes" if met else "**no**"),
                    "; ".join(r.notes).replace("|", "\\|"),
                ]
            )
            + " |"
        )
    if memory:
        lines += [
            "",
            "## Memory bound of the multi-pass methods",
            "",
            "Each line is one call in a fresh process. `largest batch` is the largest batch the model's forward "
            "saw (a forward hook on the model): the bound `internal_batch` promises. `peak RSS growth` is "
            "the process's peak resident memory during the call (Linux VmHWM, its mark reset just before the "
            "call) minus the resident memory before it (model built, one warm forward): it includes allocator "
            "caching and the inputs' own copies, so it is a coarse proxy, not a per-tensor account; it should "
            "grow with `internal_batch`, not with the number of passes.",
            "",
            "| method | params | images | internal_batch | largest batch | bound holds | peak RSS growth MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in memory:
            if "skipped" in m:
                lines.append(
                    f"| {m['method']} | | | {m.get('internal_batch', '')} | - | - | - ({m['skipped']}) |"
                )
                continue
            holds = "yes" if m["max_batch"] <= m["internal_batch"] else "**no**"
            lines.append(
                f"| {m['method']} | {_fmt_params(m['params'])} | {m['images']} | {m['internal_batch']} | "
                f"{m['max_batch']} | {holds} | {m['rss_growth_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> str:
    start_time = time.perf_counter()
    load = os.getloadavg()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.quick else 8)
    repeats = args.repeats or (2 if args.quick else 5)
    budget = args.budget or (20.0 if args.quick else 60.0)
    if args.model == "shapes-cnn":
        args.size = 64
    model, images, target, contrast = build_workload(batch, args.size, model_name=args.model)
    classes = 1000 if args.model == "resnet18" else len(model.classes)
    names = args.methods.split(",") if args.methods else sorted(set(xm.available()) | set(KNOWN_METHODS))
    unknown = [n for n in names if n not in xm.available() and n not in KNOWN_METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; registered: {', '.join(xm.available())}")
    order = {c: i for i, c in enumerate(("gradient", "cam", "perturbation", "contrastive"))}

    def sort_key(n: str) -> tuple[int, int, str]:
        if n not in xm.available():
            return (9, 0, n)
        s = xm.spec(n)
        return (order.get(s.category, 8), 0, n)

    names = sorted(names, key=sort_key)
    log(f"load average {load[0]:.2f}; calibrating ...")
    calib = calibrate(model, (args.size, args.size), batch, classes)
    log(f"one forward {calib.fwd_s * 1000:.1f} ms/img, one forward+backward {calib.bwd_s * 1000:.1f} ms/img")

    common = dict(
        repeats=repeats,
        budget_s=budget,
        quick=args.quick,
        calib=calib,
        floor_chunks=args.floor_chunks,
        classes=classes,
        max_method_s=args.max_method_s,
        log=log,
    )
    rows: list[Row] = []
    total_est = 0.0
    for name in names:
        if args.plan:
            row, est = bench_method(name, model, images, target, contrast, plan_only=True, **common)
            total_est += est
            if row.skipped:
                log(f"  {name:24s} skipped: {row.skipped}")
            else:
                log(
                    f"  {name:24s} passes {row.passes}, {row.images} image(s) x {row.rounds} round(s), "
                    f"{len(PEERS.get(name, []))} peer(s): est. {est:.0f} s"
                )
            continue
        log(f"{name} ...")
        try:
            row, _ = bench_method(name, model, images, target, contrast, **common)
        except Exception as err:  # noqa: BLE001 - one broken method must not lose the whole table
            traceback.print_exc()
            row = Row(method=name, skipped=f"benchmark error: {_failure(err)}")
        rows.append(row)
        if row.ours_ms is not None:
            log(f"  ours {_fmt_ms(row.ours_ms)} ms/img, floor {_fmt_ms(row.floor_ms)}, peers {row.peers}")
    if args.plan:
        mem_est = 0.0
        if not args.no_memory:
            for name, (n_img, params) in MEMORY_CASES.items():
                if name in xm.available():
                    params = {k: v for k, v in params.items() if k in xm.spec(name).defaults}
                    p = xm.spec(name).passes((args.size, args.size), **params)
                    mem_est += 2 * (calib.per_image(p, 8) * n_img + 5)
        log(
            f"estimated duration: {total_est / 60:.1f} min for the methods + {mem_est / 60:.1f} min memory "
            f"(calibrated on this machine at load {load[0]:.2f}; unregistered methods count 0)"
        )
        return ""

    memory = [] if args.no_memory else run_memory(args.size, args.threads, args.quick, log, names)
    command = " ".join(
        [".venv/bin/python", str(Path(sys.argv[0]).resolve().relative_to(ROOT)) if sys.argv else "bench_methods.py"]
        + [shlex.quote(a) for a in sys.argv[1:]]
    )
    described = ("torchvision ResNet-18 (weights=None, seed 0, eval)" if args.model == "resnet18"
                 else "the built-in shapes-cnn on built-in test images (cdeepex with its shapes VAE)")
    workload = (
        f"{described}, {args.size}x{args.size}, batch {batch}, CPU, "
        f"torch.set_num_threads({args.threads}), target = top-1 class, contrast = top-2 class, "
        f"layer methods on `{default_layer(model, images)}` "
        f"(passed explicitly, as to the peers), up to {repeats} rounds after one warm-up, "
        f"budget {budget:.0f} s per method"
        + (" -- **--quick: smoke run with reduced sample counts, not a measurement**" if args.quick else "")
        + "."
    )
    return render_markdown(
        rows,
        memory,
        command=command,
        info=machine_info(),
        load=load,
        date=date,
        workload=workload,
        calib=calib,
        duration_s=time.perf_counter() - start_time,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", help="comma-separated method names (default: all registered and all known)")
    p.add_argument("--repeats", type=int, help="timed rounds per method (default 5; --quick 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 2, 2 rounds, capped sample counts")
    p.add_argument("--out", help="write the markdown table here (e.g. docs/performance.md); always printed")
    p.add_argument("--batch", type=int, help="images per call (default 8; --quick 2)")
    p.add_argument("--size", type=int, default=224, help="image side (default 224; 64 with shapes-cnn)")
    p.add_argument("--model", choices=("resnet18", "shapes-cnn"), default="resnet18",
                   help="the workload's model (default resnet18; shapes-cnn for methods that need its generator)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--budget", type=float, help="seconds per method; expensive methods use fewer images/rounds (default 75)"
    )
    p.add_argument(
        "--max-method-s",
        type=float,
        default=900.0,
        help="skip (with a note) a method whose cheapest measurement is estimated longer (default 900)",
    )
    p.add_argument("--floor-chunks", type=int, default=2, help="full chunks of the floor timed per round (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory-bound section")
    p.add_argument("--plan", action="store_true", help="print the plan and the estimated duration; run nothing")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key in ("repeats", "batch", "threads", "floor_chunks"):
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return 0
    text = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    if text:
        print(text)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
