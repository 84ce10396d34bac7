"""The reliability protocols: model surgery, similarity measures, result stores, and the four
protocols reproducing the review's findings on the built-in data (Adebayo, Kindermans,
Dombrowski, Hooker)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import storage
import xai_methods as xm
import zoo
from flows.cli import main
from tasks import roar as ro
from tasks import sanity as san
from xai_methods import manipulation as M
from xai_methods import surgery
from xai_methods.metrics.similarity import MEASURES, similarities, similarity

from helpers import KILLER, assert_inline_figure, read_artifacts


@pytest.fixture(scope="module")
def shapes():
    model = zoo.load_model("shapes-cnn")
    batch = zoo.load_dataset("shapes", limit=8).load(0, 8)
    x = model.preprocess(torch.from_numpy(batch.images))
    return model, x, model(x).argmax(1)


class DefinedBackwards(nn.Module):
    """Modules defined in the opposite order to the one they run in."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Conv2d(4, 8, 3, padding=1)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))).mean((2, 3)))


# ----------------------------------------------------------------------------- surgery


def test_execution_order_is_the_order_layers_run_not_the_order_they_are_defined():
    assert surgery.execution_order(DefinedBackwards(), torch.randn(1, 3, 8, 8)) == ["stem", "body", "head"]


def test_randomized_is_seeded_per_layer_and_leaves_the_model_and_global_rng_alone(shapes):
    model, x, _ = shapes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    a = surgery.randomized(model, ["fc", "stage3.4"], seed=3)
    b = surgery.randomized(model, ["stage3.4"], seed=3)
    c = surgery.randomized(model, ["stage3.4"], seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # The same layer gets the same weights in a cascading and an independent step of one seed.
    assert torch.equal(a.stage3[4].weight, b.stage3[4].weight)
    assert not torch.equal(b.stage3[4].weight, c.stage3[4].weight)
    assert not torch.equal(a.fc.weight, model.fc.weight) and torch.equal(b.fc.weight, model.fc.weight)
    assert not a.training
    with pytest.raises(ValueError, match="unknown layer"):
        surgery.randomized(model, ["nope"])
    with pytest.raises(ValueError, match="no reset_parameters"):
        surgery.reinitialize(nn.Module(), 0)


def test_shift_compensated_computes_the_same_function_and_refuses_a_non_affine_first_layer(shapes):
    model, x, _ = shapes
    c = torch.tensor([-4.0, 1.0, 2.0]).view(1, 3, 1, 1)
    shifted = surgery.shift_compensated(model, x, c)
    with torch.no_grad():
        assert torch.allclose(shifted(x + c), model(x), atol=1e-4)
        assert not torch.allclose(model(x + c), model(x), atol=1e-2)  # the compensation is what makes them equal
    flat = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    xs = torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        assert torch.allclose(surgery.shift_compensated(flat, xs, 0.5)(xs + 0.5), flat(xs), atol=1e-5)
    with pytest.raises(ValueError, match="first layer .* is not a Conv2d or Linear"):
        surgery.shift_compensated(nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)), xs, 0.5)

    class NormalisesInside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc((x / x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).flatten(1))

    with pytest.raises(ValueError, match="could not be compensated"):
        surgery.shift_compensated(NormalisesInside(), xs, 0.5)


