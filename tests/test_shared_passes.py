"""Shared passes: `attribute_many` gives each method's map bit for bit as its own call does, from one
forward and one backward pass for all the methods that need them, validates before any work and
leaves the model as it found it; studies use it and store the same bits."""
import itertools

import pytest
import torch

import xai_methods as xm
from helpers import model_left_as_is, resnet18, tiny_cnn
from xai_methods import shared

INPUT = ["saliency", "input_x_gradient"]
LAYER = ["gradcam", "gradcam_pp", "hirescam", "layercam", "xgradcam"]
FORWARD = ["cam", "eigencam"]
EIGHT = INPUT + LAYER + FORWARD[:1]  # the eight; eigencam, forward only, joins as a ninth
ALL = INPUT + LAYER + FORWARD


@pytest.fixture(scope="module", params=["resnet18", "tiny_cnn"])
def case(request):
    torch.manual_seed(0)
    if request.param == "resnet18":
        return resnet18(bn=True).eval(), torch.randn(3, 3, 64, 64), torch.tensor([1, 4, 7])
    return tiny_cnn().eval(), torch.randn(3, 3, 16, 16), torch.tensor([0, 2, 4])


def singles(model, images, target, methods, params=None):
    return {m: xm.attribute(m, model, images, target=target, **(params or {}).get(m, {})) for m in methods}


# one of each class of combination: the input's gradient only, a layer's gradient only, forward-only layer
# methods only, input and layer together, everything, and each method alone
COMBINATIONS = [INPUT, LAYER, FORWARD, ["saliency", "gradcam"], ["input_x_gradient", "eigencam"], ALL,
                *([m] for m in ALL)]


@pytest.mark.parametrize("methods", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
def test_every_map_is_bit_identical_to_its_own_call(case, methods):
    model, images, target = case
    many = xm.attribute_many(methods, model, images, target=target)
    assert list(many) == methods
    for m, expected in singles(model, images, target, methods).items():
        assert torch.equal(many[m], expected), m


def test_parameters_and_other_methods_mix_in(case):
    """Per-method parameters change only the method's own part; methods that share no pass (occlusion,
    a baseline map) are computed by their own call."""
    model, images, target = case
    params = {"saliency": {"reduce": "sum"}, "input_x_gradient": {"reduce": None}, "gradcam": {"relu": False},
              "hirescam": {"upsample": False}, "eigencam": {"relu": False, "upsample": False},
              "occlusion": {"window": 4, "stride": 4}, "random_map": {"seed": 3}}
    methods = [*ALL, "occlusion", "random_map"]
    many = xm.attribute_many(methods, model, images, target=target, params=params)
    for m, expected in singles(model, images, target, methods, params).items():
        assert torch.equal(many[m], expected), m


def test_one_forward_and_one_backward_for_the_nine(case, monkeypatch):
    model, images, target = case
    xm.attribute_many(ALL, model, images, target=target)  # warm-up: the checks' own probes are not counted below
    forwards, backwards = [], []
    handle = model.register_forward_hook(lambda mod, inp, out: forwards.append(inp[0].shape[0]))
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backwards.append(1) or grad(*a, **k))
    try:
        xm.attribute_many(ALL, model, images, target=target)
    finally:
        handle.remove()
    assert forwards.count(images.shape[0]) == 1, "one forward pass of the batch (the checks probe one image)"
    assert len(backwards) == 1


def test_each_layer_is_one_pass_and_the_model_is_left_as_found(monkeypatch):
    torch.manual_seed(0)
    model, images, target = resnet18(bn=True).eval(), torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    params = {"gradcam": {"layer": "layer3"}, "layercam": {"layer": "layer3"}}
    backwards = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backwards.append(1) or grad(*a, **k))
    with model_left_as_is(model):
        many = xm.attribute_many(["saliency", "gradcam", "layercam", "hirescam"], model, images, target=target,
                                 layer="layer4", params=params)
    assert len(backwards) == 2, "layer4 (with the input's gradient) and layer3"
    assert torch.equal(many["gradcam"], xm.attribute("gradcam", model, images, target=target, layer="layer3"))
    assert torch.equal(many["hirescam"], xm.attribute("hirescam", model, images, target=target, layer="layer4"))


