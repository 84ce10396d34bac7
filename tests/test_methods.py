"""Tests of the attribution method package `xai_methods` (registry, machinery, methods)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xai_methods as xm
from helpers import assert_no_hooks, images, linear_model, mix_state, model_left_as_is, pearson, resnet18, tiny_cnn
from xai_methods import _core, _registry

FOUNDATION = ["gradcam", "occlusion", "saliency"]
# Small parameters per method so every test stays fast on CPU.
FAST = {"saliency": {}, "gradcam": {}, "occlusion": {"window": 4, "stride": 4}}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


# --------------------------------------------------------------------------- helpers


def window_starts(length: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, length - window + 1, stride))
    return starts if starts[-1] == length - window else starts + [length - window]


# --------------------------------------------------------------------------- registry


def test_available_sorted_with_foundation_methods() -> None:
    names = xm.available()
    assert names == sorted(names)
    assert set(FOUNDATION) <= set(names)


def test_spec_fields() -> None:
    s = xm.spec("gradcam")
    assert isinstance(s, xm.MethodSpec)
    assert (s.name, s.category, s.needs_layer, s.needs_contrast) == ("gradcam", "cam", True, False)
    assert dict(s.defaults) == {"relu": True, "upsample": True, "reshape": None}
    assert s.passes((64, 64)) == (1, 1)
    assert "\n" not in s.summary and "Grad-CAM" in s.summary

    s = xm.spec("saliency")
    assert (s.category, s.needs_layer, dict(s.defaults)) == ("gradient", False, {"reduce": "max_abs"})
    assert s.cost(s.defaults, (32, 32)) == (1, 1)

    s = xm.spec("occlusion")
    assert s.category == "perturbation" and not s.needs_layer
    assert s.defaults["baseline"] == 0.0 and s.defaults["internal_batch"] == 256
    assert s.passes((16, 16), window=4, stride=4) == (16 + 1, 0)
    # default window round(224 / 8) = 28, stride 14: starts 0, 14, ..., 196 -> 15 per axis
    assert s.passes((224, 224)) == (15 * 15 + 1, 0)
    # windows cover the border: starts 0, 2, 4 and 5 on 8 pixels with window 3, stride 2
    assert s.passes((8, 8), window=3, stride=2) == (4 * 4 + 1, 0)

    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.defaults["window"] = 3  # type: ignore[index]


def test_unknown_method_lists_available() -> None:
    with pytest.raises(ValueError, match="unknown method 'gradkam'") as err:
        xm.spec("gradkam")
    assert all(name in str(err.value) for name in FOUNDATION)
    with pytest.raises(ValueError, match="saliency"):
        xm.attribute("nope", tiny_cnn(), images())


def test_unknown_parameter_is_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="'windw'") as err:
        xm.attribute("occlusion", tiny_cnn(), images(), windw=3)
    assert "window" in str(err.value) and "stride" in str(err.value)
    with pytest.raises(TypeError, match="'steps'"):
        xm.attribute("saliency", tiny_cnn(), images(), steps=3)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (torch.randn(3, 16, 16), ValueError),
        (torch.randint(0, 255, (2, 3, 16, 16)), TypeError),
        (np.zeros((2, 3, 16, 16), dtype=np.float32), TypeError),
        (torch.randn(0, 3, 16, 16), ValueError),
    ],
)
def test_bad_images(bad: object, error: type) -> None:
    with pytest.raises(error, match=r"images .*\(B, C, H, W\)|images must hold"):
        xm.attribute("saliency", tiny_cnn(), bad)


def test_bad_targets() -> None:
    model, x = tiny_cnn(), images()
    with pytest.raises(ValueError, match=r"target out of range.*5 classes.*0\.\.4"):
        xm.attribute("saliency", model, x, target=5)
    with pytest.raises(ValueError, match=r"target out of range"):
        xm.attribute("occlusion", model, x, target=torch.tensor([0, 1, -1]), **FAST["occlusion"])
    with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
        xm.attribute("gradcam", model, x, target=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="target"):
        xm.attribute("saliency", model, x, target=torch.tensor([0.0, 1.0, 2.0]))


def test_target_forms_agree_and_none_means_top1() -> None:
    model, x = tiny_cnn(), images()
    top1 = model(x).argmax(1)
    by_tensor = xm.attribute("saliency", model, x, target=top1)
    torch.testing.assert_close(xm.attribute("saliency", model, x), by_tensor)
    torch.testing.assert_close(xm.attribute("saliency", model, x, target=top1.tolist()), by_tensor)
    one = xm.attribute("saliency", model, x, target=2)
    torch.testing.assert_close(one, xm.attribute("saliency", model, x, target=torch.full((3,), 2)))
    assert not torch.allclose(one, xm.attribute("saliency", model, x, target=3))


def test_unknown_layer_lists_valid_names() -> None:
    model = tiny_cnn()
    with pytest.raises(ValueError, match="'stage9'") as err:
        xm.attribute("gradcam", model, images(), layer="stage9")
    message = str(err.value)
    assert "layer" in message
    assert all(n in message for n in ("stage1", "stage3.0", "stage3.2", "fc", "pool"))
    with pytest.raises(ValueError, match="not part of the model"):
        xm.attribute("gradcam", model, images(), layer=nn.Conv2d(16, 16, 3))
    with pytest.raises(ValueError, match=r"'fc'.*4-D"):
        xm.attribute("gradcam", model, images(), layer="fc")


def test_layer_and_contrast_rejected_where_not_taken() -> None:
    model = tiny_cnn()
    with pytest.raises(TypeError, match="saliency.*takes no layer"):
        xm.attribute("saliency", model, images(), layer="stage3")
    with pytest.raises(TypeError, match="gradcam.*no contrast"):
        xm.attribute("gradcam", model, images(), contrast=1)


def test_shared_parameter_values_checked() -> None:
    model = tiny_cnn()
    with pytest.raises(ValueError, match="reduce='mean'.*'max_abs'"):
        xm.attribute("saliency", model, images(), reduce="mean")
    with pytest.raises(ValueError, match="internal_batch"):
        xm.attribute("occlusion", model, images(), internal_batch=0)
    with pytest.raises(TypeError, match="upsample"):
        xm.attribute("gradcam", model, images(), upsample="no")
    with pytest.raises(ValueError, match="window"):
        xm.attribute("occlusion", model, images(), window=17)
    with pytest.raises(ValueError, match="baseline"):
        xm.attribute("occlusion", model, images(), window=4, baseline="grey")


def test_register_derives_spec_from_signature() -> None:
    @_registry.register("_test_input_x_grad", category="gradient", cost=lambda p, size: (1, 1))
    def input_x_grad(model, images, target, *, layer, reduce="sum"):  # noqa: ANN001, ANN202
        """Toy method.

        More text.
        """
        bp = _core.backprop(model, images, target)
        return _core.reduce_channels(bp.inputs * bp.grad, reduce)

    try:
        s = xm.spec("_test_input_x_grad")
        assert s.needs_layer and not s.needs_contrast
        assert dict(s.defaults) == {"reduce": "sum"} and s.summary == "Toy method."
        assert "_test_input_x_grad" in xm.available()
        out = xm.attribute("_test_input_x_grad", tiny_cnn(), images(), target=1, layer="stage2")
        assert out.shape == (3, 16, 16)
        with pytest.raises(ValueError, match="already registered"):
            _registry.register("_test_input_x_grad", category="gradient", cost=lambda p, s: (1, 1))(input_x_grad)
        with pytest.raises(ValueError, match="category"):
            _registry.register("_x", category="magic", cost=lambda p, s: (1, 1))
    finally:
        _registry._REGISTRY.pop("_test_input_x_grad", None)


# --------------------------------------------------------------------------- machinery


def test_default_layer() -> None:
    x = images(1, h=64, w=64)
    assert _core.default_layer(resnet18(), x) == "layer4"
    assert _core.default_layer(tiny_cnn(), images()) == "stage3"
    model = tiny_cnn()
    model.default_layer = "stage2"
    assert _core.default_layer(model, images()) == "stage2"
    # the probe neither changes modes nor leaves hooks
    model = tiny_cnn().train()
    with model_left_as_is(model):
        _core.default_layer(model, images())


def test_default_layer_probes_once_per_model_modules_and_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[tuple[int, ...]] = []
    probe = _core._probe_layer
    monkeypatch.setattr(_core, "_probe_layer", lambda m, x: probes.append(tuple(x.shape)) or probe(m, x))
    model, x = tiny_cnn(), images()
    first = xm.attribute("gradcam", model, x, target=0)
    again = xm.attribute("gradcam", model, x, target=0)
    assert torch.equal(first, again) and probes == [(3, 3, 16, 16)]
    assert _core.default_layer(tiny_cnn(), x) == "stage3" and len(probes) == 2  # another model probes anew
    # a module replaced: stage3 now ends at 1x1, so the last stage with a grid is stage2
    model.stage3 = nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(16, 16, 1))
    assert _core.default_layer(model, x) == "stage2" and len(probes) == 3
    bigger = images(h=32, w=32)  # another image shape: probed again, then remembered
    assert _core.default_layer(model, bigger) == _core.default_layer(model, bigger) == "stage3"
    assert len(probes) == 4


def test_untouched_restores_on_error() -> None:
    model = tiny_cnn().train()
    mix_state(model, "train", flip=model.stage2, freeze=model.stage1[0].weight, not_inplace=model.stage2[2])
    with model_left_as_is(model), pytest.raises(RuntimeError, match="boom"):
        with _core.untouched(model):
            model.stage3.register_forward_hook(lambda m, i, o: None)
            model.fc.register_forward_pre_hook(lambda m, i: None)
            assert not any(p.requires_grad for p in model.parameters())
            assert not any(m.inplace for m in model.modules() if hasattr(m, "inplace"))
            assert model.training and not model.stage2.training
            model.eval()
            raise RuntimeError("boom")


def test_helpers() -> None:
    a = torch.tensor([[[[1.0, -3.0]], [[-2.0, 2.0]]]])  # (1, 2, 1, 2)
    torch.testing.assert_close(_core.reduce_channels(a, "sum"), torch.tensor([[[-1.0, -1.0]]]))
    torch.testing.assert_close(_core.reduce_channels(a, "abs_sum"), torch.tensor([[[3.0, 5.0]]]))
    torch.testing.assert_close(_core.reduce_channels(a, "max_abs"), torch.tensor([[[2.0, 3.0]]]))
    assert _core.reduce_channels(a, None) is a
    with pytest.raises(ValueError, match="abs_sum"):
        _core.reduce_channels(a, "l2")
    assert [(s.start, s.stop) for s in _core.batched(5, 2)] == [(0, 2), (2, 4), (4, 5)]
    up = _core.upsample_to(torch.arange(4.0).view(1, 2, 2), (4, 4))
    torch.testing.assert_close(up, F.interpolate(torch.arange(4.0).view(1, 1, 2, 2), (4, 4), mode="bilinear")[:, 0])
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert _core.targets(logits, None, 2, torch.device("cpu")).tolist() == [1, 0]
    torch.testing.assert_close(_core.class_score(logits, torch.tensor([2, 0])), torch.tensor([1.0, 3.0]))


# --------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name", FOUNDATION)
def test_output_contract(name: str) -> None:
    model, x = tiny_cnn(), images()
    out = xm.attribute(name, model, x, target=0, **FAST[name])
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and out.device == x.device
    assert not out.requires_grad and torch.isfinite(out).all() and out.abs().sum() > 0
    # float64 models and images give float32 maps too
    out64 = xm.attribute(name, model.double(), x.double(), target=0, **FAST[name])
    assert out64.dtype == torch.float32
    torch.testing.assert_close(out64, out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FOUNDATION)
def test_batched_equals_per_image(name: str) -> None:
    model, x = tiny_cnn(), images(4)
    t = torch.tensor([0, 3, 2, 4])  # (class 1 has an all-zero Grad-CAM on this model)
    # internal_batch 5 mixes windows of different images in one forward pass
    params = {**FAST[name], **({"internal_batch": 5} if name == "occlusion" else {})}
    batch = xm.attribute(name, model, x, target=t, **params)
    single = torch.cat([xm.attribute(name, model, x[i : i + 1], target=int(t[i]), **FAST[name]) for i in range(4)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", FOUNDATION)
def test_model_untouched(name: str, mode: str) -> None:
    model = tiny_cnn()
    mix_state(model, mode, flip=model.stage2, freeze=model.stage1[0].weight, not_inplace=model.stage2[2])
    with model_left_as_is(model):
        xm.attribute(name, model, images(), target=2, **FAST[name])
    # raises inside the method, after the forward pass
    with model_left_as_is(model), pytest.raises(ValueError, match="target"):
        xm.attribute(name, model, images(), target=7, **FAST[name])
    if name == "gradcam":
        with model_left_as_is(model), pytest.raises(ValueError, match="4-D"):  # raises with the layer hook in place
            xm.attribute(name, model, images(), layer="fc", target=2)


@pytest.mark.parametrize("name", FOUNDATION)
def test_works_under_inference_mode(name: str) -> None:
    model = tiny_cnn()
    expected = xm.attribute(name, model, images(), target=0, **FAST[name])
    assert expected.abs().sum() > 0
    with torch.inference_mode():
        x = images()
        out = xm.attribute(name, model, x, target=0, **FAST[name])
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------- saliency


def test_saliency_closed_form_linear() -> None:
    model, x = linear_model(), images(3, 3, 8, 8)
    t = torch.tensor([0, 3, 2])
    w = model.linear.weight.detach()[t].view(3, 3, 8, 8)
    torch.testing.assert_close(xm.attribute("saliency", model, x, target=t, reduce=None), w)
    torch.testing.assert_close(xm.attribute("saliency", model, x, target=t), w.abs().amax(1))
    torch.testing.assert_close(xm.attribute("saliency", model, x, target=t, reduce="sum"), w.sum(1))
    torch.testing.assert_close(xm.attribute("saliency", model, x, target=t, reduce="abs_sum"), w.abs().sum(1))


@pytest.mark.parametrize("make", [linear_model, tiny_cnn])
def test_saliency_matches_captum(make) -> None:  # noqa: ANN001
    from captum.attr import Saliency

    model = make()
    x = images(3, 3, 8, 8) if make is linear_model else images()
    t = torch.tensor([1, 0, 2])
    ours = xm.attribute("saliency", model, x, target=t)
    theirs = Saliency(model).attribute(x.clone().requires_grad_(True), target=t, abs=True).amax(1)
    torch.testing.assert_close(ours, theirs.detach())


# --------------------------------------------------------------------------- grad-cam


def test_gradcam_equals_cam_on_gap_model() -> None:
    model, x = tiny_cnn(), images()
    t = torch.tensor([0, 2, 4])
    with torch.no_grad():
        a = model.stage3(model.stage2(model.stage1(x)))  # (B, K, 8, 8)
    cam = torch.einsum("bk,bkhw->bhw", model.fc.weight[t], a).clamp_min(0)
    grid = xm.attribute("gradcam", model, x, target=t, layer="stage3", upsample=False)
    assert grid.shape == (3, 8, 8)
    torch.testing.assert_close(grid, cam / (8 * 8))
    assert (cam > 0).any() and (cam == 0).any()  # the ReLU matters in this case
    # default layer is stage3; layer as a module works too; upsampling is bilinear
    full = xm.attribute("gradcam", model, x, target=t)
    torch.testing.assert_close(full, F.interpolate(grid[:, None], (16, 16), mode="bilinear")[:, 0])
    torch.testing.assert_close(xm.attribute("gradcam", model, x, target=t, layer=model.stage3), full)
    raw = xm.attribute("gradcam", model, x, target=t, layer="stage3", upsample=False, relu=False)
    torch.testing.assert_close(raw, torch.einsum("bk,bkhw->bhw", model.fc.weight[t], a) / 64)


def test_gradcam_resnet18_inplace_relu() -> None:
    model, x = resnet18(), images(2, h=64, w=64)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(m.inplace for m in relus)
    out = xm.attribute("gradcam", model, x, target=torch.tensor([1, 7]))
    assert out.shape == (2, 64, 64) and torch.isfinite(out).all()
    assert all(m.inplace for m in relus)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert_no_hooks(model)
    torch.testing.assert_close(out, xm.attribute("gradcam", model, x, target=torch.tensor([1, 7]), layer="layer4"))
    assert xm.attribute("gradcam", model, x, target=1, upsample=False).shape == (2, 2, 2)


def test_gradcam_layer_followed_by_inplace_add() -> None:
    """ResNet's BasicBlock does `out += identity` on bn2's output: the captured activation must stay bn2's."""
    model, x = resnet18(), images(2, h=64, w=64)
    t = torch.tensor([3, 8])
    ours = xm.attribute("gradcam", model, x, target=t, layer="layer4.1.bn2", relu=False, upsample=False)
    block = model.layer4[1]
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        h = model.layer4[0](model.layer3(model.layer2(model.layer1(stem))))
        a = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h)))))
    a.requires_grad_(True)
    logits = model.fc(torch.flatten(model.avgpool(F.relu(a + h)), 1))
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
    expected = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1).detach()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_gradcam_matches_pytorch_grad_cam() -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x = resnet18(), images(4, h=96, w=96)
    t = [1, 5, 7, 2]
    raw = xm.attribute("gradcam", model, x, target=torch.tensor(t), layer="layer4", relu=False, upsample=False)
    ours = xm.attribute("gradcam", model, x, target=torch.tensor(t), layer="layer4")
    with GradCAM(model=model, target_layers=[model.layer4]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in t]))
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        their_raw = torch.from_numpy(cam.get_cam_image(x, model.layer4, None, acts, grads))
    assert_no_hooks(model)
    # before any scaling: identical layer-grid maps
    torch.testing.assert_close(raw, their_raw, atol=1e-5, rtol=1e-4)
    # after their per-image min-max scaling: same maps
    compared = 0
    for ours_i, theirs_i in zip(ours, theirs):
        if ours_i.max() <= 0:
            assert theirs_i.max() <= 1e-6
            continue
        scaled = (ours_i - ours_i.min()) / (ours_i.max() - ours_i.min())
        assert pearson(scaled, theirs_i) >= 0.99
        compared += 1
    assert compared >= 2


