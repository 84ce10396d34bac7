"""Tests of the perturbation methods: occlusion, lime, prediction_difference, rise,
meaningful_perturbation and extremal_perturbation (xai_methods.perturbation, perturbation_opt)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import xai_methods as xm
from helpers import LinearModel, assert_no_hooks, mix_state, model_left_as_is, pearson
from xai_methods import _core, perturbation as pt
from xai_methods import perturbation_opt as po

METHODS = ["occlusion", "lime", "prediction_difference", "rise", "meaningful_perturbation", "extremal_perturbation"]
# Small parameters per method so every test stays fast on CPU (32 x 32 images).
FAST = {
    "occlusion": {"window": 4, "stride": 4},
    "lime": {"samples": 64, "n_segments": 16},
    "prediction_difference": {"window": 4, "stride": 4, "samples": 2},
    "rise": {"masks": 64, "cells": 4},
    "meaningful_perturbation": {"steps": 5, "mask_size": 4},
    "extremal_perturbation": {"steps": 5},
}
SIZE = 32
R = (slice(4, 12), slice(20, 28))  # the region the known-answer model reads for class 0
R2 = (slice(20, 28), slice(4, 12))  # ... and for class 2


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models and images here are tiny: a second intra-op thread only adds synchronisation,
    which on shared cores made the optimisation tests 3-50x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- models and data


def checker(n: int) -> torch.Tensor:
    return ((torch.arange(n)[:, None] + torch.arange(n)) % 2 * 2 - 1).float()


class RegionModel(nn.Module):
    """Known answer: logit 0 = scale * mean over R of channel 0 times a +-1 checkerboard;
    logit 1 = 0; logit 2 = the same over R2 on channel 1. Only R carries evidence for class 0."""

    def __init__(self, scale: float = 4.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.register_buffer("pattern", checker(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = (x[:, 0, R[0], R[1]] * self.pattern).mean((1, 2)) * self.scale
        c = (x[:, 1, R2[0], R2[1]] * self.pattern).mean((1, 2)) * self.scale
        return torch.stack([a, torch.zeros_like(a), c], 1)


class TinyCNN(nn.Module):
    """Conv + BatchNorm + in-place ReLU, global pooling, linear head (3 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def region_images(b: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, 3, SIZE, SIZE, generator=g) * 0.5
    x[:, 0, R[0], R[1]] += 1.5 * checker(8)
    return x


def images(b: int = 3, h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def hit_rate(maps: torch.Tensor, region: tuple[slice, slice] = R) -> torch.Tensor:
    """Per image: the fraction of the |region| top-ranked pixels that fall inside the region."""
    inside = torch.zeros(maps.shape[-2:], dtype=torch.bool)
    inside[region] = True
    top = maps.flatten(1).topk(int(inside.sum()), 1).indices
    return inside.flatten()[top].float().mean(1)


def block_segmentation(size: int = SIZE, block: int = 4) -> torch.Tensor:
    """Superpixels = block x block squares (R is a union of blocks)."""
    i = torch.arange(size) // block
    return i[:, None] * (size // block) + i[None, :]


def max_batch_seen(model: nn.Module) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


# --------------------------------------------------------------------------- registry


def test_registered_with_costs() -> None:
    for name in METHODS:
        s = xm.spec(name)
        assert s.category == "perturbation" and not s.needs_layer and not s.needs_contrast
        assert "internal_batch" in s.defaults and "progress" in s.defaults
        assert "(" in s.summary and "):" in s.summary  # "Name (Authors year): definition"
    assert xm.spec("lime").passes((SIZE, SIZE)) == (1001, 0)
    assert xm.spec("rise").passes((224, 224)) == (4001, 0)
    assert xm.spec("rise").defaults["seed"] == 0 and xm.spec("rise").defaults["masks"] == 4000
    # window 4, stride 2 on 32: starts 0, 2, ..., 28 -> 15 per axis; 10 samples each
    assert xm.spec("prediction_difference").passes((SIZE, SIZE)) == (15 * 15 * 10 + 1, 0)
    assert xm.spec("meaningful_perturbation").passes((SIZE, SIZE), steps=50) == (52, 50)
    assert xm.spec("extremal_perturbation").passes((SIZE, SIZE)) == (301, 300)
    assert xm.spec("extremal_perturbation").passes((SIZE, SIZE), area=[0.1, 0.2, 0.3], variant="dual") == (1801, 1800)
    assert xm.spec("occlusion").passes((SIZE, SIZE), window=4, stride=4, baseline="blur") == (65, 0)


# --------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name", METHODS)
def test_output_contract_and_float64(name: str) -> None:
    model, x = tiny_cnn(), images()
    out = xm.attribute(name, model, x, target=0, **FAST[name])
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32 and out.device == x.device
    assert not out.requires_grad and torch.isfinite(out).all() and out.abs().sum() > 0
    out64 = xm.attribute(name, model.double(), x.double(), target=0, **FAST[name])
    assert out64.dtype == torch.float32 and torch.isfinite(out64).all()
    if name not in ("meaningful_perturbation", "extremal_perturbation"):  # optimisation paths may drift apart
        torch.testing.assert_close(out64, out, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", METHODS)
def test_model_untouched(name: str, mode: str) -> None:
    model = tiny_cnn()
    mix_state(model, mode, flip=model.features[1], freeze=model.features[0].weight, not_inplace=model.features[5])
    with model_left_as_is(model):
        xm.attribute(name, model, images(), target=2, **FAST[name])
    # raises inside the method, after the forward pass
    with model_left_as_is(model), pytest.raises(ValueError, match="target"):
        xm.attribute(name, model, images(), target=7, **FAST[name])


@pytest.mark.parametrize("name", METHODS)
def test_batched_equals_per_image(name: str) -> None:
    # The known-answer model has no convolution whose result could depend on the batch size,
    # so even the optimisation-based methods must agree to rounding.
    model, x = RegionModel(), region_images(3)
    t = torch.tensor([0, 2, 0])
    params = dict(FAST[name])
    batch = xm.attribute(name, model, x, target=t, internal_batch=5, **params)
    single = torch.cat([xm.attribute(name, model, x[i : i + 1], target=int(t[i]), **params) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_works_under_inference_mode_and_with_progress(name: str) -> None:
    model = tiny_cnn()
    expected = xm.attribute(name, model, images(2), target=1, **FAST[name])
    with torch.inference_mode():
        out = xm.attribute(name, model, images(2), target=1, progress=True, **FAST[name])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", ["occlusion", "lime", "prediction_difference", "rise"])
@pytest.mark.parametrize("internal_batch", [1, 7])
def test_forward_batches_bounded(name: str, internal_batch: int) -> None:
    model = tiny_cnn()
    sizes, handle = max_batch_seen(model)
    try:
        out = xm.attribute(name, model, images(3), target=0, internal_batch=internal_batch, **FAST[name])
    finally:
        handle.remove()
    assert max(sizes) <= internal_batch
    assert max(sizes) == internal_batch or internal_batch > 3  # chunks are filled, not one image at a time
    torch.testing.assert_close(out, xm.attribute(name, model, images(3), target=0, **FAST[name]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["meaningful_perturbation", "extremal_perturbation"])
def test_optimisation_batches_bounded(name: str) -> None:
    model = tiny_cnn()
    sizes, handle = max_batch_seen(model)
    try:
        xm.attribute(name, model, images(3), target=0, internal_batch=2, **FAST[name])
    finally:
        handle.remove()
    assert max(sizes) <= 2


@pytest.mark.parametrize(
    ("name", "params", "error", "match"),
    [
        ("occlusion", {"baseline": "grey"}, ValueError, "baseline='grey'.*'blur'"),
        ("occlusion", {"baseline": [0.0]}, TypeError, "baseline"),
        ("lime", {"segmentation": "felzenszwalb"}, ValueError, "segmentation.*slic"),
        ("lime", {"segmentation": torch.zeros(5, 5, dtype=torch.long)}, ValueError, "segmentation must have shape"),
        ("lime", {"segmentation": torch.zeros(SIZE, SIZE)}, TypeError, "segmentation must hold integer"),
        ("lime", {"kernel_width": 0.0}, ValueError, "kernel_width"),
        ("lime", {"score": "softmax"}, ValueError, "score.*probability"),
        ("lime", {"samples": 0}, ValueError, "samples"),
        ("prediction_difference", {"sampling": "gibbs"}, ValueError, "sampling.*conditional"),
        ("prediction_difference", {"window": 40}, ValueError, "window"),
        ("prediction_difference", {"padding": 0}, ValueError, "padding"),
        ("prediction_difference", {"laplace": -1.0}, ValueError, "laplace"),
        ("prediction_difference", {"reference": "imagenet"}, TypeError, "reference"),
        ("prediction_difference", {"reference": torch.zeros(2, 1, 8, 8)}, ValueError, "reference"),
        ("rise", {"p": 0.0}, ValueError, "p must"),
        ("rise", {"masks": 0}, ValueError, "masks"),
        ("rise", {"cells": 2.5}, ValueError, "cells"),
        ("rise", {"seed": 1.5}, TypeError, "seed"),
        ("meaningful_perturbation", {"perturbation": "zeros"}, ValueError, "perturbation.*blur"),
        ("meaningful_perturbation", {"lr": 0}, ValueError, "lr"),
        ("meaningful_perturbation", {"jitter": -1}, ValueError, "jitter"),
        ("meaningful_perturbation", {"report": 3}, TypeError, "report"),
        ("meaningful_perturbation", {"steps": 0}, ValueError, "steps"),
        ("extremal_perturbation", {"area": 1.5}, ValueError, "area"),
        ("extremal_perturbation", {"area": []}, ValueError, "area"),
        ("extremal_perturbation", {"variant": "preserve"}, ValueError, "variant.*preservation"),
        ("extremal_perturbation", {"levels": 1}, ValueError, "levels"),
        ("extremal_perturbation", {"jitter": 1}, TypeError, "jitter"),
    ],
)
def test_bad_parameters(name: str, params: dict, error: type, match: str) -> None:
    model = tiny_cnn()
    with model_left_as_is(model), pytest.raises(error, match=match):
        xm.attribute(name, model, images(2), **{**FAST[name], **params})


# --------------------------------------------------------------------------- known answer


KNOWN = [
    ("occlusion", {"window": 4, "stride": 2}),
    ("occlusion", {"window": 4, "stride": 2, "baseline": "blur"}),
    ("lime", {"samples": 400, "segmentation": block_segmentation()}),
    ("rise", {"masks": 3000, "cells": 8}),
    ("prediction_difference", {"samples": 4, "sampling": "marginal"}),
    ("prediction_difference", {"samples": 4, "sampling": "conditional"}),
    ("meaningful_perturbation", {"steps": 100, "mask_size": 32}),
    ("meaningful_perturbation", {"steps": 100, "mask_size": 32, "perturbation": "constant"}),
    ("extremal_perturbation", {"steps": 100, "area": 0.0625, "jitter": False}),
    ("extremal_perturbation", {"steps": 100, "area": 0.0625, "jitter": False, "variant": "deletion"}),
    ("extremal_perturbation", {"steps": 100, "area": [0.0625, 0.2], "jitter": False, "variant": "dual"}),
]


@pytest.mark.parametrize(("name", "params"), KNOWN, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KNOWN)])
def test_known_answer_region_ranked_first(name: str, params: dict) -> None:
    model, x = RegionModel(), region_images(3)
    out = xm.attribute(name, model, x, target=0, **params)
    hits = hit_rate(out)
    assert hits.mean() >= 0.8 and hits.min() >= 0.7, hits
    # a model reading R2 for class 2: the evidence moves there
    if name in ("occlusion", "prediction_difference"):
        x2 = x.clone()
        x2[:, 1, R2[0], R2[1]] += 1.5 * checker(8)
        assert hit_rate(xm.attribute(name, model, x2, target=2, **params), R2).min() >= 0.8


# --------------------------------------------------------------------------- occlusion


@pytest.mark.parametrize("model_fn", [tiny_cnn, RegionModel])
def test_occlusion_blur_baseline_matches_captum(model_fn) -> None:  # noqa: ANN001
    from captum.attr import Occlusion

    model, x = model_fn(), images(2)
    t = torch.tensor([0, 2])
    blurred = _core.gaussian_blur(x, _core.default_blur_sigma((SIZE, SIZE)))
    ours = xm.attribute("occlusion", model, x, target=t, window=8, stride=4, baseline="blur")
    theirs = Occlusion(model).attribute(
        x, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), baselines=blurred, target=t
    )[:, 0].detach()
    for i in range(2):
        assert pearson(ours[i], theirs[i]) >= 0.99
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_gaussian_blur_matches_scipy() -> None:
    from scipy.ndimage import gaussian_filter

    x = images(1, 20, 24).double()
    ours = _core.gaussian_blur(x, 1.7)
    theirs = gaussian_filter(x.numpy(), sigma=(0, 0, 1.7, 1.7), mode="nearest", truncate=math.ceil(3 * 1.7) / 1.7)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-10)
    assert _core.gaussian_blur(x, 0) is x


# --------------------------------------------------------------------------- LIME


def test_lime_matches_captum_with_the_same_samples() -> None:
    """Captum's Lime fed our superpixels, our on/off samples (via perturb_func), our kernel and
    sklearn's Ridge(alpha=1) gives the same coefficients: same surrogate, same fit."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    model, x = tiny_cnn(), images(2)
    t = torch.tensor([1, 2])
    samples, seed, width = 120, 3, 0.25
    seg, counts = pt.superpixels(x, "slic", 12)
    ours = xm.attribute("lime", model, x, target=t, samples=samples, segmentation=seg, seed=seed, kernel_width=width)
    design = pt.lime_design(samples, int(counts.max()), seed, x.device)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        return model(inp).softmax(1)

    for i in range(2):
        k = int(counts[i])

        def perturb(original, **kwargs):  # noqa: ANN001, ANN202, ARG001
            for row in design[:, :k]:  # the first k columns: what image i gets in the batch
                yield row[None].long()

        def similarity(original, perturbed, sample, **kwargs) -> float:  # noqa: ANN001, ARG001
            d = 1 - math.sqrt(float(sample.sum()) / k)
            return math.exp(-(d**2) / (2 * width**2))

        lime = Lime(forward, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=similarity, perturb_func=perturb)
        theirs = lime.attribute(
            x[i : i + 1], target=int(t[i]), feature_mask=seg[i][None, None], baselines=0.0,
            n_samples=samples, perturbations_per_eval=32,
        )[0, 0]
        assert pearson(ours[i], theirs) >= 0.999
        torch.testing.assert_close(ours[i], theirs.float(), atol=1e-4, rtol=1e-3)


def test_lime_exact_on_linear_model() -> None:
    """With the logit of a linear model the surrogate is exact: coefficient of superpixel k =
    sum over its pixels of w * (x - baseline), whatever the samples and weights (ridge=0)."""
    model = LinearModel((3, 16, 16), 3).eval()
    x = images(2, 16, 16)
    t = torch.tensor([0, 2])
    seg = block_segmentation(16, 4)
    out = xm.attribute("lime", model, x, target=t, samples=200, segmentation=seg, ridge=0.0, score="logit", baseline="mean")
    w = model.linear.weight.detach()[t].view(2, 3, 16, 16)
    contrib = (w * (x - x.mean(dim=(2, 3), keepdim=True))).sum(1)  # (B, H, W)
    per_segment = torch.zeros(2, 16).index_add_(1, seg.flatten(), contrib.flatten(1))
    torch.testing.assert_close(out, per_segment[:, seg], atol=1e-4, rtol=1e-4)


def test_lime_superpixels_and_design() -> None:
    x = region_images(2)
    for method in ("slic", "quickshift"):
        seg, counts = pt.superpixels(x, method, 20)
        assert seg.shape == (2, SIZE, SIZE) and seg.dtype == torch.long
        for i in range(2):  # labels are 0..K-1, all used
            assert torch.equal(torch.unique(seg[i]), torch.arange(int(counts[i])))
    _, counts = pt.superpixels(x, "slic", 20)
    assert all(8 <= int(c) <= 30 for c in counts)
    # a user labelling (H, W) is broadcast and renumbered
    labels = block_segmentation() * 10 + 7
    seg, counts = pt.superpixels(x, labels, 20)
    assert counts.tolist() == [64, 64] and torch.equal(seg[1], block_segmentation())
    # the map is constant on every superpixel
    model = tiny_cnn()
    out = xm.attribute("lime", model, x, target=1, samples=50, segmentation=labels)
    for s in range(64):
        values = out[0][seg[0] == s]
        assert torch.allclose(values, values[0].expand_as(values))
    # the design: first row all on, 0/1 values, prefix-consistent columns, seeded
    d = pt.lime_design(100, 12, 5, x.device)
    assert torch.all(d[0] == 1) and set(d.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(pt.lime_design(100, 20, 5, x.device)[:, :12], d)
    assert not torch.equal(pt.lime_design(100, 12, 6, x.device), d)
    assert 0.4 < float(d[1:].mean()) < 0.6


def test_lime_seed() -> None:
    model, x = tiny_cnn(), images(2)
    a = xm.attribute("lime", model, x, target=0, **FAST["lime"])
    torch.testing.assert_close(xm.attribute("lime", model, x, target=0, **FAST["lime"]), a)
    assert not torch.allclose(xm.attribute("lime", model, x, target=0, seed=1, **FAST["lime"]), a)


# --------------------------------------------------------------------------- RISE


def test_rise_seed_masks_and_formula() -> None:
    model, x = tiny_cnn(), images(2)
    a = xm.attribute("rise", model, x, target=0, **FAST["rise"])
    torch.testing.assert_close(xm.attribute("rise", model, x, target=0, **FAST["rise"]), a)
    assert not torch.allclose(xm.attribute("rise", model, x, target=0, seed=1, **FAST["rise"]), a)
    unseeded = [xm.attribute("rise", model, x, target=0, seed=None, **FAST["rise"]) for _ in range(2)]
    assert not torch.allclose(*unseeded)  # seed=None: fresh masks every call
    # masks: smooth values in [0, 1] with mean about p
    grids, shifts = pt.rise_grids(500, 4, 0.3, (SIZE, SIZE), 0, x.device)
    masks = pt.rise_masks(grids, shifts, (SIZE, SIZE))
    assert masks.shape == (500, SIZE, SIZE) and masks.min() >= 0 and masks.max() <= 1 + 1e-6
    assert abs(float(masks.mean()) - 0.3) < 0.03
    assert int(shifts.max()) == math.ceil(SIZE / 4) - 1 and int(shifts.min()) == 0
    # the formula: sum_i p(target | x * M_i) M_i / (N p), by a plain loop
    grids, shifts = pt.rise_grids(64, 4, 0.5, (SIZE, SIZE), 0, x.device)
    masks = pt.rise_masks(grids, shifts, (SIZE, SIZE))
    with torch.no_grad():
        probs = torch.stack([model(x * m).softmax(1)[:, 0] for m in masks], 1)  # (B, N)
    expected = torch.einsum("bn,nhw->bhw", probs, masks) / (64 * 0.5)
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-4)
    logit = xm.attribute("rise", model, x, target=0, score="logit", baseline="blur", **FAST["rise"])
    ref = _core.gaussian_blur(x, _core.default_blur_sigma((SIZE, SIZE)))
    with torch.no_grad():
        scores = torch.stack([model(ref + m * (x - ref))[:, 0] for m in masks], 1)
    torch.testing.assert_close(logit, torch.einsum("bn,nhw->bhw", scores, masks) / 32, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- prediction difference


def test_conditional_gaussian_formula_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    d = 7
    a_idx, b_idx = np.array([1, 4]), np.array([0, 2, 3, 5, 6])
    mean = rng.normal(size=(2, d))
    cov = []
    for _ in range(2):
        m = rng.normal(size=(d, 2 * d))
        cov.append(m @ m.T / (2 * d) + 0.1 * np.eye(d))
    cov = np.stack(cov)
    out = pt.conditional_gaussian(torch.from_numpy(mean), torch.from_numpy(cov), torch.from_numpy(a_idx), torch.from_numpy(b_idx))
    xb = rng.normal(size=len(b_idx))
    for g in range(2):
        s = cov[g]
        s_ab, s_bb, s_aa = s[np.ix_(a_idx, b_idx)], s[np.ix_(b_idx, b_idx)], s[np.ix_(a_idx, a_idx)]
        inv = np.linalg.inv(s_bb)
        mu = mean[g, a_idx] + s_ab @ inv @ (xb - mean[g, b_idx])
        ours_mu = out.mean_a[g].numpy() + out.gain[g].numpy() @ (xb - out.mean_b[g].numpy())
        np.testing.assert_allclose(ours_mu, mu, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(out.cov[g].numpy(), s_aa - s_ab @ inv @ s_ab.T, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose((out.chol[g] @ out.chol[g].T).numpy(), s_aa - s_ab @ inv @ s_ab.T, atol=1e-10)


def test_patch_gaussian_matches_numpy() -> None:
    x = images(2, 9, 10).double()
    mean, cov = pt.patch_gaussian(x, (3, 4), pooled=False)
    pooled_mean, pooled_cov = pt.patch_gaussian(x, (3, 4), pooled=True)
    s = pt.COV_SHRINKAGE
    arr = x.numpy()
    all_patches = []
    for i in range(2):
        patches = np.stack([arr[i, :, y : y + 3, z : z + 4].ravel() for y in range(7) for z in range(7)])  # (L, D)
        all_patches.append(patches)
        c = np.cov(patches, rowvar=False)
        expected = (1 - s) * c + s * np.trace(c) / c.shape[0] * np.eye(c.shape[0])
        np.testing.assert_allclose(mean[i].numpy(), patches.mean(0), atol=1e-12)
        np.testing.assert_allclose(cov[i].numpy(), expected, atol=1e-10)
    both = np.concatenate(all_patches)
    c = np.cov(both, rowvar=False)
    np.testing.assert_allclose(pooled_mean[0].numpy(), both.mean(0), atol=1e-12)
    np.testing.assert_allclose(pooled_cov[0].numpy(), (1 - s) * c + s * np.trace(c) / c.shape[0] * np.eye(c.shape[0]), atol=1e-10)


def test_prediction_difference_weight_of_evidence() -> None:
    """One window covering the whole image, marginal sampling with std 0: every sample is the
    constant image `mean`, so WE = log2 odds p(c|x) - log2 odds p(c|mean) with the Laplace correction."""
    model, x = tiny_cnn(), images(2)
    t = torch.tensor([0, 2])
    eps = 0.05  # large, so the Laplace correction's K (3 classes) matters
    out = xm.attribute(
        "prediction_difference", model, x, target=t, window=SIZE, stride=SIZE, samples=3,
        sampling="marginal", reference=(0.25, 0.0), laplace=eps,
    )
    with torch.no_grad():
        p = model(x).double().softmax(1).gather(1, t[:, None])[:, 0]
        q = model(torch.full_like(x, 0.25)).double().softmax(1).gather(1, t[:, None])[:, 0]

    def log2_odds(v: torch.Tensor) -> torch.Tensor:
        v = (v + eps) / (1 + 3 * eps)
        return torch.log2(v / (1 - v))

    expected = (log2_odds(p) - log2_odds(q)).float()[:, None, None].expand(2, SIZE, SIZE)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_prediction_difference_reference_images_and_seed() -> None:
    model, x = RegionModel(), region_images(2)
    pure_noise = images(4) * 0.5
    params = {"samples": 4, "window": 4, "stride": 2}
    for sampling in ("marginal", "conditional"):
        out = xm.attribute("prediction_difference", model, x, target=0, sampling=sampling, reference=pure_noise, **params)
        assert hit_rate(out).min() >= 0.8
        again = xm.attribute("prediction_difference", model, x, target=0, sampling=sampling, reference=pure_noise, **params)
        torch.testing.assert_close(out, again)
        other = xm.attribute("prediction_difference", model, x, target=0, sampling=sampling, seed=1, **params)
        assert not torch.allclose(other, out)
    # a model that ignores the image: no evidence anywhere
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 3))
    with torch.no_grad():
        flat[1].weight.zero_()
    torch.testing.assert_close(
        xm.attribute("prediction_difference", flat, x, target=1, **params), torch.zeros(2, SIZE, SIZE), atol=1e-6, rtol=0
    )


# --------------------------------------------------------------------------- meaningful perturbation


def test_meaningful_perturbation_drops_the_score_known_answer() -> None:
    model, x = RegionModel(), region_images(3)
    info: dict = {}
    out = xm.attribute("meaningful_perturbation", model, x, target=0, steps=150, mask_size=8, report=info.update)
    assert set(info) == {"loss", "steps", "converged", "score", "original"}
    assert info["steps"].dtype == torch.long and info["converged"].dtype == torch.bool and info["loss"].shape == (3,)
    assert (info["score"] < info["original"] - 0.5).all(), info
    # the map is 1 - the upsampled mask, and applying that mask gives the reported score
    assert out.min() >= 0 and out.max() <= 1
    keep = 1 - out[:, None]
    blurred = _core.gaussian_blur(x, _core.default_blur_sigma((SIZE, SIZE)))
    with torch.no_grad():
        score = model(x * keep + blurred * (1 - keep)).softmax(1)[:, 0]
    torch.testing.assert_close(score, info["score"], atol=1e-5, rtol=1e-4)


def test_meaningful_perturbation_drops_the_score_shapes_cnn() -> None:
    import zoo

    model = zoo.load_model("shapes-cnn").eval()
    batch = zoo.load_dataset("shapes", limit=3).load(0, 3)
    x = model.preprocess(torch.from_numpy(batch.images))
    info: dict = {}
    out = xm.attribute("meaningful_perturbation", model, x, target=torch.as_tensor(batch.labels), steps=80, report=info.update)
    assert (info["original"] > 0.9).all()
    assert (info["score"] < info["original"] - 0.5).all(), info
    deleted = (out > 0.5).float().mean((1, 2))
    assert (deleted < 0.5).all(), deleted  # a region, not the whole image


def test_meaningful_perturbation_early_stop_noise_and_jitter() -> None:
    model, x = RegionModel(), region_images(2)
    info: dict = {}
    xm.attribute("meaningful_perturbation", model, x, target=0, steps=200, tol=0.05, patience=5, report=info.update)
    assert info["converged"].all() and (info["steps"] < 200).all()
    info.clear()
    xm.attribute("meaningful_perturbation", model, x, target=0, steps=30, tol=0.0, report=info.update)
    assert not info["converged"].any() and (info["steps"] == 30).all()
    a = xm.attribute("meaningful_perturbation", model, x, target=0, steps=20, perturbation="noise", jitter=2)
    torch.testing.assert_close(xm.attribute("meaningful_perturbation", model, x, target=0, steps=20, perturbation="noise", jitter=2), a)
    assert not torch.allclose(xm.attribute("meaningful_perturbation", model, x, target=0, steps=20, perturbation="noise", jitter=2, seed=1), a)


def test_optimiser_freezes_converged_rows_and_matches_torch_adam() -> None:
    """Per-row Adam equals torch.optim.Adam (with the clamp), and a frozen row stops moving."""
    target = torch.tensor([[0.2, 0.9], [0.6, 0.1], [0.4, 0.4]])

    def objective(p: torch.Tensor, i: torch.Tensor, step: int) -> torch.Tensor:  # noqa: ARG001
        return ((p - target[i]) ** 2).sum(1)

    start = torch.full((3, 2), 0.5)
    ours, info = po.optimise(start, objective, steps=25, lr=0.05, method="adam", tol=0.0, patience=3, chunk=2)
    p = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.05)
    for _ in range(25):
        opt.zero_grad()
        objective(p, torch.arange(3), 0).sum().backward()
        opt.step()
        with torch.no_grad():
            p.clamp_(0, 1)
    torch.testing.assert_close(ours, p.detach())
    assert info.steps.tolist() == [25, 25, 25] and not info.converged.any()
    # SGD with momentum 0.9 and dampening 0.9, as torch.optim.SGD
    ours, _ = po.optimise(start, objective, steps=10, lr=0.3, method="sgd", tol=0.0, patience=3, chunk=3)
    p = start.clone().requires_grad_(True)
    opt = torch.optim.SGD([p], lr=0.3, momentum=0.9, dampening=0.9)
    for _ in range(10):
        opt.zero_grad()
        objective(p, torch.arange(3), 0).sum().backward()
        opt.step()
        with torch.no_grad():
            p.clamp_(0, 1)
    torch.testing.assert_close(ours, p.detach())
    # row 2 starts at its optimum: its loss stays flat, it converges first and is frozen there
    start = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.4, 0.4]])
    ours, info = po.optimise(start, objective, steps=200, lr=0.05, method="adam", tol=1e-3, patience=3, chunk=3)
    assert bool(info.converged[2]) and int(info.steps[2]) < int(info.steps[:2].min())
    assert info.loss.shape == (3,) and float(info.loss[2]) < 1e-4


# --------------------------------------------------------------------------- extremal perturbation


@pytest.mark.parametrize("variant", ["preservation", "deletion", "dual"])
def test_extremal_area_constraint(variant: str) -> None:
    model, x = RegionModel(), region_images(2)
    areas = [0.05, 0.2]
    info: dict = {}
    out = xm.attribute(
        "extremal_perturbation", model, x, target=0, area=areas, variant=variant, steps=150, report=info.update
    )
    assert set(info) == {"loss", "steps", "converged", "area", "reward"}
    assert info["area"].shape == (2, 2) and info["loss"].shape == (2, 2)
    torch.testing.assert_close(info["area"], torch.tensor(areas).expand(2, 2), atol=0.035, rtol=0)
    # map = sum of the masks over areas: in [0, 2]; the small-area mask sits inside the large one
    assert out.min() >= 0 and out.max() <= 2.0 + 1e-6
    assert float((out > 1.5).float().mean()) <= 0.05 + 0.035


def test_extremal_single_area_is_the_mask_and_reward() -> None:
    model, x = RegionModel(), region_images(2)
    info: dict = {}
    out = xm.attribute("extremal_perturbation", model, x, target=0, area=0.0625, steps=100, jitter=False, report=info.update)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    pyramid = po.blur_pyramid(x, 8, 20 * SIZE / 224)
    with torch.no_grad():
        logit = model(po.apply_pyramid(pyramid, out))[:, 0]
    torch.testing.assert_close(logit, info["reward"][:, 0], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        blurred = model(pyramid[:, 0])[:, 0]  # the whole image blurred
    assert (info["reward"][:, 0] > blurred + 2).all()


class ChannelFeatures(nn.Module):
    """8 distinct channels: channel 0 = relu(x_0) inside R only; channel k >= 1 = (1 + k / 10) relu(x_{k % 3})."""

    def __init__(self) -> None:
        super().__init__()
        inside = torch.zeros(SIZE, SIZE)
        inside[R] = 1
        self.register_buffer("inside", inside)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rest = [(1 + k / 10) * torch.relu(x[:, k % 3]) for k in range(1, 8)]
        return torch.stack([torch.relu(x[:, 0]) * self.inside, *rest], 1)


class ChannelModel(nn.Module):
    """Known channel answer: logit 0 = 8 * mean(channel 0) - 0.5 * sum of the other channels' means."""

    def __init__(self) -> None:
        super().__init__()
        self.features = ChannelFeatures()
        self.head = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.head(self.features(x).mean((2, 3)))
        logit = 8 * a[:, 0] - 0.5 * a[:, 1:].sum(1)
        return torch.stack([logit, torch.zeros_like(logit), a[:, 1]], 1)


@pytest.mark.parametrize("variant", ["preservation", "deletion", "dual"])
def test_extremal_channels_known_answer(variant: str) -> None:
    model, x = ChannelModel().eval(), region_images(2)
    info: dict = {}
    with model_left_as_is(model):
        out = xm.attribute(
            "extremal_perturbation", model, x, target=0, area=[0.125, 0.25], variant=variant, channels="features",
            steps=150, report=info.update,
        )
    assert set(info) == {"loss", "steps", "converged", "area", "reward", "channels"}
    masks = info["channels"]
    assert masks.shape == (2, 2, 8) and masks.min() >= 0 and masks.max() <= 1
    torch.testing.assert_close(info["area"], torch.tensor([0.125, 0.25]).expand(2, 2))
    assert (masks[:, :, 0] > 0.9).all(), masks  # the channel the model reads is kept at every area
    assert (masks[:, 0, 1:] < 0.1).all(), masks
    # the map is sum over areas of sum_k m_k A_k, upsampled (here the layer's grid is the image's)
    with torch.no_grad():
        acts = model.features(x)
    torch.testing.assert_close(out, (masks.sum(1)[:, :, None, None] * acts).sum(1), atol=1e-5, rtol=1e-5)
    smallest = (masks[:, 0, :, None, None] * acts).sum(1)  # the smallest area's part of the map
    inside = smallest[:, R[0], R[1]].sum((1, 2)) / smallest.sum((1, 2))
    assert (inside > 0.99).all(), inside  # it keeps channel 0, which fires only inside R
    # the reward is the target logit with the channels masked
    if variant == "preservation":
        with torch.no_grad():
            handle = model.features.register_forward_hook(lambda m, i, o: o * masks[:, 0, :, None, None])
            logit = model(x)[:, 0]
            handle.remove()
        torch.testing.assert_close(logit, info["reward"][:, 0], atol=1e-5, rtol=1e-5)


def test_extremal_channels_shapes_cnn_area_and_reward() -> None:
    """On the built-in model: masks over stage3's channels meet the area and keep more of the logit
    than random channel subsets of the same size; the map is on the layer's grid, upsampled."""
    import zoo

    model = zoo.load_model("shapes-cnn").eval()
    batch = zoo.load_dataset("shapes", limit=2).load(0, 2)
    x = model.preprocess(torch.from_numpy(batch.images))
    info: dict = {}
    out = xm.attribute("extremal_perturbation", model, x, channels="stage3", area=0.25, steps=60, report=info.update)
    assert out.shape == (2, *x.shape[-2:])
    keep = info["channels"][:, 0]
    k = keep.shape[1]
    torch.testing.assert_close(info["area"][:, 0], torch.full((2,), 0.25), atol=1.5 / k, rtol=0)
    g = torch.Generator().manual_seed(0)
    target = torch.as_tensor(batch.labels)
    for _ in range(5):
        random = torch.zeros(2, k)
        random[:, torch.randperm(k, generator=g)[: round(0.25 * k)]] = 1
        with torch.no_grad():
            handle = model.stage3.register_forward_hook(lambda m, i, o: o * random[:, :, None, None])
            logit = model(x).gather(1, target[:, None])[:, 0]
            handle.remove()
        assert (info["reward"][:, 0] > logit).all()


def test_extremal_channels_bad_layer() -> None:
    model, x = ChannelModel().eval(), region_images(1)
    with pytest.raises(ValueError, match="channels: .*valid layer names: features"):
        xm.attribute("extremal_perturbation", model, x, channels="nope", steps=2)
    with pytest.raises(ValueError, match="channels=.*head.*convolutional feature map"):
        xm.attribute("extremal_perturbation", model, x, channels="head", steps=2)
    with pytest.raises(TypeError, match="channels must be None or the dotted name"):
        xm.attribute("extremal_perturbation", model, x, channels=3, steps=2)
    assert_no_hooks(model)


def test_area_loss_shares_ties() -> None:
    reference = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    distinct = torch.tensor([[0.3, 0.9, 0.1, 0.5]], requires_grad=True)
    plain = ((distinct.sort(1).values - reference) ** 2).mean(1)
    torch.testing.assert_close(po.area_loss(distinct, reference), plain)
    (g1,) = torch.autograd.grad(po.area_loss(distinct, reference).sum(), distinct)
    (g2,) = torch.autograd.grad(plain.sum(), distinct)
    torch.testing.assert_close(g1, g2)
    tied = torch.ones(1, 4, requires_grad=True)  # the all-ones start: every parameter is pulled alike
    (g,) = torch.autograd.grad(po.area_loss(tied, reference).sum(), tied)
    torch.testing.assert_close(g, torch.full((1, 4), 2 * 0.75 / 4))
    partly = torch.tensor([[0.2, 0.7, 0.7, 0.1]], requires_grad=True)  # ranks 2 and 3 tie: targets (0 + 1) / 2
    (g,) = torch.autograd.grad(po.area_loss(partly, reference).sum(), partly)
    torch.testing.assert_close(g, torch.tensor([[0.2, 0.2, 0.2, 0.1]]) * 2 / 4)


def smooth_mask_brute_force(params: torch.Tensor, size: tuple[int, int], step: int, sigma: float) -> torch.Tensor:
    """The smooth max of the definition, pixel by pixel over the margin-extended image."""
    h, w = size
    margin, radius = round(sigma), 1 + math.ceil(sigma / step)
    gh, gw = params.shape[1:]
    out = torch.zeros(params.shape[0], h + 2 * margin, w + 2 * margin, dtype=torch.float64)
    for yi, y in enumerate(range(-margin, h + margin)):
        for xi, x in enumerate(range(-margin, w + margin)):
            values = []
            for iy in range(y // step - radius, y // step + radius + 1):
                for ix in range(x // step - radius, x // step + radius + 1):
                    inside = 0 <= iy < gh and 0 <= ix < gw
                    p = params[:, iy, ix] if inside else torch.zeros(params.shape[0], dtype=torch.float64)
                    d = math.hypot(y - (iy * step + (step - 1) / 2), x - (ix * step + (step - 1) / 2))
                    values.append(p * math.exp(-2 * max(d / sigma - 0.5, 0) ** 2))
            v = torch.stack(values, 1)
            out[:, yi, xi] = (v * torch.softmax(20 * v, 1)).sum(1)
    return out


@pytest.mark.parametrize(("size", "step", "sigma", "stride"), [((13, 17), 2, 5.0, 1), ((10, 9), 1, 3.0, 1), ((14, 18), 4, 5.0, 2)])
def test_smooth_mask_matches_definition(size: tuple[int, int], step: int, sigma: float, stride: int) -> None:
    gen = po.SmoothMask(size, step, sigma, torch.device("cpu"), torch.float64, stride=stride)
    params = torch.rand(2, *gen.grid, dtype=torch.float64)
    full = gen.full(params)
    expected = smooth_mask_brute_force(params, size, step, sigma)
    assert full.shape == expected.shape
    torch.testing.assert_close(full[:, ::stride, ::stride], expected[:, ::stride, ::stride])
    assert gen(params).shape == (2, *size) and full.min() >= 0 and full.max() <= 1
    # all-ones parameters: (nearly) all-ones mask inside the image; gradient flows at 0 and 1
    assert gen(torch.ones(1, *gen.grid, dtype=torch.float64)).min() > 0.9
    zeros = torch.zeros(1, *gen.grid, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(gen(zeros).sum(), zeros)
    assert grad.abs().sum() > 0


def test_blur_pyramid_levels() -> None:
    x = images(2, 12, 12)
    pyramid = po.blur_pyramid(x, 5, 3.0)
    assert pyramid.shape == (2, 5, 3, 12, 12)
    torch.testing.assert_close(pyramid[:, -1], x)
    torch.testing.assert_close(pyramid[:, 0], _core.gaussian_blur(x, 3.0))
    ones, zeros = torch.ones(2, 12, 12), torch.zeros(2, 12, 12)
    torch.testing.assert_close(po.apply_pyramid(pyramid, ones), x)
    torch.testing.assert_close(po.apply_pyramid(pyramid, zeros), pyramid[:, 0])
    half = po.apply_pyramid(pyramid, torch.full((2, 12, 12), 0.625))  # 0.625 * 4 = 2.5: between levels 2 and 3
    torch.testing.assert_close(half, 0.5 * (pyramid[:, 2] + pyramid[:, 3]))
