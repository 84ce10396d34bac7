"""Tests of DeepLIFT (`deeplift`, Rescale rule, and `deeplift_revealcancel`).

Numbers measured when these tests were written: the summation-to-delta error
|sum(map) - (S(x) - S(x0))| / |S(x) - S(x0)|, worst over zeros / blur / random baselines,
both rules, float64: shapes-cnn 9e-16, resnet18 1.2e-13, MLP 1.5e-14, the functional
model 6e-15; float32: shapes-cnn 4e-7, MLP 2e-6, resnet18 (random weights) 4e-5.
With the 1x1 identity convolutions of `captum_safe_shapes_cnn`, Captum's DeepLift and
ours agree to 1e-16 on shapes-cnn.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xai_methods as xm
import zoo
from helpers import ALL_HOOK_DICTS, LinearModel, model_left_as_is, resnet18
from xai_methods.deeplift import deeplift_attribution, deeplift_delta

METHODS = ["deeplift", "deeplift_revealcancel"]
RULE = {"deeplift": "rescale", "deeplift_revealcancel": "reveal_cancel"}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


# --------------------------------------------------------------------------- models and data


class MLP(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear -> ReLU -> Linear (distinct modules)."""

    def __init__(self, inputs: int = 3 * 4 * 4, hidden: tuple[int, int] = (16, 8), classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], classes)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x.flatten(1))))))


class Functional(nn.Module):
    """Nonlinearities only as functional / in-place calls, one ReLU module used twice, functional additions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x), inplace=True)
        h = F.max_pool2d(h, 3, stride=2, padding=1)  # overlapping windows
        r = self.act(self.conv2(h))
        r = self.conv3(r).relu_() + 0.5 * h  # in-place method, functional add with a constant factor
        r = self.act(r) - torch.sigmoid(self.conv3(r)) / 4  # the ReLU module again; a smooth nonlinearity
        r.clamp_(max=0.3)  # in place, result unused: the write-back must happen
        r = torch.tanh(r).mul(2.0)
        return self.fc(r.mean(dim=(2, 3)))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().double().eval()


def shapes_cnn() -> nn.Module:
    return zoo.load_model("shapes-cnn")


def shapes_images(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    model = shapes_cnn()
    batch = zoo.load_dataset("shapes", limit=n).load(0, n)
    return model.preprocess(torch.from_numpy(batch.images)), torch.as_tensor(batch.labels)


def randn(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def relative_gap(  # noqa: ANN001, ANN003
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, method: str, baseline, **params
) -> torch.Tensor:
    """|sum(map) - (S(x) - S(x0))| / |S(x) - S(x0)| with S from ordinary forward passes (no DeepLIFT machinery)."""
    out = deeplift_attribution(model, x, t, rule=RULE[method], baseline=baseline, **params)
    with torch.no_grad():
        s = model(x).gather(1, t[:, None])[:, 0]
        s0 = model(out.baseline).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(out.score, s)  # the paired forward pass computes the ordinary logits
    torch.testing.assert_close(out.reference_score, s0)
    assert (s - s0).abs().min() > 1e-3  # a meaningful delta
    return (out.attribution.sum(dim=(1, 2, 3)) - (s - s0)).abs() / (s - s0).abs()


# --------------------------------------------------------------------------- summation-to-delta

BASELINES = ["zeros", "blur", "random"]


def _baseline(name: str, x: torch.Tensor):  # noqa: ANN202
    return randn(*x.shape, seed=7, dtype=x.dtype) if name == "random" else name


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("method", METHODS)
def test_summation_to_delta_shapes_cnn(method: str, baseline: str) -> None:
    """The trained shapes-cnn: conv-BN-ReLU stages with MaxPool2d(2) between them."""
    x, t = shapes_images(2)
    model = shapes_cnn().double()
    x = x.double()
    assert relative_gap(model, x, t, method, _baseline(baseline, x)).max() < 1e-9


@pytest.mark.parametrize(
    "baseline", ["zeros", pytest.param("blur", marks=pytest.mark.slow), pytest.param("random", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("method", METHODS)
def test_summation_to_delta_resnet18(method: str, baseline: str) -> None:
    """Stock resnet18: in-place ReLUs, BasicBlock.relu called twice per block, `out += identity`,
    an overlapping 3x3/2 max pool. (Captum's DeepLift raises RuntimeError on this model:
    "A Module ReLU(inplace=True) was detected that does not contain some of the input/output
    attributes ... if your module is being used more than once in the network".)"""
    model = resnet18(dtype=torch.float64)
    x, t = randn(1, 3, 64, 64), torch.tensor([3])
    assert relative_gap(model, x, t, method, _baseline(baseline, x)).max() < 1e-9


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("method", METHODS)
def test_summation_to_delta_mlp(method: str, baseline: str) -> None:
    model, x, t = mlp(), randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 3])
    assert relative_gap(model, x, t, method, _baseline(baseline, x), blur_sigma=2.0).max() < 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_summation_to_delta_functional_model(method: str) -> None:
    """F.relu(inplace=True), x.relu_(), a reused ReLU module, sigmoid/tanh, functional max pooling and additions:
    every call is caught (module hooks would miss the functional ones and break the sum)."""
    torch.manual_seed(0)
    model = Functional().double().eval()
    x = randn(3, 3, 12, 12)
    assert relative_gap(model, x, torch.tensor([0, 1, 2]), method, "zeros").max() < 1e-9
    assert model.act.inplace  # flag restored


