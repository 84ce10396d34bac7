"""Tests of the CAM family (`xai_methods/cam.py`): closed forms, pytorch-grad-cam agreement, token layers, contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xai_methods as xm
import zoo
from helpers import TinyCNN, assert_no_hooks, images, mix_state, model_left_as_is, pearson, resnet18, tiny_cnn
from xai_methods import cam as cam_module
from xai_methods._core import reduce_channels

CAMS = [
    "cam",
    "gradcam",
    "hirescam",
    "xgradcam",
    "layercam",
    "gradcam_pp",
    "scorecam",
    "ablationcam",
    "eigencam",
    "guided_gradcam",
]
GRADIENT_CAMS = ["gradcam", "hirescam", "xgradcam", "layercam", "gradcam_pp"]
# internal_batch 7 mixes (image, channel) pairs of different images in one forward pass
FAST = {"scorecam": {"internal_batch": 7}, "ablationcam": {"internal_batch": 7}}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


# --------------------------------------------------------------------------- models and helpers


class DoubledPool(TinyCNN):
    """TinyCNN whose logits are fc(2 * GAP(A)): the shapes of a CAM head, not its values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(2 * self.pool(self.stage3(self.stage2(self.stage1(x)))).flatten(1))


class DoubledInPlace(nn.Module):
    """conv -> doubled (in place or not) -> ReLU -> GAP -> linear: an in-place op right after the layer."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, 2, 1)
        self.fc = nn.Linear(6, 4)
        self.in_place_double = in_place  # not named `inplace`: `untouched` must not switch it off

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        a = a.mul_(2.0) if self.in_place_double else a.mul(2.0)
        return self.fc(F.relu(a).mean(dim=(2, 3)))


class MLPHead(nn.Module):
    """Conv stage, global average pooling, then a two-layer MLP (hidden width = channel count): no CAM."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.hidden = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.hidden(self.features(x).mean(dim=(2, 3)))))


class Block(nn.Module):
    """Pre-norm transformer block on tokens (B, N, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """4x4 patch embedding -> tokens (B, 16 (+1 class token), 8) -> one block -> mean over tokens -> linear."""

    def __init__(self, cls_token: bool = True, dim: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, dim)) if cls_token else None
        self.block = Block(dim)
        self.head = nn.Linear(dim, classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
        return tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.tokens(x)).mean(1))


def tiny_vit(cls_token: bool = True) -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(cls_token).eval()


def shapes(n: int = 4) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The trained shapes-cnn, n normalised test images and their labels."""
    model = zoo.load_model("shapes-cnn")
    batch = zoo.load_dataset("shapes", limit=n).load(0, n)
    return model, model.preprocess(torch.from_numpy(batch.images)), torch.as_tensor(batch.labels, dtype=torch.long)


def grid_shape(name: str) -> tuple[int, ...]:
    return (3, 16, 16) if name == "guided_gradcam" else (3, 8, 8)


# --------------------------------------------------------------------------- registry


def test_specs() -> None:
    assert set(CAMS) <= set(xm.available())
    for name in CAMS:
        s = xm.spec(name)
        assert s.category == "cam" and s.needs_layer and not s.needs_contrast
        assert s.defaults["relu"] is True and s.defaults["reshape"] is None
        assert "\n" not in s.summary and "(" in s.summary and "20" in s.summary
        if name != "guided_gradcam":
            assert s.defaults["upsample"] is True
    assert xm.spec("cam").passes((64, 64)) == (1, 0)
    assert xm.spec("eigencam").passes((64, 64)) == (1, 0)
    for name in GRADIENT_CAMS:
        assert xm.spec(name).passes((64, 64)) == (1, 1)
    for name in ("scorecam", "ablationcam"):
        assert xm.spec(name).defaults["internal_batch"] == 64
        assert xm.spec(name).passes((64, 64)) == (1 + cam_module.ASSUMED_CHANNELS, 0)
    assert xm.spec("scorecam").defaults["softmax"] == "classes"
    assert xm.spec("guided_gradcam").passes((64, 64)) == (2, 2)
    assert xm.spec("guided_gradcam").defaults["reduce"] == "max_abs"
    assert "Score-CAM (Wang et al. 2020)" in xm.spec("scorecam").summary


