"""Methods users already have, inside a study (issue 36): `captum:CLASS`, `gradcam:CLASS`, `zennit:COMPOSITE` and
`package.module:function`, run through their own libraries by `xai_methods.peers`: the same maps as the native
methods where the definitions coincide, relevance conserved by zennit's rules, the model left as found, one line
for a peer that is not installed, and a study that stores, resumes and scores them with their version recorded."""
import json

import numpy as np
import pytest
import torch

import xai_methods as xm
import zoo
from helpers import model_left_as_is

pytest.importorskip("captum")
pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("zennit")


@pytest.fixture(scope="module")
def shapes():
    model = zoo.load_model("shapes-cnn")
    x = model.preprocess(torch.from_numpy(zoo.load_dataset("shapes", limit=6).load(0, 6).images))
    return model, x


def test_captum_saliency_and_integrated_gradients_are_ours(shapes):
    model, x = shapes
    ours = xm.attribute("saliency", model, x)
    theirs = xm.attribute("captum:Saliency", model, x, reduce="max_abs")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-7)
    ig = xm.attribute("integrated_gradients", model, x, steps=16)
    cig = xm.attribute("captum:IntegratedGradients", model, x, n_steps=16)
    torch.testing.assert_close(cig, ig, rtol=1e-3, atol=1e-5)  # both Gauss-Legendre, zero baseline, channels summed


def test_pytorch_grad_cam_is_our_gradcam_scaled_to_one(shapes):
    model, x = shapes
    ours = xm.attribute("gradcam", model, x)
    low, high = ours.flatten(1).amin(1)[:, None, None], ours.flatten(1).amax(1)[:, None, None]
    theirs = xm.attribute("gradcam:GradCAM", model, x)
    torch.testing.assert_close(theirs, (ours - low) / (high - low), rtol=1e-3, atol=1e-3)


def test_zennit_rules_conserve_the_target_logit():
    """A ReLU network without biases or BatchNorm: the epsilon and z+ rules pass the target's logit down whole."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 4, bias=False)).eval()
    x = torch.rand(4, 3, 16, 16)
    target = model(x).argmax(1)
    logit = model(x).gather(1, target[:, None])[:, 0]
    for name in ("zennit:EpsilonPlus", "zennit:EpsilonPlusFlat"):  # alpha-beta conserves only where both signs flow
        relevance = xm.attribute(name, model, x, target=target, canonizer="none")
        torch.testing.assert_close(relevance.flatten(1).sum(1), logit, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["captum:IntegratedGradients", "captum:LayerGradCam", "gradcam:GradCAM",
                                  "zennit:EpsilonPlusFlat", "zennit:EpsilonGammaBox", "helpers:brightness_map"])
def test_every_peer_leaves_the_model_as_found(shapes, name):
    model, x = shapes
    with model_left_as_is(model, state=True):
        out = xm.attribute(name, model, x[:2])
    assert out.shape == (2, 64, 64) and torch.isfinite(out).all()


def test_a_users_function_gets_its_parameters_checked(shapes):
    model, x = shapes
    s = xm.spec("helpers:brightness_map")
    assert dict(s.defaults) == {"scale": 1.0, "peer_version": s.defaults["peer_version"]}
    torch.testing.assert_close(xm.attribute("helpers:brightness_map", model, x, scale=2.0), 2 * x.sum(1))
    with pytest.raises(TypeError, match="unknown parameter 'colour'"):
        xm.check("helpers:brightness_map", model, (64, 64), colour=1)
    with pytest.raises(ValueError, match="peer_version is the installed package's"):
        xm.check("captum:Saliency", model, (64, 64), peer_version="0.1")


@pytest.mark.parametrize("name,message", [
    ("captum:Saliancy", "captum.attr has no attribution class 'Saliancy'; it has "),
    ("gradcam:GradCam", "pytorch_grad_cam has no CAM class 'GradCam'; it has "),
    ("zennit:EpsilonFlat", "zennit has no composite 'EpsilonFlat'; it has "),
    ("no_such_package.module:fn", "needs the package 'no_such_package', which is not installed: pip install no_such_package"),
    ("helpers:no_such_fn", "helpers has no function 'no_such_fn'"),
])
def test_a_bad_peer_name_is_one_line(shapes, name, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        xm.check(name, shapes[0], (64, 64))


def test_a_peer_that_is_not_installed_says_what_to_install(monkeypatch, shapes):
    import importlib.util

    from xai_methods import _registry, peers

    peers.resolve.cache_clear(), _registry._peer.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "zennit" else real(name, *a))
    with pytest.raises(ValueError, match="needs the package 'zennit', which is not installed: pip install zennit"):
        xm.check("zennit:EpsilonPlus", shapes[0], (64, 64))
    monkeypatch.undo()
    peers.resolve.cache_clear(), _registry._peer.cache_clear()


def test_a_study_stores_resumes_and_scores_peer_methods(prefect_api, tmp_path, capsys):
    import storage
    from flows.cli import main

    store = str(tmp_path / "peers.zarr")
    argv = ["study", "--samples", "16", "--block-size", "8", "--methods", "captum:Saliency,gradcam:GradCAM,helpers:brightness_map",
            "--param", "helpers:brightness_map.scale=2", "--store", store, "--device", "cpu", "--figure", "none"]
    assert main(argv) == 0
    ds = storage.open_dataset(store)
    assert [str(m) for m in ds.xai_method.values] == ["captum:Saliency", "gradcam:GradCAM", "helpers:brightness_map"]
    params = json.loads(ds.attrs["params"])
    assert params["helpers:brightness_map"]["scale"] == 2 and params["captum:Saliency"]["peer_version"]
    model = zoo.load_model("shapes-cnn")
    x = model.preprocess(torch.from_numpy(zoo.load_dataset("shapes", limit=16).load(0, 16).images))
    np.testing.assert_allclose(ds.attribution.sel(xai_method="helpers:brightness_map").values, (2 * x.sum(1)).numpy(),
                               rtol=1e-6)
    before = ds.attribution.values.tobytes()
    assert main(argv) == 0 and storage.open_dataset(store).attribution.values.tobytes() == before  # resumed: done
    assert main(["evaluate", store, "--metrics", "pointing_game", "--plot", "none", "--json"]) == 0
    means = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(means["pointing_game"]) >= {"captum:Saliency", "gradcam:GradCAM", "random_map"}
    g = storage.Store(store).group  # a store made with another version of a peer: refused, kept
    g.attrs["params"] = json.dumps({**params, "captum:Saliency": {**params["captum:Saliency"], "peer_version": "0.0.1"}})
    assert main(argv) != 0
    assert "peer_version" in capsys.readouterr().err