def test_softplus_copy_replaces_every_relu_and_tends_to_the_model(shapes):
    model, x, _ = shapes
    smooth = surgery.softplus_copy(model, 200.0)
    assert not any(isinstance(m, nn.ReLU) for m in smooth.modules())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(smooth(x).softmax(1), model(x).softmax(1), atol=0.05)
    with pytest.raises(ValueError, match="no nn.ReLU"):
        surgery.softplus_copy(nn.Sequential(nn.Linear(2, 2)), 1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        surgery.softplus_copy(model, 0.0)


# ----------------------------------------------------------------------------- similarity


def test_similarity_measures_on_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 16, 16))
    ones = np.ones(3)
    for name in MEASURES:
        np.testing.assert_allclose(similarity(name, a, a), ones, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(similarity("spearman", a, -a), -ones)
    np.testing.assert_allclose(similarity("spearman_abs", a, -a), ones)  # the sign is dropped
    b = a + rng.normal(size=a.shape)
    b[:, :4] = 0.0  # ties: mean ranks, as scipy
    want = [spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(similarity("spearman", a, b), want, atol=1e-12)
    assert np.all(similarity("ssim", a, rng.normal(size=a.shape)) < 0.3)


def test_similarity_is_nan_where_undefined_not_a_number():
    a = np.random.default_rng(1).normal(size=(3, 16, 16))
    b = a.copy()
    b[0] = 0.0        # a zero map
    b[1] = 2.5        # a constant map
    b[2, 3, 3] = np.nan
    got = similarities(a, b)
    assert np.isnan(got).all(), got
    with pytest.raises(ValueError, match="same shape"):
        similarity("ssim", a, a[:2])
    with pytest.raises(ValueError, match="unknown similarity"):
        similarity("cosine", a, a)


# ----------------------------------------------------------------------------- manipulation


@pytest.mark.parametrize("name", M.DIFFERENTIABLE)
def test_differentiable_explanation_is_the_registered_method(shapes, name):
    model, x, t = shapes
    np.testing.assert_allclose(M.explanation(name, model, x, t).detach().numpy(),
                               xm.attribute(name, model, x, target=t).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be manipulated"):
        M.explanation("occlusion", model, x, t)


# ----------------------------------------------------------------------------- result store


def _parts():
    return [storage.Part("u", ("a",), {"v": (("a", "b"), "float64")})]


def test_result_store_resumes_units_and_refuses_another_identity_untouched(tmp_path):
    path = str(tmp_path / "r.zarr")
    coords = {"a": ["p", "q"], "b": [0, 1, 2]}
    store, created = storage.ResultStore.open_or_create(path, "demo", {"k": 1}, coords, _parts())
    assert created and store.pending("u") == [(0,), (1,)]
    store.write("u", (1,), v=np.array([1.0, 2.0, 3.0]))
    assert store.pending("u") == [(0,)]
    with pytest.raises(ValueError, match="has shape"):
        store.write("u", (0,), v=np.zeros(2))
    assert store.pending("u") == [(0,)]  # a refused write sets no flag
    before = {p: p.read_bytes() for p in Path(path).rglob("*") if p.is_file()}
    for protocol, identity, what in (("demo", {"k": 2}, "k differs"), ("other", {"k": 1}, "protocol differs")):
        with pytest.raises(storage.StoreMismatch, match=what):
            storage.ResultStore.open_or_create(path, protocol, identity, coords, _parts())
    assert {p: p.read_bytes() for p in Path(path).rglob("*") if p.is_file()} == before
    ds = store.dataset()
    assert np.isnan(ds.v.sel(a="p")).all() and ds.v.sel(a="q").values.tolist() == [1.0, 2.0, 3.0]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        storage.ResultStore.open_or_create(str(tmp_path / "file"), "demo", {}, coords, _parts())


def test_remove_top_removes_exactly_the_fraction_ranked_highest():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 3, 8, 8)).astype(np.float32)
    maps = rng.normal(size=(2, 8, 8)).astype(np.float32)
    maps[1] = 0.0  # all tied: a seeded choice, the same for the same seed
    fill = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    out = ro.remove_top(images, maps, 0.25, fill, seed=0)
    removed = (out != images).any(1)
    assert removed.reshape(2, -1).sum(1).tolist() == [16, 16]
    top = maps[0].ravel() >= np.sort(maps[0].ravel())[-16]
    assert np.array_equal(removed[0].ravel(), top)
    assert np.allclose(out[0][:, removed[0]], fill[:, None])
    assert np.array_equal(out, ro.remove_top(images, maps, 0.25, fill, seed=0))
    assert np.array_equal(ro.remove_top(images, maps, 0.0, fill, seed=0), images)


def test_weights_vector_round_trip(shapes):
    model = shapes[0]
    other = surgery.randomized(model, surgery.execution_order(model, shapes[1]), seed=5)
    back = san.load_weights_vector(other, san.weights_vector(model))
    want = model.state_dict()
    # every floating-point entry (the integer step counters of BatchNorm play no part in eval mode)
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items() if v.is_floating_point())


