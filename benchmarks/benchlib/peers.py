"""Peer adapters: how Captum and pytorch-grad-cam compute the same method as ours, as users call them."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .planning import DEFAULT_SEGMENTS, SEGMENT_KEYS

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


def segments_of(params: Mapping[str, Any]) -> int:
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
    n_segments = segments_of(s.params)

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


