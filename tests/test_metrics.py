"""Evaluation metrics: registry, closed forms, known-answer models, the cases where anchors go wrong
(ties, empty masks, constant / zero / NaN maps), agreement with Quantus 0.6 where its definition is
right, batching and the model left as found."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import xai_methods as xm
from helpers import model_left_as_is, tiny_cnn
from xai_methods import metrics as xmet
from xai_methods.metrics import faithfulness as faith
from xai_methods.metrics._registry import CONSTANT_MAP, EMPTY_MASK, NO_POSITIVE, NOT_FINITE_MAP, OK, ZERO_MAP

CONTRACT = {"pointing_game", "relevance_mass", "relevance_rank", "outside_mask_share", "region_share", "deletion",
            "insertion", "average_drop", "increase_in_confidence", "road_morf", "road_lerf", "max_sensitivity",
            "sparseness"}
H = W = 16


def box_mask(b=2, y=(4, 8), x=(4, 8)):
    m = torch.zeros(b, H, W, dtype=torch.bool)
    m[:, y[0]:y[1], x[0]:x[1]] = True
    return m


def images(b=2, seed=0):
    return torch.randn(b, 3, H, W, generator=torch.Generator().manual_seed(seed))


def test_the_registry_holds_the_contract():
    assert set(xmet.available()) == CONTRACT
    assert {n for n in xm.available() if xm.spec(n).category == "baseline"} == {"random_map", "centre_map", "edge_map"}
    s = xmet.spec("deletion")
    assert (s.family, s.curve, s.needs_model, s.higher_is_better) == ("faithfulness", True, True, False)
    assert s.points(dict(s.defaults)) == s.defaults["steps"] + 1
    assert xmet.spec("pointing_game").needs_mask and not xmet.spec("pointing_game").curve
    assert xmet.spec("max_sensitivity").needs_method


@pytest.mark.parametrize("call, error, match", [
    (lambda: xmet.evaluate("nope", None, images(), torch.zeros(2, H, W)), ValueError, "unknown metric 'nope'"),
    (lambda: xmet.evaluate("pointing_game", None, images(), torch.zeros(2, H, W)), ValueError, "needs the ground-truth mask"),
    (lambda: xmet.evaluate("pointing_game", None, images(), torch.zeros(2, H, W), mask=box_mask().float()),
     ValueError, "mask must be a bool tensor"),
    (lambda: xmet.evaluate("sparseness", None, images(), torch.zeros(2, H + 1, W)), ValueError, "maps must be"),
    (lambda: xmet.evaluate("pointing_game", None, images(), torch.zeros(2, H, W), mask=box_mask(), tol=3),
     TypeError, "unknown parameter 'tol'; valid parameters: tolerance"),
    (lambda: xmet.evaluate("region_share", None, images(), torch.zeros(2, H, W)), ValueError, "region must be a box"),
    (lambda: xmet.evaluate("region_share", None, images(), torch.zeros(2, H, W), region=[0, 0, 20, 4]),
     ValueError, "region must be a box"),
    (lambda: xmet.evaluate("deletion", tiny_cnn(), images(), torch.zeros(2, H, W), steps=0), ValueError, "steps"),
    (lambda: xmet.evaluate("deletion", None, images(), torch.zeros(2, H, W)), TypeError, "runs the model"),
    (lambda: xmet.evaluate("insertion", tiny_cnn(), images(), torch.zeros(2, H, W), substrate="black"),
     ValueError, "substrate='black'"),
    (lambda: xmet.evaluate("road_morf", tiny_cnn(), images(), torch.zeros(2, H, W), fractions=[0.5, 0.2]),
     ValueError, "fractions must be"),
    (lambda: xmet.evaluate("max_sensitivity", tiny_cnn(), images(), torch.zeros(2, H, W), method="nope"),
     ValueError, "method='nope'"),
])
def test_bad_arguments_name_the_problem(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- localisation


def test_pointing_game_closed_forms_and_tolerance():
    mask = box_mask(1)  # rows/cols 4..7
    maps = torch.zeros(1, H, W)
    maps[0, 5, 5] = 1.0
    assert xmet.evaluate("pointing_game", None, images(1), maps, mask=mask).item() == 1.0
    far = torch.zeros(1, H, W)
    far[0, 14, 14] = 1.0
    assert xmet.evaluate("pointing_game", None, images(1), far, mask=mask).item() == 0.0
    near = torch.zeros(1, H, W)
    near[0, 10, 5] = 1.0  # 3 px below the mask
    assert xmet.evaluate("pointing_game", None, images(1), near, mask=mask, tolerance=3).item() == 1.0
    assert xmet.evaluate("pointing_game", None, images(1), near, mask=mask, tolerance=2).item() == 0.0
    from xai_methods.metrics.localisation import default_tolerance

    assert default_tolerance((224, 224)) == 15 and default_tolerance((64, 64)) == 4


def test_pointing_game_ties_constant_and_nan():
    mask = box_mask(1)
    tied = torch.zeros(1, H, W)
    tied[0, 5, 5] = tied[0, 14, 14] = 1.0  # one tied maximum inside, one far outside
    s = xmet.measure("pointing_game", None, images(1), tied, mask=mask, tolerance=0)
    assert s.value.item() == 0.0 and s.status.item() == OK
    for constant in (torch.zeros(1, H, W), torch.full((1, H, W), 0.5)):
        s = xmet.measure("pointing_game", None, images(1), constant, mask=mask)
        assert s.value.item() == 0.0 and s.status.item() == CONSTANT_MAP, "a constant map is not a hit"
    bad = torch.zeros(1, H, W)
    bad[0, 0, 0] = math.nan
    s = xmet.measure("pointing_game", None, images(1), bad, mask=mask)
    assert math.isnan(s.value.item()) and s.status.item() == NOT_FINITE_MAP
    s = xmet.measure("pointing_game", None, images(1), tied, mask=torch.zeros(1, H, W, dtype=torch.bool))
    assert math.isnan(s.value.item()) and s.status.item() == EMPTY_MASK


def test_mass_shares_closed_forms_and_no_positive_mass():
    mask = box_mask(1)
    maps = torch.full((1, H, W), -1.0)
    maps[0, 4:8, 4:8] = 3.0  # 16 px x 3 inside
    maps[0, 0, :4] = 1.0  # 4 px x 1 outside; negatives never count
    mass = xmet.evaluate("relevance_mass", None, images(1), maps, mask=mask).item()
    assert mass == pytest.approx(48 / 52)
    outside = xmet.evaluate("outside_mask_share", None, images(1), maps, mask=mask).item()
    assert outside == pytest.approx(4 / 52)
    box = xmet.evaluate("region_share", None, images(1), maps, region=[0, 0, 1, 2]).item()
    assert box == pytest.approx(2 / 52)
    for name in ("relevance_mass", "outside_mask_share"):
        s = xmet.measure(name, None, images(1), -maps.abs(), mask=mask)
        assert math.isnan(s.value.item()) and s.status.item() == NO_POSITIVE


def test_relevance_rank_closed_form_and_ties_at_the_cut():
    mask = box_mask(1, (0, 2), (0, 2))  # 4 px
    maps = torch.zeros(1, H, W)
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 9, 9] = 5.0, 4.0, 4.5  # top 4: 5 (in), 4.5 (out), 4 (in), then a tie of 0s
    # the 4th place goes to one of the 253 tied zeros, 2 of which are in the mask
    expected = (2 + 1 * 2 / 253) / 4
    assert xmet.evaluate("relevance_rank", None, images(1), maps, mask=mask).item() == pytest.approx(expected)
    constant = torch.full((1, H, W), 7.0)
    assert xmet.evaluate("relevance_rank", None, images(1), constant, mask=mask).item() == pytest.approx(4 / 256), \
        "a constant map ranks at chance"


def test_sparseness_closed_forms():
    one_hot = torch.zeros(1, H, W)
    one_hot[0, 3, 3] = -2.0
    n = H * W
    assert xmet.evaluate("sparseness", None, images(1), one_hot).item() == pytest.approx((n - 1) / n)
    assert xmet.evaluate("sparseness", None, images(1), torch.full((1, H, W), 0.3)).item() == pytest.approx(0.0, abs=1e-6)
    s = xmet.measure("sparseness", None, images(1), torch.zeros(1, H, W))
    assert math.isnan(s.value.item()) and s.status.item() == ZERO_MAP


def test_only_the_finite_maps_are_scored():
    maps = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    maps[1, 2, 2] = math.inf
    s = xmet.measure("relevance_mass", None, images(3), maps, mask=box_mask(3))
    assert s.status.tolist() == [OK, NOT_FINITE_MAP, OK] and math.isnan(s.value[1])
    alone = xmet.evaluate("relevance_mass", None, images(3)[[0, 2]], maps[[0, 2]], mask=box_mask(2))
    torch.testing.assert_close(s.value[[0, 2]], alone)


# --------------------------------------------------------------------------- faithfulness


class RegionModel(nn.Module):
    """Two classes; class 0's logit is the mean of channel 0 over rows 0..7, class 1's is 0."""

    def forward(self, x):
        evidence = x[:, 0, :8].mean((1, 2))
        return torch.stack([evidence, torch.zeros_like(evidence)], 1)


def evidence_images(b=2):
    x = torch.zeros(b, 3, H, W)
    x[:, 0, :8] = 4.0  # the evidence: the top half of channel 0
    return x


def test_deletion_and_insertion_follow_the_model():
    model, x = RegionModel(), evidence_images()
    right = torch.zeros(2, H, W)
    right[:, :8] = 1.0  # the map points at the evidence
    wrong = 1.0 - right
    t = torch.zeros(2, dtype=torch.long)
    d_right = xmet.measure("deletion", model, x, right, t, steps=8)
    d_wrong = xmet.measure("deletion", model, x, wrong, t, steps=8)
    assert (d_right.value < d_wrong.value).all()
    p_full, p_none = torch.sigmoid(torch.tensor(4.0)).item(), 0.5
    assert d_right.curve[:, 0].tolist() == pytest.approx([p_full] * 2) and d_right.curve[:, -1].tolist() == pytest.approx([p_none] * 2)
    # deleting the evidence first: it is gone after half of the steps, the curve then stays at 0.5
    assert d_right.curve[0, 4:].tolist() == pytest.approx([p_none] * 5)
    torch.testing.assert_close(d_right.value, faith.auc(d_right.curve, torch.linspace(0, 1, 9)))
    i_right = xmet.measure("insertion", model, x, right, t, steps=8, substrate="zeros")
    i_wrong = xmet.measure("insertion", model, x, wrong, t, steps=8, substrate="zeros")
    assert (i_right.value > i_wrong.value).all() and i_right.curve[0, 4:].tolist() == pytest.approx([p_full] * 5)


def test_deletion_is_batched_over_images_and_steps():
    model, x = tiny_cnn(), images(3)
    maps = torch.rand(3, H, W, generator=torch.Generator().manual_seed(1))
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    full = xmet.measure("deletion", model, x, maps, 0, steps=4, internal_batch=5)
    assert sum(calls) == 1 + 3 * 5 and max(calls) <= 5, "one image checks the target's range, then (steps + 1) inputs per image"
    alone = xmet.measure("deletion", model, x[1:2], maps[1:2], 0, steps=4)
    torch.testing.assert_close(full.curve[1:2], alone.curve)


def test_ties_are_broken_by_a_seeded_permutation_not_raster_order():
    constant = torch.zeros(1, H, W)
    order = faith.ranks(constant, seed=0)[0]
    assert not torch.equal(order, torch.arange(H * W)) and torch.equal(order, faith.ranks(constant, seed=0)[0])
    assert sorted(order.tolist()) == list(range(H * W))


def test_average_drop_and_increase_in_confidence_closed_form():
    model, x = RegionModel(), evidence_images()
    t = torch.zeros(2, dtype=torch.long)
    keep_evidence = torch.zeros(2, H, W)
    keep_evidence[:, :8] = 1.0
    drop = xmet.evaluate("average_drop", model, x, keep_evidence, t)
    assert drop.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)  # the evidence is untouched
    half = torch.zeros(2, H, W)
    half[:, :8] = 0.5
    half[:, 8:] = 1.0
    # min-max scaled: m = 0 on the evidence, 1 elsewhere, so the evidence becomes the baseline (0)
    y, o = torch.sigmoid(torch.tensor(4.0)), torch.sigmoid(torch.tensor(0.0))
    expected = ((y - o) / y).item()
    assert xmet.evaluate("average_drop", model, x, half, t).tolist() == pytest.approx([expected] * 2)
    assert xmet.evaluate("increase_in_confidence", model, x, half, t).tolist() == [0.0, 0.0]
    s = xmet.measure("average_drop", model, x, torch.ones(2, H, W), t)
    assert s.status.tolist() == [CONSTANT_MAP] * 2 and s.value.isnan().all()


def test_road_imputation_is_exact_on_a_linear_image_and_removes_the_evidence():
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    ramp = (0.3 * yy - 0.2 * xx + 1.0).expand(3, H, W).numpy().copy()
    removed = np.zeros((H, W), bool)
    removed[5:11, 3:9] = True  # interior: every removed pixel's neighbours are inside the image
    np.testing.assert_allclose(faith.impute(ramp, removed), ramp, atol=1e-9)
    model, x = RegionModel(), evidence_images()
    right = torch.zeros(2, H, W)
    right[:, :8] = 1.0
    t = torch.zeros(2, dtype=torch.long)
    morf = xmet.measure("road_morf", model, x, right, t, fractions=[0.25, 0.5], noise=0.0)
    lerf = xmet.measure("road_lerf", model, x, right, t, fractions=[0.25, 0.5], noise=0.0)
    assert (morf.value < lerf.value).all() and morf.curve.shape == (2, 2)


def test_max_sensitivity():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, 4))
    x = images(2)
    maps = xm.attribute("saliency", linear, x, target=1)
    s = xmet.measure("max_sensitivity", linear, x, maps, 1, method="saliency", samples=3)
    assert s.value.tolist() == pytest.approx([0.0, 0.0], abs=1e-6), "a linear model's gradient does not move"
    model = tiny_cnn()
    maps = xm.attribute("input_x_gradient", model, x, target=1)
    small = xmet.evaluate("max_sensitivity", model, x, maps, 1, method="input_x_gradient", radius=1e-3)
    large = xmet.evaluate("max_sensitivity", model, x, maps, 1, method="input_x_gradient", radius=1.0)
    assert (small < large).all() and (small > 0).all()
    zero = xmet.measure("max_sensitivity", model, x, torch.zeros(2, H, W), 1, method="saliency", samples=2)
    assert zero.status.tolist() == [ZERO_MAP] * 2 and zero.value.isnan().all()


@pytest.mark.parametrize("name", ["deletion", "average_drop", "road_morf", "max_sensitivity"])
def test_the_model_is_left_as_found(name):
    model = tiny_cnn()
    maps = torch.rand(2, H, W, generator=torch.Generator().manual_seed(0))
    extra = {"max_sensitivity": {"method": "saliency", "samples": 2}, "road_morf": {"fractions": [0.3, 0.6]},
             "deletion": {"steps": 3}}.get(name, {})
    with model_left_as_is(model):
        xmet.evaluate(name, model, images(2), maps, 0, **extra)


# --------------------------------------------------------------------------- baselines


def test_baseline_maps():
    x = images(3)
    r = xm.attribute("random_map", None or tiny_cnn(), x)
    assert r.shape == (3, H, W) and torch.equal(r[1:2], xm.attribute("random_map", tiny_cnn(), x[1:2])), \
        "an image's random map does not depend on the batch"
    assert not torch.equal(r, xm.attribute("random_map", tiny_cnn(), x, seed=1))
    c = xm.attribute("centre_map", tiny_cnn(), x)
    centre = c[0, H // 2 - 1:H // 2 + 1, W // 2 - 1:W // 2 + 1]
    assert torch.allclose(centre, c[0].max().expand(2, 2)), "the four central pixels are the maximum"
    flat = torch.zeros(1, 3, H, W)
    flat[:, :, :, W // 2:] = 1.0  # one vertical edge
    e = xm.attribute("edge_map", tiny_cnn(), flat)[0]
    assert e[:, W // 2 - 1:W // 2 + 1].min() > 0 and e[:, :W // 2 - 1].abs().max() == 0 and e[:, W // 2 + 1:].abs().max() == 0
    assert xm.spec("random_map").passes((H, W)) == (0, 0)


# --------------------------------------------------------------------------- Quantus 0.6


@pytest.fixture(scope="module")
def quantus():
    q = pytest.importorskip("quantus")
    warnings.filterwarnings("ignore", module="quantus")
    return q


def _quantus_inputs(b=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, 3, H, W)).astype(np.float32)
    a = rng.random((b, 1, H, W)).astype(np.float32)  # positive, no ties
    s = np.zeros((b, 1, H, W), np.float32)
    s[:, :, 3:9, 5:12] = 1.0
    return x, a, s


@pytest.mark.parametrize("ours, theirs", [("relevance_mass", "RelevanceMassAccuracy"),
                                          ("relevance_rank", "RelevanceRankAccuracy"), ("sparseness", "Sparseness")])
def test_agreement_with_quantus_where_its_definition_is_right(quantus, ours, theirs):
    x, a, s = _quantus_inputs()
    metric = getattr(quantus, theirs)(abs=False, normalise=False, disable_warnings=True)
    expected = metric(model=None, x_batch=x, y_batch=np.zeros(len(x), int), a_batch=a, s_batch=s, device="cpu")
    got = xmet.evaluate(ours, None, torch.from_numpy(x), torch.from_numpy(a[:, 0]), mask=torch.from_numpy(s[:, 0] > 0))
    np.testing.assert_allclose(got.numpy(), np.asarray(expected, float), atol=1e-4)  # Quantus adds 1e-7 in Sparseness


def test_quantus_pointing_game_counts_a_constant_map_as_a_hit(quantus):
    x, a, s = _quantus_inputs(3)
    a[0] = 0.5  # a constant map (Quantus refuses a batch of constant maps only)
    a[1] = 0.0
    a[1, 0, 0, 0] = a[1, 0, 5, 6] = 1.0  # two tied maxima: one far outside the mask, one inside
    theirs = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)(
        model=None, x_batch=x, y_batch=np.zeros(3, int), a_batch=a, s_batch=s, device="cpu")
    assert bool(theirs[0]) and bool(theirs[1]), "the known Quantus bug: any tied maximum in the mask is a hit"
    ours = xmet.measure("pointing_game", None, torch.from_numpy(x), torch.from_numpy(a[:, 0]),
                        mask=torch.from_numpy(s[:, 0] > 0), tolerance=0)
    assert ours.value[:2].tolist() == [0.0, 0.0] and ours.status[:2].tolist() == [CONSTANT_MAP, OK]


def test_road_scores_every_image_of_a_large_batch():
    """Quantus 0.6's ROAD averages only the first batch of 64 images; here every image is scored, alone."""
    model, x = tiny_cnn(), images(70)
    maps = torch.rand(70, H, W, generator=torch.Generator().manual_seed(2))
    s = xmet.measure("road_lerf", model, x, maps, 0, fractions=[0.3, 0.6], internal_batch=16)
    assert s.value.shape == (70,) and torch.isfinite(s.value).all() and s.curve.shape == (70, 2)
    alone = xmet.measure("road_lerf", model, x[65:66], maps[65:66], 0, fractions=[0.3, 0.6])
    torch.testing.assert_close(s.curve[65:66], alone.curve)