@pytest.mark.parametrize("method", METHODS)
def test_summation_to_delta_float32_through_attribute(method: str) -> None:
    x, t = shapes_images(2)
    model = shapes_cnn()
    maps = xm.attribute(method, model, x, target=t)
    with torch.no_grad():
        delta = (model(x) - model(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    assert ((maps.sum(dim=(1, 2)) - delta).abs() / delta.abs()).max() < 1e-4
    gap = deeplift_delta(model, x, t, method=method)
    assert gap.dtype == torch.float32 and gap.abs().max() < 1e-4


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("method", METHODS)
def test_linear_model_closed_form(method: str) -> None:
    model = LinearModel((3, 5, 5), 4).double().eval()
    x, ref, t = randn(3, 3, 5, 5), randn(3, 3, 5, 5, seed=2), torch.tensor([0, 2, 3])
    out = xm.attribute(method, model, x, target=t, baseline=ref, reduce=None)
    expected = (x - ref) * model.linear.weight[t].view(3, 3, 5, 5)
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=1e-6)


def _hand_one_hidden(w1, b1, w2, x, x0, t, rule):  # noqa: ANN001, ANN202
    """DeepLIFT by hand for logits = W2 relu(W1 v + b1) + b2 (rows: images)."""
    v, v0 = x.flatten(1), x0.flatten(1)
    h, h0 = v @ w1.T + b1, v0 @ w1.T + b1
    dv = v - v0
    out_mult = w2[t]  # (B, hidden): multiplier of each hidden ReLU output for the target logit
    if rule == "rescale":
        m = (h.relu() - h0.relu()) / (h - h0)
        mult = (out_mult * m) @ w1
    else:
        terms = dv[:, None, :] * w1[None]  # (B, hidden, inputs): w_ji * dv_i
        pos, neg = terms.clamp(min=0).sum(-1), terms.clamp(max=0).sum(-1)
        dy_pos = ((h0 + pos).relu() - h0.relu() + h.relu() - (h0 + neg).relu()) / 2
        dy_neg = ((h0 + neg).relu() - h0.relu() + h.relu() - (h0 + pos).relu()) / 2
        m_pos, m_neg = dy_pos / pos, dy_neg / neg
        # term w_ji dv_i uses m+ if it is positive, m- if negative
        per_term = torch.where(terms > 0, m_pos[..., None], m_neg[..., None]) * w1[None]
        mult = (out_mult[..., None] * per_term).sum(1)
    return (dv * mult).view_as(x)


@pytest.mark.parametrize("method", METHODS)
def test_one_hidden_relu_by_hand(method: str) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    x, x0, t = randn(5, 3, 2, 2), randn(5, 3, 2, 2, seed=2), torch.tensor([0, 1, 2, 0, 1])
    got = deeplift_attribution(model, x, t, rule=RULE[method], baseline=x0).attribution
    expected = _hand_one_hidden(model[1].weight, model[1].bias, model[3].weight, x, x0, t, RULE[method])
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    # the rules really differ on this net, and for Rescale the multipliers are not the gradient
    other = _hand_one_hidden(model[1].weight, model[1].bias, model[3].weight, x, x0, t,
                             "reveal_cancel" if method == "deeplift" else "rescale")
    assert (got - other).abs().max() > 1e-3


class MinFunctional(nn.Module):
    """o = i1 - ReLU(i1 - i2) = min(i1, i2) (the paper's example for RevealCancel), functional ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)
        return v[:, :1] - F.relu(v[:, :1] - v[:, 1:2])


class MinModules(nn.Module):
    """The same function with nn.Linear layers: h = ReLU([1, -1] . v), o = [1, 0, -1] . [v, h]."""

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.Linear(2, 1, bias=False)
        self.o = nn.Linear(3, 1, bias=False)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.h.weight.copy_(torch.tensor([[1.0, -1.0]]))
            self.o.weight.copy_(torch.tensor([[1.0, 0.0, -1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)
        return self.o(torch.cat([v, self.relu(self.h(v))], dim=1))


@pytest.mark.parametrize("make", [MinFunctional, MinModules])
def test_revealcancel_min_example(make) -> None:  # noqa: ANN001
    """min(i1, i2) from baseline 0. By hand for i = (3, 1): h = ReLU(i1 - i2) has dh+ = 3 (from i1),
    dh- = -1 (from i2); RevealCancel: dy+ = (ReLU(3) - 0)/2 + (ReLU(2) - ReLU(-1))/2 = 2.5,
    dy- = (ReLU(-1) - 0)/2 + (ReLU(2) - ReLU(3))/2 = -0.5, so i1 -> h gets 2.5 and i2 -> h -0.5;
    o = i1 - h gives (3 - 2.5, 0.5) = (0.5, 0.5), the Shapley values. Rescale sends all of h's
    change back in proportion 3 : -1, giving (0, 1). For i = (1, 3): RevealCancel (0.5, 0.5),
    Rescale (1, 0)."""
    model = make().double().eval()
    x = torch.tensor([[3.0, 1.0], [1.0, 3.0]], dtype=torch.float64).view(2, 2, 1, 1)
    rc = xm.attribute("deeplift_revealcancel", model, x, target=0, reduce=None).view(2, 2)
    rescale = xm.attribute("deeplift", model, x, target=0, reduce=None).view(2, 2)
    torch.testing.assert_close(rc, torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    torch.testing.assert_close(rescale, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def _reference_revealcancel_mlp(model: MLP, x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A direct transcription of kundajelab/deeplift's layer rules (Dense: terms split by the sign of
    w_ji * dx_i with dx the full input difference; ReLU: RevealCancel; backward: pos/neg multipliers)."""
    a, a0 = x.flatten(1), x0.flatten(1)
    saved = []
    for fc in (model.fc1, model.fc2):
        w = fc.weight
        d = a - a0
        dp, dn, wp, wn = d.clamp(min=0), d.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        pos, neg = dp @ wp.T + dn @ wn.T, dp @ wn.T + dn @ wp.T
        z, z0 = fc(a), fc(a0)
        dy_pos = 0.5 * ((z0 + pos).relu() - z0.relu()) + 0.5 * ((z0 + pos + neg).relu() - (z0 + neg).relu())
        dy_neg = 0.5 * ((z0 + neg).relu() - z0.relu()) + 0.5 * ((z0 + pos + neg).relu() - (z0 + pos).relu())
        saved.append((d, w, dy_pos / pos, dy_neg / neg))
        a, a0 = z.relu(), z0.relu()
    mult = model.fc3.weight[t]  # last Dense: pos and neg multipliers of the target are both 1
    for d, w, m_pos, m_neg in reversed(saved):
        pos_in, neg_in = mult * m_pos, mult * m_neg  # ReLU output multiplier -> its input's pos/neg multipliers
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        mult = torch.where(
            d > 0, pos_in @ wp + neg_in @ wn, torch.where(d < 0, pos_in @ wn + neg_in @ wp, 0.5 * (pos_in + neg_in) @ w)
        )
    return (d * mult).view_as(x)


def test_revealcancel_matches_reference_layer_rules_on_mlp() -> None:
    model, x, x0 = mlp(), randn(6, 3, 4, 4), randn(6, 3, 4, 4, seed=5)
    x0[:, 0, 0, :2] = x[:, 0, 0, :2]  # some inputs with no difference (the reference's zero-mask branch)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    got = deeplift_attribution(model, x, t, rule="reveal_cancel", baseline=x0).attribution
    expected = _reference_revealcancel_mlp(model, x, x0, t)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    rescale = deeplift_attribution(model, x, t, rule="rescale", baseline=x0).attribution
    assert (got - rescale).abs().max() > 1e-3


def test_max_pool_rule_by_hand() -> None:
    """One 2-element window, x = (3, 1), x0 = (0, 5): y - y0 = 3 - 5 = -2. The baseline's winner (element 2)
    falls by 1 - 5 = -4 and carries the whole change -2; element 1 carries nothing. (The plain gradient
    would credit element 1 with 3 * 1 = 3: no summation-to-delta.)"""
    model = nn.Sequential(nn.MaxPool2d((1, 2)), nn.Flatten(), nn.Linear(1, 1, bias=False)).double().eval()
    with torch.no_grad():
        model[2].weight.fill_(2.0)
    x = torch.tensor([3.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2)
    x0 = torch.tensor([0.0, 5.0], dtype=torch.float64).view(1, 1, 1, 2)
    for method in METHODS:
        out = xm.attribute(method, model, x, target=0, baseline=x0, reduce=None).view(2)
        torch.testing.assert_close(out, torch.tensor([0.0, -4.0]))
    # and when the image's winner rises above the baseline's maximum: x = (6, 1)
    out = xm.attribute("deeplift", model, x * 2, target=0, baseline=x0, reduce=None).view(2)
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0]))  # 2 * (6 - 5), all to element 1


