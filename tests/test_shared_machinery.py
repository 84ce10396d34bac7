"""The machinery every method shares, written once in `xai_methods._core` / `_checks`: one random
policy, one baseline resolver (tested in test_gradient_methods), one SPD solve, one chunked row
gradient, and parameter checks declared per method and run before any work."""
import pytest
import torch

import xai_methods as xm
from helpers import tiny_cnn
from xai_methods import _core

STOCHASTIC = {  # method -> small parameters
    "lime": {"samples": 32, "n_segments": 8},
    "rise": {"masks": 32},
    "prediction_difference": {"samples": 2, "window": 8, "stride": 8},
    "smoothgrad": {"samples": 3},
    "integrated_gradients": {"steps": 2, "baseline": "uniform"},
    "meaningful_perturbation": {"steps": 3, "perturbation": "noise", "jitter": 2},
}

# method -> (a parameter, a bad value): every method refuses a bad value in `xm.check`, before any work.
BAD = {
    "saliency": ("reduce", "mean"), "input_x_gradient": ("reduce", 3), "deconvnet": ("reduce", "l2"),
    "guided_backprop": ("reduce", ""), "integrated_gradients": ("rule", "simpson"),
    "deeplift": ("blur_sigma", -1.0), "deeplift_revealcancel": ("baseline", "black"),
    "smoothgrad": ("noise", -0.1), "smoothgrad_sq": ("base", "smoothgrad"), "vargrad": ("samples", 0),
    "fullgrad": (None, None), "cam": ("relu", "yes"), "gradcam": ("upsample", 1), "hirescam": ("relu", None),
    "xgradcam": ("upsample", "no"), "layercam": ("relu", 0), "gradcam_pp": ("upsample", None),
    "scorecam": ("internal_batch", 0), "ablationcam": ("internal_batch", -2), "eigencam": ("relu", "no"),
    "guided_gradcam": ("upsample", 2), "occlusion": ("window", 99), "lime": ("kernel_width", -1),
    "prediction_difference": ("sampling", "joint"), "rise": ("p", 0.0),
    "meaningful_perturbation": ("jitter", -1), "extremal_perturbation": ("channels", "nope"),
    "contrastive_gradcam": ("loss", "hinge"), "cem_pp": ("kappa", -1.0), "cem_pn": ("c_steps", 0),
    "cdeepex": ("margin", 0.0),
}


def test_every_method_has_a_bad_value_case():
    assert set(BAD) == {n for n in xm.available() if xm.spec(n).category != "baseline"}


@pytest.mark.parametrize("method", sorted(BAD))
def test_check_refuses_a_bad_value_naming_it(method):
    name, value = BAD[method]
    if name is None:  # fullgrad has no parameter
        assert xm.spec(method).defaults == {}
        return
    with pytest.raises((ValueError, TypeError), match=name):
        xm.check(method, tiny_cnn(), (16, 16), **{name: value})


def test_the_channel_layer_lists_valid_layers():
    with pytest.raises(ValueError, match="channels: layer: 'nope'.*valid layer names: stage1"):
        xm.check("extremal_perturbation", tiny_cnn(), (16, 16), channels="nope")


@pytest.mark.parametrize("method", sorted(STOCHASTIC))
def test_draws_do_not_depend_on_the_global_rng(method):
    """Seeded draws come from a private CPU generator: torch's global state changes nothing."""
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    a = xm.attribute(method, model, x, target=0, **STOCHASTIC[method])
    torch.manual_seed(2)
    b = xm.attribute(method, model, x, target=0, **STOCHASTIC[method])
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["lime", "rise", "smoothgrad"])
def test_seed_none_means_not_reproducible_everywhere(method):
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    params = {**STOCHASTIC[method], "seed": None}
    a = xm.attribute(method, model, x, target=0, **params)
    b = xm.attribute(method, model, x, target=0, **params)
    assert not torch.equal(a, b)


def test_seeded_rng_is_a_cpu_generator():
    assert _core.seeded_rng(3).device.type == "cpu"
    assert torch.equal(torch.rand(4, generator=_core.seeded_rng(3)), torch.rand(4, generator=_core.seeded_rng(3)))


def test_spd_solve_where_batched_lu_fails():
    """torch.linalg.solve's batched LU fails with two threads on such matrices (oneMKL DLASWP)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(2, 240, 240, generator=g, dtype=torch.float64)
        a = a @ a.transpose(1, 2) + torch.eye(240, dtype=torch.float64)
        b = torch.randn(2, 240, 30, generator=g, dtype=torch.float64)
        torch.testing.assert_close(a @ _core.spd_solve(a, b), b)
        with pytest.raises(ValueError, match="not positive definite"):
            _core.spd_solve(-a, b)
    finally:
        torch.set_num_threads(threads)


def test_prediction_difference_with_large_patches():
    """8 x 8 windows with their frame: a 432-value patch Gaussian (failed before the Cholesky solve)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, x = tiny_cnn(), torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
        out = xm.attribute("prediction_difference", model, x, target=0, samples=2, window=8, stride=8)
        assert out.shape == (2, 24, 24) and torch.isfinite(out).all()
    finally:
        torch.set_num_threads(threads)


def test_grad_rows_matches_one_backward():
    values = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    weights = torch.arange(1.0, 4.0)

    def fn(leaf, i):
        return (leaf.pow(2) @ weights, i.float())

    rows = torch.tensor([0, 2, 3])
    grad, (loss, index) = _core.grad_rows(fn, values, rows, chunk=2)
    expected = torch.zeros_like(values)
    expected[rows] = 2 * values[rows] * weights
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(loss, values[rows].pow(2) @ weights)
    assert index.tolist() == [0, 2, 3]