# --------------------------------------------------------------------------- occlusion


def test_occlusion_closed_form_linear_non_overlapping() -> None:
    model, x = linear_model(), images(3, 3, 8, 8)
    t = torch.tensor([0, 3, 2])
    contrib = (model.linear.weight.detach()[t].view(3, 3, 8, 8) * x).sum(1)  # (B, H, W)
    per_window = contrib.view(3, 2, 4, 2, 4).sum(dim=(2, 4))  # (B, 2, 2)
    expected = per_window.repeat_interleave(4, 1).repeat_interleave(4, 2)
    out = xm.attribute("occlusion", model, x, target=t, window=4, stride=4, baseline=0.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # baseline "mean": the window is set to the image's per-channel mean
    centred = x - x.mean(dim=(2, 3), keepdim=True)
    contrib = (model.linear.weight.detach()[t].view(3, 3, 8, 8) * centred).sum(1)
    expected = contrib.view(3, 2, 4, 2, 4).sum(dim=(2, 4)).repeat_interleave(4, 1).repeat_interleave(4, 2)
    out = xm.attribute("occlusion", model, x, target=t, window=4, stride=4, baseline="mean")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def occlusion_reference(model: nn.Module, x: torch.Tensor, t: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Slow loop: every image, every window (border included), baseline 0."""
    b, _, h, w = x.shape
    total, count = torch.zeros(b, h, w), torch.zeros(h, w)
    with torch.no_grad():
        for i in range(b):
            score = model(x[i : i + 1])[0, t[i]]
            for y0 in window_starts(h, window, stride):
                for x0 in window_starts(w, window, stride):
                    occluded = x[i : i + 1].clone()
                    occluded[..., y0 : y0 + window, x0 : x0 + window] = 0.0
                    total[i, y0 : y0 + window, x0 : x0 + window] += score - model(occluded)[0, t[i]]
                    if i == 0:
                        count[y0 : y0 + window, x0 : x0 + window] += 1
    return total / count


@pytest.mark.parametrize("make", [linear_model, tiny_cnn])
def test_occlusion_overlapping_matches_reference_loop(make) -> None:  # noqa: ANN001
    model = make()
    x = images(2, 3, 8, 8) if make is linear_model else images(2, 3, 11, 11)
    t = torch.tensor([1, 3])
    # window 3, stride 2: overlapping windows, and the last start (H - 3) is off the stride grid
    out = xm.attribute("occlusion", model, x, target=t, window=3, stride=2, internal_batch=7)
    torch.testing.assert_close(out, occlusion_reference(model, x, t, 3, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [linear_model, tiny_cnn])
def test_occlusion_matches_captum(make) -> None:  # noqa: ANN001
    from captum.attr import Occlusion

    model = make()
    x = images(2, 3, 8, 8) if make is linear_model else images(2, 3, 16, 16)
    window, stride = (4, 2)  # starts 0, 2, ..., H - 4: the windows tile exactly
    t = torch.tensor([2, 1])
    ours = xm.attribute("occlusion", model, x, target=t, window=window, stride=stride, baseline=0.0)
    theirs = Occlusion(model).attribute(
        x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), baselines=0.0, target=t
    )[:, 0]
    for i in range(2):
        assert pearson(ours[i], theirs[i]) >= 0.99
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_occlusion_defaults_and_progress() -> None:
    model, x = tiny_cnn(), images(1)
    # defaults for 16x16: window max(2, round(16 / 8)) = 2, stride 1
    out = xm.attribute("occlusion", model, x, target=0)
    torch.testing.assert_close(out, xm.attribute("occlusion", model, x, target=0, window=2, stride=1, progress=True))
    assert xm.spec("occlusion").passes((16, 16)) == (15 * 15 + 1, 0)


def test_targets_made_under_inference_mode_work() -> None:
    """Targets often come from a prediction under torch.inference_mode(); autograd must accept them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    images = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        target = model(images).argmax(1)
    for name in ("saliency", "gradcam"):
        assert xm.attribute(name, model, images, target=target).shape == (2, 8, 8)