def test_bad_parameters() -> None:
    model, x = tiny_cnn(), images()
    with pytest.raises(ValueError, match=r"softmax='logits'.*'classes'.*'channels'"):
        xm.attribute("scorecam", model, x, softmax="logits")
    with pytest.raises(TypeError, match="reshape"):
        xm.attribute("gradcam", model, x, reshape="tokens")
    with pytest.raises(ValueError, match=r"reshape must return .*\(B, K, h, w\)"):
        xm.attribute("eigencam", model, x, reshape=lambda a: a.flatten(2))
    with pytest.raises(TypeError, match="upsample"):
        xm.attribute("guided_gradcam", model, x, upsample=False)
    with pytest.raises(ValueError, match="internal_batch"):
        xm.attribute("ablationcam", model, x, internal_batch=0)


# --------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name", CAMS)
def test_output_contract(name: str) -> None:
    model, x = tiny_cnn(), images()
    out = xm.attribute(name, model, x, target=2, **FAST.get(name, {}))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and out.device == x.device
    assert not out.requires_grad and torch.isfinite(out).all() and out.abs().sum() > 0
    if name != "guided_gradcam":
        grid = xm.attribute(name, model, x, target=2, upsample=False, **FAST.get(name, {}))
        assert grid.shape == (3, 8, 8)  # stage3's grid
        torch.testing.assert_close(out, F.interpolate(grid[:, None], (16, 16), mode="bilinear")[:, 0])
        assert (grid >= 0).all()
        raw = xm.attribute(name, model, x, target=2, upsample=False, relu=False, **FAST.get(name, {}))
        torch.testing.assert_close(raw.clamp_min(0), grid)
    # float64 models and images give float32 maps too
    out64 = xm.attribute(name, model.double(), x.double(), target=2, **FAST.get(name, {}))
    assert out64.dtype == torch.float32
    torch.testing.assert_close(out64, out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CAMS)
def test_batched_equals_per_image(name: str) -> None:
    model, x = tiny_cnn(), images(4)
    t = torch.tensor([0, 3, 2, 4])
    batch = xm.attribute(name, model, x, target=t, **FAST.get(name, {}))
    single = torch.cat([xm.attribute(name, model, x[i : i + 1], target=int(t[i])) for i in range(4)])
    assert batch.abs().sum() > 0
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", CAMS)
def test_model_untouched(name: str, mode: str) -> None:
    model = tiny_cnn()
    mix_state(model, mode, flip=model.stage2, freeze=model.stage1[0].weight, not_inplace=model.stage2[2])
    with model_left_as_is(model, state=True):
        xm.attribute(name, model, images(), target=2, **FAST.get(name, {}))
    # raises inside the method, after the forward pass
    with model_left_as_is(model, state=True), pytest.raises(ValueError, match="target"):
        xm.attribute(name, model, images(), target=7, **FAST.get(name, {}))
    # raises with the layer hook in place
    with model_left_as_is(model, state=True), pytest.raises(ValueError, match="4-D"):
        xm.attribute(name, model, images(), layer="fc", target=2, **FAST.get(name, {}))


@pytest.mark.parametrize("name", CAMS)
def test_works_under_inference_mode(name: str) -> None:
    model = tiny_cnn()
    expected = xm.attribute(name, model, images(), target=2, **FAST.get(name, {}))
    with torch.inference_mode():
        x = images()
        out = xm.attribute(name, model, x, target=2, **FAST.get(name, {}))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_internal_batch_bounds_the_model_batch_and_keeps_results(name: str) -> None:
    model, x = tiny_cnn(), images(2)
    t = torch.tensor([0, 3])
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, inputs: sizes.append(inputs[0].shape[0]))
    try:
        results = {}
        for internal_batch in (5, 13, 64):
            sizes.clear()
            results[internal_batch] = xm.attribute(
                name, model, x, target=t, layer="stage3", internal_batch=internal_batch
            )
            # one pass on the batch, then 2 images x 16 channels of stage3 in chunks
            assert sizes[0] == 2 and max(sizes[1:]) == min(internal_batch, 32) and sum(sizes[1:]) == 2 * 16
    finally:
        handle.remove()
    torch.testing.assert_close(results[5], results[64], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[13], results[64], atol=1e-6, rtol=1e-5)
    assert results[64].abs().sum() > 0


