"""Tests of the contrastive methods: contrastive_gradcam, cem_pp, cem_pn, cdeepex (xai_methods.contrastive)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xai_methods as xm
from xai_methods._core import contrasts

from helpers import model_left_as_is

S = 32
RA = (slice(4, 12), slice(4, 12))  # class A reads this region
RB = (slice(20, 28), slice(20, 28))  # class B reads this one


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


class RegionFeatures(nn.Module):
    """Two channels: the image's first channel inside A's region, and inside B's region."""

    def __init__(self) -> None:
        super().__init__()
        a, b = torch.zeros(S, S), torch.zeros(S, S)
        a[RA], b[RB] = 1, 1
        self.register_buffer("inside", torch.stack([a, b]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * self.inside


class TwoRegionModel(nn.Module):
    """Known answer on pixels in [0, 1]: logit A = 10 x mean over A's region, logit B = the same over B's,
    logit C = 2 (a constant "neither" class)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = RegionFeatures()
        self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.head(self.features(x).sum((2, 3)) / 64 * 10)
        return torch.cat([a, torch.full_like(a[:, :1], 2.0)], 1)


def a_images(b: int = 2) -> torch.Tensor:
    """Dim noise with a bright A region: predicted A (logit ~7), B ~1, C = 2."""
    x = torch.rand(b, 1, S, S, generator=torch.Generator().manual_seed(0)) * 0.2
    x[:, :, RA[0], RA[1]] += 0.6
    return x


def share(maps: torch.Tensor, region: tuple[slice, slice]) -> torch.Tensor:
    """Per image: the fraction of the map's (non-negative) mass inside the region."""
    return maps[:, region[0], region[1]].sum((1, 2)) / maps.sum((1, 2))


# --------------------------------------------------------------------------- registry and contrast


def test_registered() -> None:
    names = ["contrastive_gradcam", "cem_pp", "cem_pn", "cdeepex"]
    for name in names:
        assert name in xm.available() and xm.spec(name).category == "contrastive"
    assert [xm.spec(n).needs_contrast for n in names] == [True, False, True, True]
    assert xm.spec("contrastive_gradcam").needs_layer
    assert xm.spec("contrastive_gradcam").passes((S, S)) == (1, 1)
    assert xm.spec("cem_pn").passes((S, S)) == (1001, 1000)
    assert xm.spec("cem_pp").passes((S, S), steps=10, c_steps=2) == (21, 20)
    assert xm.spec("cdeepex").passes((S, S)) == (302, 300)


def test_contrast_default_is_the_runner_up_and_bad_contrasts_are_refused() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    top = logits.argmax(1)
    assert contrasts(logits, None, top).tolist() == [2, 2]
    # a target that is not the prediction: the foil is the best other class (the prediction)
    assert contrasts(logits, None, torch.tensor([2, 2])).tolist() == [0, 1]
    assert contrasts(logits, [1, 0], top).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"contrast equals the target for images \[1\]"):
        contrasts(logits, torch.tensor([2, 1]), top)
    with pytest.raises(ValueError, match="contrast out of range"):
        contrasts(logits, 7, top)
    model, x = TwoRegionModel(), a_images()
    with pytest.raises(TypeError, match="contrast must"):
        xm.attribute("cem_pn", model, x, contrast=0.5)
    with pytest.raises(TypeError, match="not contrastive"):
        xm.attribute("saliency", model, x, contrast=1)
    with pytest.raises(TypeError, match="not contrastive"):
        xm.attribute("cem_pp", model, x, contrast=1)


# --------------------------------------------------------------------------- contrastive Grad-CAM


@pytest.mark.parametrize("loss", ["cross_entropy", "pair"])
def test_contrastive_gradcam_points_to_each_class_region(loss: str) -> None:
    model, x = TwoRegionModel().eval(), a_images()
    why_a = xm.attribute("contrastive_gradcam", model, x, target=0, contrast=1, layer="features", loss=loss)
    why_b = xm.attribute("contrastive_gradcam", model, x, target=1, contrast=0, layer="features", loss=loss)
    assert (share(why_a, RA) > 0.99).all() and (share(why_b, RB) > 0.99).all()


@pytest.mark.parametrize("loss", ["cross_entropy", "pair"])
def test_contrastive_gradcam_is_gradcam_of_the_loss(loss: str) -> None:
    """Against autograd on the loss written out here; a 3-class CNN, target 0 contrast 2 and default contrast."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()
    x = torch.randn(3, 3, 12, 12)
    for contrast in (torch.tensor([2, 2, 1]), None):
        target = torch.tensor([0, 1, 0])
        ours = xm.attribute("contrastive_gradcam", model, x, target=target, contrast=contrast, layer="3", loss=loss)
        acts: list[torch.Tensor] = []
        handle = model[3].register_forward_hook(lambda m, i, o: acts.append(o))
        logits = model(x)
        handle.remove()
        c = contrast if contrast is not None else logits.detach().scatter(1, target[:, None], -1e9).argmax(1)
        if loss == "cross_entropy":
            j = F.cross_entropy(logits, c, reduction="sum")
        else:
            pair = torch.stack([logits[torch.arange(3), target], logits[torch.arange(3), c]], 1)
            j = F.cross_entropy(pair, torch.ones(3, dtype=torch.long), reduction="sum")
        (g,) = torch.autograd.grad(j, acts[0])
        expected = (g.mean((2, 3))[:, :, None, None] * acts[0]).sum(1).clamp_min(0).detach()
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_contrastive_gradcam_bad_loss_and_untouched() -> None:
    model, x = TwoRegionModel().eval(), a_images()
    with model_left_as_is(model):
        with pytest.raises(ValueError, match="loss"):
            xm.attribute("contrastive_gradcam", model, x, contrast=1, layer="features", loss="hinge")
        xm.attribute("contrastive_gradcam", model, x, layer="features")


# --------------------------------------------------------------------------- CEM


FAST_CEM = {"steps": 60, "c_steps": 3}


def test_cem_pertinent_positive_keeps_the_target_and_lies_in_its_region() -> None:
    model, x = TwoRegionModel().eval(), a_images()
    info: dict = {}
    with model_left_as_is(model):
        pp = xm.attribute("cem_pp", model, x, report=info.update, **FAST_CEM)
    assert set(info) == {"delta", "perturbed", "success", "logits", "class", "c"}
    assert info["success"].all() and (info["class"] == 0).all()
    assert (info["logits"].argmax(1) == 0).all()  # the PP alone is classified as the target
    with torch.no_grad():
        torch.testing.assert_close(model(info["perturbed"]), info["logits"])
    delta = info["delta"]
    assert (delta >= 0).all() and (delta <= x + 1e-6).all()  # 0 <= delta <= x (pixels, no preprocess)
    assert (share(pp, RA) > 0.99).all()
    assert (pp.sum((1, 2)) < 0.5 * x.sum((1, 2, 3))).all()  # a part of the input, not all of it


def test_cem_pertinent_negative_makes_the_contrast_win_and_lies_in_its_region() -> None:
    model, x = TwoRegionModel().eval(), a_images()
    info: dict = {}
    pn = xm.attribute("cem_pn", model, x, contrast=1, report=info.update, **FAST_CEM)
    assert info["success"].all() and (info["class"] == 1).all()
    assert (info["logits"].argmax(1) == 1).all()  # input + PN is classified as the contrast
    torch.testing.assert_close(info["perturbed"], x + info["delta"])
    delta = info["delta"]
    assert (delta >= 0).all() and (x + delta <= 1 + 1e-6).all()
    assert (share(pn, RB) > 0.99).all()
    # the default contrast is the runner-up: C (logit 2) for these images
    info.clear()
    xm.attribute("cem_pn", model, x, report=info.update, **FAST_CEM)
    assert (info["class"] == 2).all()


def test_cem_pertinent_positive_is_minimal_and_c_is_bisected() -> None:
    """Closed form: logit A = 10 sum(delta over A's 64 pixels) / 64 must beat C's 2, so the least PP
    has sum 12.8 inside A's region; the elastic net finds it within 5% (and puts nothing elsewhere).
    """
    model, x = TwoRegionModel().eval(), a_images(1)
    for beta in (0.0, 0.1, 1.0):
        info: dict = {}
        xm.attribute("cem_pp", model, x, beta=beta, report=info.update, **FAST_CEM)
        assert info["success"].all()
        total = float(info["delta"].sum())
        assert 12.8 <= total <= 12.8 * 1.05, (beta, total)
        assert float(info["c"]) <= 10.0  # the least c that succeeded
    # from a c too small to succeed, c grows tenfold until a success brackets it
    info = {}
    xm.attribute("cem_pp", model, x, c_init=0.01, steps=60, c_steps=4, report=info.update)
    assert info["success"].all() and 0.01 < float(info["c"]) <= 10.0


def test_cem_works_in_the_pixel_range_of_the_model() -> None:
    """With model.preprocess the constraints hold in pixels: 0 <= PP <= pixels, pixels + PN <= 1."""

    class Pre:
        mean, std = (0.5,), (0.25,)

    model = TwoRegionModel().eval()

    class Normalised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.preprocess = Pre()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x * 0.25 + 0.5)

    pixels = a_images()
    x = (pixels - 0.5) / 0.25
    info: dict = {}
    xm.attribute("cem_pp", Normalised().eval(), x, report=info.update, **FAST_CEM)
    assert info["success"].all() and (info["delta"] <= pixels + 1e-6).all()
    torch.testing.assert_close(info["perturbed"], (info["delta"] - 0.5) / 0.25)
    xm.attribute("cem_pn", Normalised().eval(), x, contrast=1, report=info.update, **FAST_CEM)
    assert info["success"].all() and (pixels + info["delta"] <= 1 + 1e-6).all()


def test_cem_batched_equals_per_image_and_reduce_none() -> None:
    model, x = TwoRegionModel().eval(), a_images(3)
    x[2] = x[2].flip(-1)  # a different image
    together = xm.attribute("cem_pn", model, x, contrast=1, reduce=None, **FAST_CEM)
    assert together.shape == x.shape
    alone = torch.cat([xm.attribute("cem_pn", model, x[i : i + 1], contrast=1, reduce=None, **FAST_CEM) for i in range(3)])
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"kappa": -1.0}, ValueError, "kappa"),
        ({"c_steps": 0}, ValueError, "c_steps"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"gamma": 1.0}, ValueError, "needs an autoencoder.*autoencoder="),
        ({"autoencoder": 3}, TypeError, "autoencoder"),
        ({"report": 3}, TypeError, "report"),
    ],
)
def test_cem_bad_parameters(params: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        xm.attribute("cem_pn", TwoRegionModel(), a_images(1), **params)


def test_cem_autoencoder_term_is_used() -> None:
    """An "autoencoder" that cannot reproduce changes in the right half of B's region (it returns the
    original pixels there): with gamma > 0 the pertinent negative moves to the left half."""
    model, x = TwoRegionModel().eval(), a_images(1)
    right = (RB[0], slice(24, 28))
    calls: list[int] = []

    def autoencoder(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        out = images.clone()
        out[:, :, right[0], right[1]] = x[:, :, right[0], right[1]]
        return out

    free, bound = {}, {}
    xm.attribute("cem_pn", model, x, contrast=1, report=free.update, **FAST_CEM)
    xm.attribute("cem_pn", model, x, contrast=1, gamma=10.0, autoencoder=autoencoder, report=bound.update, **FAST_CEM)
    assert calls and free["success"].all() and bound["success"].all()
    share_right = lambda d: float(d[..., right[0], right[1]].sum() / d.sum())  # noqa: E731
    assert share_right(free["delta"]) > 0.4
    assert share_right(bound["delta"]) < 0.3  # about 0.25 must stay there: the left pixels cap at 1


# --------------------------------------------------------------------------- CDeepEx


class LinearGenerator(nn.Module):
    """Latent (2,) -> an image with brightness z0 in A's region and z1 in B's (plus a fixed dim background)."""

    def __init__(self) -> None:
        super().__init__()
        a, b = torch.zeros(1, S, S), torch.zeros(1, S, S)
        a[0, RA[0], RA[1]], b[0, RB[0], RB[1]] = 1, 1
        self.register_buffer("basis", torch.stack([a, b]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 0.1 + torch.einsum("nk,kchw->nchw", z, self.basis)


def encode(images: torch.Tensor) -> torch.Tensor:
    return torch.stack([images[:, 0, RA[0], RA[1]].mean((1, 2)) - 0.1, images[:, 0, RB[0], RB[1]].mean((1, 2)) - 0.1], 1)


def test_cdeepex_known_answer() -> None:
    model, x = TwoRegionModel().eval(), a_images()
    generator = LinearGenerator()
    info: dict = {}
    with model_left_as_is(model):
        out = xm.attribute(
            "cdeepex", model, x, contrast=1, generator=generator, encoder=encode, steps=200, report=info.update
        )
    assert info["success"].all()
    assert (info["logits"].argmax(1) == 1).all()  # the decoded contrast point is the contrast class
    lead = info["logits"][:, 1] - info["logits"][:, 0]
    assert (lead > 0).all() and (lead < 1.5).all()  # ... and ambiguous between the two
    # the nearest such point: A's brightness drops and B's rises to meet it (d = 10 (z_b - z_a) in [0.5, 1])
    z0, z = info["latent"], info["contrast_latent"]
    assert (z[:, 0] < z0[:, 0]).all() and (z[:, 1] > z0[:, 1]).all()
    # the difference map lives in the two regions; decoded G(z0) reproduces the image's regions
    assert (share(out, RA) + share(out, RB) > 0.999).all()
    torch.testing.assert_close(info["decoded"], generator(z0))
    torch.testing.assert_close(out, (info["decoded"] - info["contrast_image"]).abs().sum(1))


def test_cdeepex_inverts_the_generator_without_an_encoder() -> None:
    model, x = TwoRegionModel().eval(), a_images(1)
    info: dict = {}
    xm.attribute(
        "cdeepex", model, LinearGenerator()(encode(x)), contrast=1, generator=LinearGenerator(), latent_dim=2,
        steps=100, inversion_steps=300, report=info.update,
    )
    assert float(info["reconstruction_error"].max()) < 1e-4
    assert info["success"].all()


def test_cdeepex_needs_a_generator() -> None:
    with pytest.raises(ValueError, match="generative model.*generator="):
        xm.attribute("cdeepex", TwoRegionModel(), a_images(1), contrast=1)
    with pytest.raises(ValueError, match="latent_dim="):
        xm.attribute("cdeepex", TwoRegionModel(), a_images(1), contrast=1, generator=LinearGenerator())
    with pytest.raises(TypeError, match="generator must be None or a callable"):
        xm.attribute("cdeepex", TwoRegionModel(), a_images(1), contrast=1, generator=3, latent_dim=2)


# --------------------------------------------------------------------------- the built-in model and generator


@pytest.fixture(scope="module")
def shapes():
    import zoo

    model = zoo.load_model("shapes-cnn")
    batch = zoo.load_dataset("shapes", limit=8).load(0, 8)
    return model, model.preprocess(torch.from_numpy(batch.images)), batch


def test_cdeepex_on_the_built_in_dataset(shapes) -> None:  # noqa: ANN001
    """The contrast point is the contrast class, and the difference concentrates on the class object."""
    model, x, batch = shapes
    info: dict = {}
    out = xm.attribute("cdeepex", model, x, report=info.update, steps=150)
    assert info["success"].float().mean() >= 0.75, info["success"]
    won = info["success"]
    assert (info["logits"][won].argmax(1) == contrasts(model(x), None, model(x).argmax(1))[won]).all()
    mask = torch.from_numpy(batch.masks).bool()
    inside = (out * mask).sum((1, 2)) / mask.sum((1, 2))
    outside = (out * ~mask).sum((1, 2)) / (~mask).sum((1, 2))
    ratio = inside[won] / outside[won]
    assert ratio.median() > 2.0, ratio


def test_cem_on_the_built_in_model(shapes) -> None:  # noqa: ANN001
    model, x, _ = shapes
    info: dict = {}
    xm.attribute("cem_pp", model, x[:2], report=info.update, steps=60, c_steps=2)
    assert info["success"].all() and (info["logits"].argmax(1) == model(x[:2]).argmax(1)).all()
    xm.attribute("cem_pn", model, x[:2], report=info.update, steps=60, c_steps=2)
    assert info["success"].all() and (info["logits"].argmax(1) == info["class"]).all()