@pytest.mark.parametrize("call, error, message", [
    (dict(methods=["saliency", "saliency"]), ValueError, "methods must be distinct"),
    (dict(methods=["saliency"], params={"gradcam": {}}), ValueError, "params given for ['gradcam']"),
    (dict(methods=["saliency", "gradcam"], params={"gradcam": {"relu": 2}}), (TypeError, ValueError), "relu"),
    (dict(methods=["saliency", "gradcam"], layer="layer9"), ValueError, "layer"),
    (dict(methods=["saliency", "nope"]), ValueError, "nope"),
])
def test_bad_calls_fail_before_any_pass(call, error, message):
    model, images = tiny_cnn().eval(), torch.randn(2, 3, 16, 16)
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        xm.attribute_many(call.pop("methods"), model, images, **call)
    assert forwards == []


def test_which_methods_share():
    assert {n for n in xm.available() if shared.shares_pass(n, {})} == set(ALL)
    assert all(shared.shares_pass(m, {}) for m in EIGHT)
    assert not shared.shares_pass("gradcam", {"reshape": lambda t: t})
    assert not any(shared.shares_pass(m, {}) for m in ("occlusion", "guided_backprop", "scorecam", "fullgrad"))


def test_a_study_groups_the_shared_methods_of_a_block_into_one_task():
    from tasks.study import StudySpec, attribution_units

    spec = StudySpec(methods=["saliency", "gradcam", "occlusion", "eigencam"], metrics=[], store="unused.zarr")
    units = [(list(w.methods), w.block) for w in
             attribution_units(spec, {"saliency": [0, 1], "gradcam": [0, 1], "occlusion": [1], "eigencam": [1]})]
    assert units == [(["saliency", "gradcam"], 0), (["saliency", "gradcam", "eigencam"], 1), (["occlusion"], 1)]
    assert list(itertools.chain.from_iterable([(m, b) for m in ms] for ms, b in units)) == [
        ("saliency", 0), ("gradcam", 0), ("saliency", 1), ("gradcam", 1), ("eigencam", 1), ("occlusion", 1)]


# --------------------------------------------------------------------------- lower precision of forward-only methods

def test_precision_is_a_parameter_of_exactly_the_forward_only_methods():
    for name in xm.available():
        s = xm.spec(name)
        forward, backward = s.passes((64, 64))
        forward_only = backward == 0 and forward > 1  # (CAM and Eigen-CAM: one forward pass, nothing to gain)
        assert ("precision" in s.defaults) == forward_only == s.forward_only, name
    with pytest.raises(ValueError, match=r"precision='half' is not valid; choose one of \('float32', 'bfloat16'"):
        xm.spec("occlusion").passes((64, 64), precision="half")
    with pytest.raises(TypeError, match="unknown parameter .precision."):  # a gradient method has none
        xm.spec("saliency").passes((64, 64), precision="bfloat16")


@pytest.mark.parametrize("name, params", [("occlusion", {"window": 16, "stride": 8}), ("rise", {"masks": 100}),
                                          ("scorecam", {})])
def test_bfloat16_forward_passes_agree_with_float32(name, params):
    """The accuracy check docs/performance.md reports: with bfloat16 autocast the maps stay within 5% of each
    map's range of the float32 maps (1-2% measured) and rank the pixels alike (Spearman >= 0.99; 0.998 measured)."""
    from scipy.stats import spearmanr

    import zoo

    model = zoo.load_model("shapes-cnn")
    x = model.preprocess(torch.from_numpy(zoo.load_dataset("shapes", limit=4).load(0, 4).images))  # 4: bfloat16 is emulated on most CPUs
    ref = xm.attribute(name, model, x, **params)
    assert torch.equal(ref, xm.attribute(name, model, x, precision="float32", **params))
    low = xm.attribute(name, model, x, precision="bfloat16", **params)
    assert low.dtype == torch.float32 and not torch.equal(low, ref)  # autocast did run
    spread = (ref.flatten(1).amax(1) - ref.flatten(1).amin(1))[:, None]
    assert ((low - ref).abs().flatten(1) / spread).max() < 0.05
    assert min(spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(ref.numpy(), low.numpy())) >= 0.99