@pytest.mark.parametrize("name", ["eigencam", "scorecam", "ablationcam"])
def test_forward_only_methods_capture_the_layer_output_before_in_place_ops(name: str) -> None:
    torch.manual_seed(0)
    in_place = DoubledInPlace(True).eval()
    out_of_place = DoubledInPlace(False).eval()
    out_of_place.load_state_dict(in_place.state_dict())
    x, t = images(2), torch.tensor([1, 2])
    ours = xm.attribute(name, in_place, x, target=t, layer="conv", relu=False, upsample=False)
    expected = xm.attribute(name, out_of_place, x, target=t, layer="conv", relu=False, upsample=False)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(ours, expected)


# --------------------------------------------------------------------------- CAM


@pytest.mark.parametrize("where", ["shapes-cnn", "resnet18"])
def test_cam_is_gradcam_times_grid_size(where: str) -> None:
    if where == "shapes-cnn":
        model, x, t = shapes(4)
        layer, grid = "stage3", 16 * 16
    else:
        model, x, t = resnet18(), images(3, h=96, w=96), torch.tensor([1, 5, 7])
        layer, grid = "layer4", 3 * 3
    for relu in (True, False):
        cam = xm.attribute("cam", model, x, target=t, layer=layer, relu=relu, upsample=False)
        gradcam = xm.attribute("gradcam", model, x, target=t, layer=layer, relu=relu, upsample=False)
        assert cam.abs().sum() > 0
        torch.testing.assert_close(cam, grid * gradcam, rtol=1e-4, atol=1e-5 * float(cam.abs().max()))


def test_cam_closed_form_excludes_bias() -> None:
    model, x = tiny_cnn(), images()
    t = torch.tensor([0, 2, 4])
    with torch.no_grad():
        a = model.stage3(model.stage2(model.stage1(x)))
    expected = torch.einsum("bk,bkhw->bhw", model.fc.weight[t], a)
    torch.testing.assert_close(xm.attribute("cam", model, x, target=t, relu=False, upsample=False), expected)
    upsampled = F.interpolate(expected.clamp_min(0)[:, None], (16, 16), mode="bilinear")[:, 0]
    torch.testing.assert_close(xm.attribute("cam", model, x, target=t), upsampled)


@pytest.mark.parametrize("case", ["resnet18-layer3", "mlp-head", "scaled-pool"])
def test_cam_refuses_models_without_gap_linear_head(case: str) -> None:
    if case == "resnet18-layer3":
        model, x, layer = resnet18(), images(2, h=64, w=64), "layer3"
    elif case == "mlp-head":
        model, x, layer = MLPHead().eval(), images(2), "features"
    else:  # right shapes, but the logits are fc(2 * GAP(A)): the numerical check must catch it
        model, x, layer = DoubledPool(), images(2), "stage3"
        model.load_state_dict(tiny_cnn().state_dict())
        model.eval()
    with model_left_as_is(model, state=True):
        with pytest.raises(ValueError, match=r"global-average-pooling \+ linear head.*gradcam"):
            xm.attribute("cam", model, x, layer=layer)
    assert xm.attribute("gradcam", model, x, layer=layer).shape == x.shape[:1] + x.shape[2:]


# --------------------------------------------------------------------------- Score-CAM, Ablation-CAM, Eigen-CAM