# ----------------------------------------------------------------------------- the protocols, end to end


def run_cli(*argv: str, capsys) -> dict:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


SANITY = ["sanity", "--methods", "saliency,guided_backprop,gradcam,guided_gradcam", "--samples", "16",
          "--figure", "none", "--json"]


@pytest.fixture(scope="module")
def sanity_store(prefect_api, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sanity") / "sanity.zarr")
    assert main([*SANITY, "--store", path, "--data-randomization", "--train-samples", "640", "--epochs", "3"]) == 0
    return path


def test_sanity_json_shape_layers_top_down_and_every_step_changes_the_output(sanity_store):
    result = san.summary(sanity_store)
    layers = surgery.execution_order(zoo.load_model("shapes-cnn"), torch.zeros(1, 3, 64, 64))[::-1]
    assert list(result) == ["saliency", "guided_backprop", "gradcam", "guided_gradcam"]
    for entry in result.values():
        for kind in ("cascading_randomization", "independent_randomization"):
            assert [r["layer"] for r in entry[kind]] == layers
            assert all(set(MEASURES) <= set(r) and r["output_change"] > 0.01 for r in entry[kind])
        assert set(MEASURES) <= set(entry["label_randomization"])


def test_sanity_guided_backprop_stays_more_similar_under_cascading_randomisation(sanity_store):
    """Adebayo et al. (Fig. 2): guided backprop changes far less than the gradient and Grad-CAM as the
    model is randomised from the logits down. On shapes-cnn (5 convolutions) the gap holds over the
    cascade (mean over the layers) and closes when the first convolution is re-drawn too."""
    result = san.summary(sanity_store)

    def cascade(m: str) -> float:
        return float(np.mean([r["spearman_abs"] for r in result[m]["cascading_randomization"]]))

    assert cascade("guided_backprop") > cascade("saliency") + 0.15
    assert cascade("guided_backprop") > cascade("gradcam") + 0.15
    for m in result:  # every map has moved away from the original once the whole model is re-drawn
        assert result[m]["cascading_randomization"][-1]["spearman_abs"] < 0.5


def test_sanity_label_randomisation_reaches_chance_and_changes_the_maps(sanity_store):
    label = san.summary(sanity_store)["saliency"]["label_randomization"]
    assert label["test_accuracy"] < 0.25 + 0.1
    assert label["spearman_abs"] < 0.5


def test_sanity_rerun_computes_nothing_and_is_identical(sanity_store, capsys):
    before = hashlib.sha256(storage.ResultStore(sanity_store, "r").read("similarity").tobytes()).hexdigest()
    result = run_cli(*SANITY, "--store", sanity_store, "--data-randomization", "--train-samples", "640",
                     "--epochs", "3", capsys=capsys)
    assert result == san.summary(sanity_store)
    assert hashlib.sha256(storage.ResultStore(sanity_store, "r").read("similarity").tobytes()).hexdigest() == before


@pytest.mark.slow
def test_sanity_sigkill_then_resume_is_bit_identical(sanity_store, tmp_path, prefect_api):
    from prefect.settings import PREFECT_API_URL

    path = str(tmp_path / "killed.zarr")
    argv = [*SANITY, "--store", path, "--data-randomization", "--train-samples", "640", "--epochs", "3"]
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", KILLER, "similarity", "30", "whole", *argv], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    done = storage.ResultStore(path, "r").read("done_step")
    assert 0 < done.sum() < done.size
    assert main(argv) == 0
    for var in ("similarity", "original", "example", "output_change", "label_similarity"):
        a, b = storage.ResultStore(path, "r").read(var), storage.ResultStore(sanity_store, "r").read(var)
        assert np.array_equal(a, b, equal_nan=True), var


def test_invariance_reproduces_kindermans(prefect_api, tmp_path, capsys):
    """The gradient is input-invariant; IG and DeepLIFT with a zero reference are not; with the
    reference shifted with the input they are (Kindermans et al. 2019)."""
    common = ["invariance", "--methods", "saliency,integrated_gradients,deeplift", "--samples", "8", "--json"]
    zeros = run_cli(*common, "--store", str(tmp_path / "z.zarr"), "--baseline", "zeros", capsys=capsys)
    shifted = run_cli(*common, "--store", str(tmp_path / "s.zarr"), "--baseline", "shifted", capsys=capsys)
    assert zeros["saliency"]["invariant"] and shifted["saliency"]["invariant"]
    for m in ("integrated_gradients", "deeplift"):
        assert not zeros[m]["invariant"] and zeros[m]["change"] > 0.5, zeros
        assert shifted[m]["invariant"] and shifted[m]["change"] < 1e-3, shifted  # float rounding only
    assert (tmp_path / "z.png").stat().st_size > 0
    assert_inline_figure(read_artifacts(["invariance-figure"])["invariance-figure"], tmp_path / "s.png")  # the UI shows it


def test_manipulation_moves_the_map_keeps_the_output_and_the_defence_reduces_it(prefect_api, tmp_path, capsys):
    """Dombrowski et al. 2019 on shapes-cnn's saliency maps, 8 images."""
    r = run_cli("manipulate", "--method", "saliency", "--samples", "8", "--steps", "150", "--figure", "none",
                "--store", str(tmp_path / "m.zarr"), "--json", capsys=capsys)
    assert r["after"]["target_similarity"] > r["before"]["target_similarity"] + 0.4
    assert r["after"]["output_change"] < 0.01 and r["after"]["linf"] <= 0.05 + 1e-6  # the L-inf budget
    # The defence holds against the attack on the model's own map (the smoothed map of those images
    # stays far from the target), at a cost in fidelity to the model's map ...
    assert r["defended"]["transfer"]["target_similarity"] < r["after"]["target_similarity"] - 0.3
    assert 0.3 < r["defended"]["fidelity"] < 0.95
    # ... and an attacker who aims at the smoothed map itself still moves it (measured, not hidden).
    assert r["defended"]["target_similarity"] > r["defended"]["before"]["target_similarity"]


def test_roar_small_configuration_json_and_resume(prefect_api, tmp_path, capsys):
    argv = ["roar", "--methods", "gradcam", "--fractions", "0.5,0.9", "--seeds", "2", "--train-samples", "256",
            "--test-samples", "64", "--epochs", "1", "--store", str(tmp_path / "r.zarr"), "--json"]
    first = run_cli(*argv, capsys=capsys)
    assert set(first) == {"gradcam", "random"}
    assert all(len(v) == 2 and all(0 <= a <= 1 for a in v) for d in first.values() for v in d.values())
    assert set(first["gradcam"]) == {"0.5", "0.9"}
    assert storage.ResultStore(str(tmp_path / "r.zarr"), "r").pending("retrain") == []
    assert run_cli(*argv, capsys=capsys) == first  # resumed: nothing left, the same numbers


@pytest.mark.parametrize("argv, message", [
    (["sanity", "--methods", "nope"], "unknown method"),
    (["manipulate", "--method", "occlusion"], "cannot be manipulated"),
    (["roar", "--fractions", "0.5,1.5"], "--fractions must be in"),
    (["invariance", "--tolerance", "0"], "--tolerance must be > 0"),
    (["sanity", "--samples", "0"], "--samples must be >= 1"),
    (["manipulate", "--epsilon", "2"], "--epsilon must be in (0, 1]"),
    (["sanity", "--study", "nowhere.zarr"], "no study store"),
    (["roar", "--workers", "0"], "--workers must be >= 1"),
])
def test_bad_protocol_input_is_one_line_before_any_store(tmp_path, capsys, argv, message):
    store = tmp_path / "x.zarr"
    assert main([*argv, "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not store.exists()


def test_a_store_of_another_protocol_is_refused_and_kept(tmp_path, capsys, sanity_store):
    before = {p: p.read_bytes() for p in Path(sanity_store).rglob("*") if p.is_file()}
    assert main(["invariance", "--samples", "16", "--store", sanity_store]) == 2
    assert "protocol differs" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in Path(sanity_store).rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command", ["sanity", "invariance", "manipulate", "roar", "resilience"])
def test_every_protocol_has_a_help_that_teaches(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--store" in out and "--json" in out


def test_sanity_reuses_the_unrandomised_maps_of_a_study(prefect_api, tmp_path):
    from flows.protocols import sanity
    from flows.study import study

    study(methods=["saliency"], samples=16, block_size=8, store=str(tmp_path / "study.zarr"), figure=None)
    sanity(methods=["saliency", "gradcam"], samples=16, store=str(tmp_path / "s.zarr"),
           study=str(tmp_path / "study.zarr"))
    stored = storage.open_dataset(str(tmp_path / "study.zarr")).attribution.sel(xai_method="saliency").values
    original = storage.ResultStore(str(tmp_path / "s.zarr"), "r").read("original")
    assert np.array_equal(original[0], stored)  # the study's maps, as they are
    model, x, t = _first(16)
    fresh = xm.attribute("saliency", model, x, target=t)
    assert np.allclose(original[0], fresh.numpy())  # ... and what the sanity check would have computed


def _first(n: int):
    model = zoo.load_model("shapes-cnn")
    x = model.preprocess(torch.from_numpy(zoo.load_dataset("shapes", limit=n).load(0, n).images))
    return model, x, model(x).argmax(1)


@pytest.mark.slow
def test_protocols_run_on_a_users_torchvision_model_and_folder(prefect_api, tmp_path, capsys):
    """A folder of images and a resnet18 with the user's (here: random) weights, as a user has them."""
    import torchvision
    from PIL import Image

    torch.manual_seed(0)
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=2).state_dict(), weights)
    (tmp_path / "r18.json").write_text('{"input_size": [64, 64]}')  # the model card: trained at 64x64
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    user = ["--dataset", str(tmp_path / "data"), "--model", "resnet18", "--weights", str(weights), "--samples", "4"]
    inv = run_cli("invariance", *user, "--methods", "saliency,integrated_gradients", "--baseline", "shifted",
                  "--param", "integrated_gradients.steps=8", "--store", str(tmp_path / "i.zarr"), "--json",
                  capsys=capsys)
    assert inv["saliency"]["invariant"] and inv["integrated_gradients"]["invariant"], inv
    sanity = run_cli("sanity", *user, "--methods", "saliency", "--store", str(tmp_path / "s.zarr"), "--json",
                     capsys=capsys)
    cascade = sanity["saliency"]["cascading_randomization"]
    assert cascade[0]["layer"] == "fc" and cascade[-1]["layer"] == "conv1" and len(cascade) == 41


def test_status_of_a_protocol_store_counts_units_per_part(sanity_store, capsys):
    assert main(["status", sanity_store]) == 0
    out = capsys.readouterr().out
    assert "(sanity protocol)" in out and "shapes-cnn" in out
    assert "22/22 units done" in out and "88/88 units done" in out and "1/1 units done" in out


def test_manipulate_respects_the_budget_and_leaves_the_model_alone(shapes):
    model, x, t = shapes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    goal = xm.attribute("saliency", model, x, target=t).roll(-1, 0)
    res = M.manipulate("saliency", model, x[:2], goal[:2], preprocess=model.preprocess, target=t[:2], steps=5,
                       epsilon=0.01)
    assert float(res.delta.abs().max()) <= 0.01 + 1e-6
    images01 = model.preprocess.invert(res.images)
    assert float(images01.min()) >= 0 and float(images01.max()) <= 1
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="epsilon"):
        M.manipulate("saliency", model, x[:2], goal[:2], preprocess=model.preprocess, epsilon=0.0)