# --------------------------------------------------------------------------- Captum


def captum_safe_shapes_cnn() -> nn.Module:
    """shapes-cnn with a 1x1 identity convolution before each MaxPool2d: the same function, but no
    nonlinear module feeds another directly. Captum's DeepLift hooks module input/output *tensors*;
    when a ReLU's output is the next MaxPool's input, the ReLU reads its output gradient before the
    MaxPool hook has rewritten it, and Captum's result on the stock shapes-cnn is off (its own
    convergence delta: about 0.04 with the zero baseline, about 10 with a random one)."""
    model = copy.deepcopy(shapes_cnn())
    for stage, c in ((model.stage2, 16), (model.stage3, 32)):
        conv = nn.Conv2d(c, c, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
        stage.insert(0, conv)
    return model.eval()


@pytest.mark.parametrize("baseline", ["zeros", "random"])
def test_rescale_matches_captum_on_shapes_cnn(baseline: str) -> None:
    import warnings

    from captum.attr import DeepLift

    x, t = shapes_images(2)
    x = x.double()
    ref = torch.zeros_like(x) if baseline == "zeros" else randn(*x.shape, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = DeepLift(captum_safe_shapes_cnn().double()).attribute(x, baselines=ref, target=t)
    ours = deeplift_attribution(shapes_cnn().double(), x, t, baseline=ref).attribution
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-8)


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("method", METHODS)
def test_spec(method: str) -> None:
    s = xm.spec(method)
    assert s.category == "gradient" and not s.needs_layer and not s.needs_contrast
    assert dict(s.defaults) == {"baseline": "zeros", "blur_sigma": None, "reduce": "sum"}
    assert s.summary.startswith("DeepLIFT") and "Shrikumar et al. 2017" in s.summary


@pytest.mark.parametrize("method", METHODS)
def test_output_contract_and_batched_equals_per_image(method: str) -> None:
    x, t = shapes_images(3)
    x = x[..., 16:48, 16:48]  # shapes-cnn takes any size; 32 x 32 keeps the test fast
    model = shapes_cnn()
    ref = randn(3, 3, 32, 32, seed=4, dtype=torch.float32)  # one baseline per image
    out = xm.attribute(method, model, x, target=t, baseline=ref)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and not out.requires_grad
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert xm.attribute(method, model, x, target=t, reduce=None).shape == (3, 3, 32, 32)
    single = torch.cat([xm.attribute(method, model, x[i : i + 1], target=int(t[i]), baseline=ref[i : i + 1])
                        for i in range(3)])
    torch.testing.assert_close(out, single, atol=1e-5, rtol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(xm.attribute(method, model, x, target=t, baseline=ref), out)


@pytest.mark.parametrize("method", METHODS)
def test_resnet18_left_untouched(method: str) -> None:
    model = resnet18()
    model.layer1[0].relu.inplace = False  # mixed flags survive
    with model_left_as_is(model, hooks=ALL_HOOK_DICTS):
        out = xm.attribute(method, model, randn(1, 3, 32, 32, dtype=torch.float32), target=1)
        assert out.shape == (1, 32, 32) and out.abs().sum() > 0
    assert model.relu.inplace and not model.layer1[0].relu.inplace


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_raises_and_leaves_model_untouched(method: str) -> None:
    model = resnet18().train()
    model.layer2.eval()
    with model_left_as_is(model, hooks=ALL_HOOK_DICTS), pytest.raises(ValueError, match=r"eval mode.*model\.eval\(\)"):
        xm.attribute(method, model, randn(1, 3, 32, 32, dtype=torch.float32), target=1)


def test_batch_statistics_in_eval_mode_raise() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(2)).eval()
    x = randn(2, 3, 6, 6, dtype=torch.float32)
    model(x)
    with model_left_as_is(model, hooks=ALL_HOOK_DICTS), pytest.raises(ValueError, match="running statistics"):
        xm.attribute("deeplift", model, x, target=0)


class BatchMixer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x.flatten(1).T)  # the batch dimension is no longer first
        return h.T[:, :3]