def scorecam_reference(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The authors' loop (haofanwang/Score-CAM): per image and channel, softmax score of the masked input."""
    acts: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: acts.append(o.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    a = acts[0]
    maps = []
    with torch.no_grad():
        for i in range(len(x)):
            total = torch.zeros(a.shape[2:])
            for k in range(a.shape[1]):
                up = F.interpolate(a[i : i + 1, k : k + 1], x.shape[2:], mode="bilinear", align_corners=False)
                if up.max() == up.min():
                    continue
                mask = (up - up.min()) / (up.max() - up.min())
                total += model(x[i : i + 1] * mask).softmax(1)[0, t[i]] * a[i, k]
            maps.append(total)
    return torch.stack(maps)


def ablation_reference(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Loop: zero channel k of the layer output, (S - S_k) / |S|, weighted sum of the channels."""
    acts: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: acts.append(o.detach().clone()))
    with torch.no_grad():
        scores = model(x).gather(1, t[:, None])[:, 0]
    handle.remove()
    a = acts[0]
    maps = []
    with torch.no_grad():
        for i in range(len(x)):
            total = torch.zeros(a.shape[2:])
            for k in range(a.shape[1]):

                def zero(m, inputs, output, k=k):  # noqa: ANN001, ANN202
                    output = output.clone()
                    output[:, k] = 0
                    return output

                handle = layer.register_forward_hook(zero)
                ablated = model(x[i : i + 1])[0, t[i]]
                handle.remove()
                total += (scores[i] - ablated) / scores[i].abs() * a[i, k]
            maps.append(total)
    return torch.stack(maps)


def test_scorecam_matches_authors_loop() -> None:
    model, x = tiny_cnn(), images(2)
    t = torch.tensor([0, 3])
    ours = xm.attribute("scorecam", model, x, target=t, relu=False, upsample=False, internal_batch=5)
    torch.testing.assert_close(ours, scorecam_reference(model, x, t, model.stage3), atol=1e-5, rtol=1e-4)


def test_scorecam_constant_channel_gets_no_weight() -> None:
    model, x = tiny_cnn(), images(2)
    # a dead stage3 channel (constant 0.3 after the ReLU): its mask is constant, so its weight must be 0
    with torch.no_grad():
        model.stage3[1].weight[5] = 0.0
        model.stage3[1].bias[5] = 0.3
    t = torch.tensor([0, 3])
    ours = xm.attribute("scorecam", model, x, target=t, relu=False, upsample=False)
    torch.testing.assert_close(ours, scorecam_reference(model, x, t, model.stage3), atol=1e-5, rtol=1e-4)


def test_ablationcam_matches_loop_including_negative_scores() -> None:
    model, x = tiny_cnn(), images(3)
    t = torch.tensor([0, 1, 4])
    with torch.no_grad():
        scores = model(x).gather(1, t[:, None])[:, 0]
    assert (scores < 0).any() and (scores > 0).any()  # both signs of S are exercised
    ours = xm.attribute("ablationcam", model, x, target=t, relu=False, upsample=False, internal_batch=6)
    torch.testing.assert_close(ours, ablation_reference(model, x, t, model.stage3), atol=1e-5, rtol=1e-4)


def test_ablationcam_runs_its_layer_once_and_only_a_layer_that_runs_once_is_skipped(monkeypatch) -> None:
    """The layer's output comes from the first pass and the layer itself does not run again: the maps are bit-identical to running it every time, and a forward already set on the layer's
    instance is put back. A module run twice per forward runs every time."""
    import contextlib

    from xai_methods import cam

    model, x = tiny_cnn(), images(3)
    t = torch.tensor([0, 1, 4])
    ran = []  # the layer's own work: its first convolution's calls
    model.stage3[0].register_forward_hook(lambda m, i, o: ran.append(1))
    kwargs = dict(target=t, layer=model.stage3, relu=False, upsample=False, internal_batch=6)
    with cam.forward_replaced(model.stage3, model.stage3.forward):  # an instance forward, to be kept
        fast = xm.attribute("ablationcam", model, x, **kwargs)
        assert len(ran) == 1 and "forward" in vars(model.stage3)  # the first pass only
    assert "forward" not in vars(model.stage3)
    ran.clear()
    with monkeypatch.context() as patched:
        patched.setattr(cam, "forward_replaced", lambda module, forward: contextlib.nullcontext())
        every_time = xm.attribute("ablationcam", model, x, **kwargs)
    assert len(ran) == 1 + -(-3 * 16 // 6) and torch.equal(fast, every_time)

    class Twice(nn.Module):  # one block applied twice: its output is not one tensor per forward
        def __init__(self) -> None:
            super().__init__()
            self.block, self.head = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)), nn.Linear(3, 4)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(torch.relu(self.block(z))).mean((2, 3)))

    torch.manual_seed(0)
    twice, calls = Twice().eval(), []
    twice.block[0].register_forward_hook(lambda m, i, o: calls.append(1))  # the block's own work
    got = xm.attribute("ablationcam", twice, x, target=t % 4, layer=twice.block, relu=False, upsample=False,
                       internal_batch=2)
    assert len(calls) == 2 * (1 + -(-3 * 3 // 2)) and torch.isfinite(got).all()


def test_eigencam_first_principal_component_and_sign() -> None:
    model, x = tiny_cnn(), images(3)
    ours = xm.attribute("eigencam", model, x, relu=False, upsample=False)
    with torch.no_grad():
        a = model.stage3(model.stage2(model.stage1(x))).double()
    for i in range(3):
        samples = a[i].flatten(1).T  # (hw, K)
        samples = samples - samples.mean(0)
        eigvals, eigvecs = torch.linalg.eigh(samples.T @ samples)
        projection = (samples @ eigvecs[:, -1]).view(8, 8).float()
        sign = 1.0 if pearson(projection, ours[i]) > 0 else -1.0
        torch.testing.assert_close(ours[i], sign * projection, atol=1e-4, rtol=1e-4)
        assert pearson(ours[i], a[i].mean(0)) > 0  # the sign convention
    # class-agnostic: the target does not matter
    by_target = [xm.attribute("eigencam", model, x, target=c) for c in (1, 3)]
    torch.testing.assert_close(by_target[0], by_target[1])


# --------------------------------------------------------------------------- Guided Grad-CAM


@pytest.mark.parametrize("reduce", ["max_abs", "sum", None])
def test_guided_gradcam_is_guided_backprop_times_gradcam(reduce: str | None) -> None:
    model, x = tiny_cnn(), images()
    t = torch.tensor([3, 2, 4])
    guided = xm.attribute("guided_backprop", model, x, target=t, reduce=None)
    heat = xm.attribute("gradcam", model, x, target=t, layer="stage2")
    ours = xm.attribute("guided_gradcam", model, x, target=t, layer="stage2", reduce=reduce)
    expected = reduce_channels(guided * heat[:, None], reduce)
    assert ours.shape == expected.shape
    assert (ours.flatten(1).abs().amax(1) > 1e-3 * ours.abs().max()).all()  # no image is negligible
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert xm.attribute("guided_gradcam", model, x, target=t).abs().sum() > 0  # default layer


# --------------------------------------------------------------------------- token layers


def test_tokens_to_grid() -> None:
    tokens = torch.arange(2 * 17 * 3.0).view(2, 17, 3)
    grid = cam_module.tokens_to_grid(tokens)
    assert grid.shape == (2, 3, 4, 4)
    torch.testing.assert_close(grid[1, :, 2, 3], tokens[1, 1 + 2 * 4 + 3])  # class token dropped
    grid = cam_module.tokens_to_grid(tokens[:, 1:])
    torch.testing.assert_close(grid[0, :, 1, 0], tokens[0, 1 + 4])
    with pytest.raises(ValueError, match="reshape="):
        cam_module.tokens_to_grid(tokens[:, 2:])  # 15 tokens


def test_gradcam_on_token_layer_equals_explicit_reshape_and_manual() -> None:
    model, x = tiny_vit(), images(3)
    t = torch.tensor([0, 3, 1])

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 1:].reshape(len(tokens), 4, 4, -1).permute(0, 3, 1, 2)

    default = xm.attribute("gradcam", model, x, target=t, layer="block", relu=False, upsample=False)
    explicit = xm.attribute("gradcam", model, x, target=t, layer="block", relu=False, upsample=False, reshape=reshape)
    assert default.shape == (3, 4, 4) and default.abs().sum() > 0
    torch.testing.assert_close(default, explicit)
    # manual: gradient of the target logit w.r.t. the block's output tokens
    tokens = model.block(model.tokens(x)).detach().requires_grad_(True)
    score = model.head(tokens.mean(1)).gather(1, t[:, None]).sum()
    (g,) = torch.autograd.grad(score, tokens)
    a, g = reshape(tokens.detach()), reshape(g)
    manual = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1)
    torch.testing.assert_close(default, manual, atol=1e-5, rtol=1e-4)
    # a reshape that does not give 4-D is refused
    with pytest.raises(ValueError, match="reshape"):
        xm.attribute("gradcam", model, x, target=t, layer="block", reshape=lambda tok: tok)


@pytest.mark.parametrize("name", CAMS)
def test_every_method_on_token_layer(name: str) -> None:
    model, x = tiny_vit(cls_token=False), images(2)
    t = torch.tensor([0, 2])
    with model_left_as_is(model, state=True):
        out = xm.attribute(name, model, x, target=t, layer="block", **FAST.get(name, {}))
        assert out.shape == (2, 16, 16) and torch.isfinite(out).all() and out.abs().sum() > 0
    if name == "cam":  # mean over all tokens == GAP of the grid: CAM applies and is 16 x Grad-CAM
        grad = xm.attribute("gradcam", model, x, target=t, layer="block", relu=False, upsample=False)
        cam = xm.attribute("cam", model, x, target=t, layer="block", relu=False, upsample=False)
        torch.testing.assert_close(cam, 16 * grad, atol=1e-5, rtol=1e-4)
    if name == "ablationcam":  # a token channel is feature k of every token

        def reference() -> torch.Tensor:
            tokens = model.block(model.tokens(x)).detach()
            scores = model.head(tokens.mean(1)).gather(1, t[:, None])[:, 0]
            ablated = torch.stack(
                [model.head(tokens.index_fill(2, torch.tensor([k]), 0.0).mean(1))[[0, 1], t] for k in range(8)], 1
            )
            weights = (scores[:, None] - ablated) / scores.abs()[:, None]
            return torch.einsum("bk,bkhw->bhw", weights, cam_module.tokens_to_grid(tokens)).detach()

        ours = xm.attribute(name, model, x, target=t, layer="block", relu=False, upsample=False)
        torch.testing.assert_close(ours, reference(), atol=1e-5, rtol=1e-4)


def test_cam_with_class_token_is_refused() -> None:
    # the mean runs over the class token too, so the logits are not fc(GAP(grid))
    with pytest.raises(ValueError, match="global-average-pooling"):
        xm.attribute("cam", tiny_vit(), images(2), layer="block")


# --------------------------------------------------------------------------- pytorch-grad-cam


def reference_maps(
    name: str, model: nn.Module, layer: nn.Module, x: torch.Tensor, t: torch.Tensor, raw: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pytorch-grad-cam's final maps (B, H, W) in [0, 1] and, if `raw`, its layer-grid maps before ReLU and scaling."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {
        "gradcam": pgc.GradCAM,
        "hirescam": pgc.HiResCAM,
        "xgradcam": pgc.XGradCAM,
        "layercam": pgc.LayerCAM,
        "gradcam_pp": pgc.GradCAMPlusPlus,
        "scorecam": pgc.ScoreCAM,
        "eigencam": pgc.EigenCAM,
        "ablationcam": pgc.AblationCAM,
    }[name]
    goals = [ClassifierOutputTarget(int(c)) for c in t]
    with cls(model=model, target_layers=[layer]) as method:
        full = torch.from_numpy(method(input_tensor=x, targets=goals))
        grid = None
        if raw:
            acts = method.activations_and_grads.activations[0].numpy()
            grads = method.activations_and_grads.gradients
            grads = grads[0].numpy() if grads else None
            grid = torch.from_numpy(method.get_cam_image(x, layer, goals, acts, grads, False))
    assert_no_hooks(model)
    return full, grid


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> list[float]:
    """Pearson r per image between our map, min-max scaled as pytorch-grad-cam does, and theirs."""
    rs = []
    for o, th in zip(ours, theirs):
        if o.max() <= 0:  # an all-zero map after the ReLU: theirs is all zero too
            assert th.max() <= 1e-6
            continue
        rs.append(pearson((o - o.min()) / (o.max() - o.min()), th))
    assert rs
    return rs


def compare_with_pytorch_grad_cam(
    name: str, model: nn.Module, layer: str, x: torch.Tensor, t: torch.Tensor, sign_free: bool = False, raw: bool = True
) -> None:
    params = {"softmax": "channels"} if name == "scorecam" else {}
    ours_grid = xm.attribute(name, model, x, target=t, layer=layer, relu=False, upsample=False, **params)
    ours = cam_module.finish(ours_grid, tuple(x.shape[2:]), relu=True, upsample=True)  # = upsample=True, relu=True
    theirs, their_grid = reference_maps(name, model, model.get_submodule(layer), x, t, raw=raw and name != "scorecam")
    if their_grid is not None:
        scale = float(ours_grid.abs().max())
        if sign_free:  # a principal component's sign is arbitrary: theirs is ours up to a sign per image
            signs = torch.tensor([1.0 if pearson(o, th) > 0 else -1.0 for o, th in zip(ours_grid, their_grid)])
            their_grid = their_grid * signs[:, None, None]
            keep = signs > 0  # their final maps are comparable where their sign is ours
            ours, theirs = ours[keep], theirs[keep]
        torch.testing.assert_close(ours_grid, their_grid, atol=1e-5 * scale, rtol=1e-4)
    assert min(agreement(ours, theirs)) >= 0.99


SHAPES_REFERENCE = GRADIENT_CAMS + ["scorecam", "eigencam", "ablationcam"]


@pytest.mark.parametrize("name", SHAPES_REFERENCE)
def test_matches_pytorch_grad_cam_on_shapes_cnn(name: str) -> None:
    model, x, labels = shapes(4)
    with torch.no_grad():
        top1 = model(x).argmax(1)
    t = torch.tensor([int(top1[0]), int(top1[1]), (int(top1[2]) + 1) % 4, int(top1[3])])  # one non-top-1 target
    if name in ("scorecam", "ablationcam"):  # 64 forward passes per image, twice: 3 images
        x, t, top1 = x[1:], t[1:], top1[1:]
    if name == "ablationcam":  # pytorch-grad-cam divides by S, we by |S|: same where S > 0
        with torch.no_grad():
            t = torch.where(model(x).gather(1, t[:, None])[:, 0] > 0, t, top1)
    compare_with_pytorch_grad_cam(name, model, "stage3", x, t, sign_free=name == "eigencam")


def test_scorecam_matches_pytorch_grad_cam_exactly_with_its_resize(monkeypatch: pytest.MonkeyPatch) -> None:
    """The only difference to pytorch-grad-cam's ScoreCAM is its mask upsampling (align_corners=True)."""
    model, x, _ = shapes(2)
    with torch.no_grad():
        t = model(x).argmax(1)
    ours = xm.attribute("scorecam", model, x, target=t, layer="stage3", relu=False, upsample=False, softmax="channels")
    monkeypatch.setattr(
        torch.nn, "UpsamplingBilinear2d", lambda size: nn.Upsample(size=size, mode="bilinear", align_corners=False)
    )
    _, theirs = reference_maps("scorecam", model, model.stage3, x, t, raw=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5 * float(ours.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("name", GRADIENT_CAMS + ["eigencam"])
def test_matches_pytorch_grad_cam_on_resnet18(name: str) -> None:
    model, x = resnet18(), images(4, h=96, w=96)
    compare_with_pytorch_grad_cam(name, model, "layer4", x, torch.tensor([1, 5, 7, 2]), sign_free=name == "eigencam")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_matches_pytorch_grad_cam_on_resnet18_slow(name: str) -> None:
    model, x = resnet18(), images(1, h=96, w=96)
    with torch.no_grad():
        t = model(x).argmax(1)  # a positive logit (Ablation-CAM divides by it)
    compare_with_pytorch_grad_cam(name, model, "layer4", x, t, raw=False)