def test_model_that_moves_the_batch_dimension_raises() -> None:
    with pytest.raises(ValueError, match="pairs each image with its baseline"):
        xm.attribute("deeplift", BatchMixer().eval(), randn(2, 3, 4, 4, dtype=torch.float32), target=0)


def test_bad_baselines() -> None:
    model, x = mlp(), randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"baseline='black'.*zeros.*blur.*uniform"):
        xm.attribute("deeplift", model, x, target=0, baseline="black")
    # the shared names all work here, "uniform" included (one resolver for every method)
    assert torch.isfinite(xm.attribute("deeplift", model, x, target=0, baseline="uniform")).all()
    with pytest.raises(ValueError, match="does not broadcast"):
        xm.attribute("deeplift_revealcancel", model, x, target=0, baseline=torch.zeros(3, 5, 5))
    with pytest.raises(ValueError, match="blur_sigma"):
        xm.attribute("deeplift", model, x, target=0, baseline="blur", blur_sigma=-1.0)
    with pytest.raises(ValueError, match="method="):
        deeplift_delta(model, x, 0, method="saliency")


def test_number_and_mean_baselines() -> None:
    model, x = mlp(), randn(2, 3, 4, 4)
    for baseline, ref in ((0.5, torch.full_like(x, 0.5)), ("mean", x.mean(dim=(2, 3), keepdim=True).expand_as(x))):
        got = xm.attribute("deeplift", model, x, target=1, baseline=baseline, reduce=None)
        torch.testing.assert_close(got, xm.attribute("deeplift", model, x, target=1, baseline=ref, reduce=None))
