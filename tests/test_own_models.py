"""Users' own models: a factory, a timm architecture, a model card, their preprocessing and class
names; a resume with other preprocessing refused; the near-chance warning."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import storage
import zoo
from flows.cli import main
from helpers import export_shapes

FACTORY = '''
import torch
from torch import nn


def build(width=8, classes=4):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))
'''


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """A user's module `my_models` with a factory `build`, and weights for build(width=6)."""
    (tmp_path / "my_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    import my_models

    torch.manual_seed(0)
    weights = tmp_path / "net.pt"
    torch.save(my_models.build(width=6).state_dict(), weights)
    return weights


def test_a_factory_model_with_arguments_and_its_model_card(factory):
    with pytest.raises(ValueError, match="does not fit architecture 'my_models:build'.*shape mismatch"):
        zoo.load_model("my_models:build", factory)  # width 8 by default: the weights are width 6
    model = zoo.load_model("my_models:build", factory, model_args={"width": 6})
    assert model.preprocess.size == (224, 224) and model.classes is None  # the defaults without a card
    factory.with_suffix(".json").write_text(json.dumps(
        {"input_size": [40, 48], "mean": [0.5] * 3, "std": [0.25] * 3, "classes": ["a", "b", "c", "d"],
         "accuracy": 0.9}))
    model = zoo.load_model("my_models:build", factory, model_args={"width": 6})
    assert model.preprocess.size == (40, 48) and model.preprocess.mean == (0.5,) * 3
    assert model.classes == ["a", "b", "c", "d"] and model.card["accuracy"] == 0.9
    flags = zoo.load_model("my_models:build", factory, model_args={"width": 6}, input_size=[32], std=[0.5] * 3)
    assert flags.preprocess.size == (32, 32) and flags.preprocess.std == (0.5,) * 3  # flags win over the card
    with pytest.raises(ValueError, match="3 class names for a model with 4 outputs"):
        zoo.load_model("my_models:build", factory, model_args={"width": 6}, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="cannot import 'nope' from 'my_models'"):
        zoo.load_model("my_models:nope", factory)
    with pytest.raises(ValueError, match="does not take the model arguments"):
        zoo.load_model("my_models:build", factory, model_args={"depth": 3})


def test_a_yaml_model_card_is_read_safely(factory):
    factory.with_suffix(".yaml").write_text("input_size: 32\nmean: [0.1, 0.2, 0.3]\nstd: [1, 1, 1]\n")
    assert zoo.load_model("my_models:build", factory, model_args={"width": 6}).preprocess.mean == (0.1, 0.2, 0.3)
    factory.with_suffix(".yaml").write_text("!!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ValueError, match="could not be read"):
        zoo.load_model("my_models:build", factory, model_args={"width": 6})


def test_a_timm_architecture(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (installed with the test extras)")
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=4).state_dict(), weights)
    model = zoo.load_model("timm:resnet10t", weights)
    cfg = model.pretrained_cfg  # timm's own input size and statistics for the architecture
    assert model.preprocess.size == tuple(cfg["input_size"][1:]) and model.preprocess.mean == tuple(cfg["mean"])
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    with pytest.raises(ValueError, match="timm has no architecture 'resnet_nope'"):
        zoo.load_model("timm:resnet_nope", weights)


def test_preprocessing_is_part_of_the_store_and_near_chance_is_said(prefect_api, tmp_path, capsys):
    """shapes-cnn given ImageNet's statistics at 24x24 by mistake (as a user's digits model was given
    ImageNet's 224x224) is near chance, and the study says which preprocessing it used; with the right one it is not, and
    a resume with other preprocessing is refused."""
    data = export_shapes(tmp_path / "data", 40)
    common = ["study", "--dataset", str(data), "--samples", "all", "--block-size", "8", "--methods", "saliency",
              "--figure", "none"]
    wrong = str(tmp_path / "wrong.zarr")
    assert main(common + ["--store", wrong, "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
                          "--input-size", "24"]) == 0
    out = capsys.readouterr().out
    warning = next((line for line in out.splitlines() if line.startswith("warning: model accuracy")), None)
    assert warning and "near chance (25.0% for 4 classes)" in warning and "at 24x24 with mean [0.485" in warning, out
    assert main(["status", wrong]) == 0 and "warning  model accuracy" in capsys.readouterr().out
    right = str(tmp_path / "right.zarr")
    assert main(common + ["--store", right]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(common + ["--store", right, "--mean", "0.4,0.4,0.4"]) == 2
    err = capsys.readouterr().err
    assert "the model's input mean differs: the store was made with [0.5, 0.5, 0.5] and this run uses [0.4" in err
    ds = storage.open_dataset(right)
    assert ds.attrs["image_mean"] == [0.5, 0.5, 0.5] and ds.attribution.shape[-2:] == (64, 64)
    assert main(common + ["--store", str(tmp_path / "bad.zarr"), "--std", "0,1,1"]) == 2
    assert "std > 0" in capsys.readouterr().err


def test_a_study_of_a_factory_model_from_the_command_line(prefect_api, factory, tmp_path, capsys):
    data = export_shapes(tmp_path / "data", 8)
    (tmp_path / "names.txt").write_text("circle\nsquare\ntriangle\ncross\n")
    store = str(tmp_path / "own.zarr")
    argv = ["study", "--dataset", str(data), "--model", "my_models:build", "--model-arg", "width=6", "--weights",
            str(factory), "--input-size", "32", "--classes", str(tmp_path / "names.txt"), "--samples", "all",
            "--block-size", "4", "--methods", "saliency,gradcam", "--store", store, "--figure", "none"]
    assert main(argv) == 0, capsys.readouterr().err
    ds = storage.open_dataset(store)
    assert list(ds["class"].values) == ["circle", "square", "triangle", "cross"]
    assert ds.attribution.shape == (2, 8, 32, 32) and bool(ds.done.all())
    by_name = {"circle": 0, "square": 1, "triangle": 2, "cross": 3}  # folder classes matched by name
    assert [by_name[str(i).split("/")[0]] for i in ds.sample_id.values] == list(ds.label.values)
    assert main(argv[:-4] + ["--model-arg", "width=8", "--store", str(tmp_path / "w8.zarr")]) == 2
    assert "does not fit architecture 'my_models:build'" in capsys.readouterr().err


def test_masks_from_files_and_from_boxes_reach_the_store_and_the_evaluation(prefect_api, tmp_path, capsys):
    """A folder's masks as IMAGE.mask.png beside each image, as a parallel folder, or as VOC-style boxes
    in a CSV (in the image's own pixels, several per image): resized with the image into `mask`, and
    the pointing game runs on them."""
    data = export_shapes(tmp_path / "data", 6)
    images = sorted(data.rglob("*.png"))
    tree = tmp_path / "masks"
    rows = ["file,y0,x0,y1,x1"]
    for k, path in enumerate(images):
        rel = path.relative_to(data)
        mask = np.zeros((64, 64), np.uint8)
        mask[8 * k: 8 * k + 16, 4:20] = 255
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(tree / rel)
        rows.append(f"{rel.as_posix()},{8 * k},4,{8 * k + 16},20")
    rows.append(f"{images[0].relative_to(data).as_posix()},40,40,48,60")  # a second box of the first image
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    expected = np.zeros((len(images), 32, 32), bool)
    for k in range(len(images)):
        expected[k, 4 * k: 4 * k + 8, 2:10] = True
    common = ["study", "--dataset", str(data), "--samples", "all", "--block-size", "3", "--methods", "gradcam",
              "--input-size", "32", "--metrics", "pointing_game", "--figure", "none"]
    for name, extra in [("tree", ["--masks", str(tree)]), ("boxes", ["--masks", str(tmp_path / "boxes.csv")])]:
        store = str(tmp_path / f"{name}.zarr")
        assert main(common + extra + ["--store", store]) == 0, capsys.readouterr().err
        ds = storage.open_dataset(store)
        order = [images.index(data / str(i)) for i in ds.sample_id.values]
        want = expected[order].copy()
        if name == "boxes":
            want[order.index(0), 20:24, 20:30] = True
        np.testing.assert_array_equal(ds["mask"].values, want)
        assert np.isfinite(ds.score.sel(metric="pointing_game", xai_method="gradcam").values).all()
        capsys.readouterr()
        assert main(["evaluate", store, "--metrics", "pointing_game", "--json", "--plot", "none"]) == 0
    for path in images:  # the default: IMAGE.mask.png beside each image (not itself a sample)
        (path.with_name(path.stem + ".mask.png")).write_bytes((tree / path.relative_to(data)).read_bytes())
    store = str(tmp_path / "beside.zarr")
    assert main(common + ["--store", store]) == 0
    ds = storage.open_dataset(store)
    assert ds.sizes["sample"] == len(images) and ds["mask"].values.any(axis=(1, 2)).all()
    with pytest.raises(ValueError, match="line 1: expected file,y0,x0,y1,x1 with numbers"):
        (tmp_path / "bad.csv").write_text("a.png,1,2\n")
        zoo.load_dataset(str(data), masks=str(tmp_path / "bad.csv"))


def test_figures_say_what_they_show():
    import xarray as xr

    from tasks.drawing.figure import captions

    attrs = {"model": "resnet18", "dataset": "digits", "image_shape": [3, 112, 112], "image_mean": [0.5] * 3,
             "image_std": [0.25] * 3}
    without = xr.Dataset(attrs=attrs)
    title, footer = captions(without, contrastive=False)
    assert "outline" not in title and "model input 112x112, normalised with mean [0.5, 0.5, 0.5]" in footer
    empty = xr.Dataset({"mask": (("sample", "y", "x"), np.zeros((1, 4, 4), bool))}, attrs=attrs)
    assert "outline" not in captions(empty, contrastive=False)[0]  # a mask variable with no object in it
    masked = xr.Dataset({"mask": (("sample", "y", "x"), np.ones((1, 4, 4), bool))}, attrs=attrs)
    assert "white outline = ground-truth object" in captions(masked, contrastive=True)[0]


def test_a_protocol_takes_the_users_preprocessing_like_a_study(prefect_api, factory, tmp_path, capsys):
    """`sanity --input-size --mean --std` (the options every run shares, `tasks.spec.RunSpec`): the maps
    are of the images at that size, normalised with that mean and std."""
    import xai_methods as xm
    from tasks.protocols import PROTOCOLS

    pre = {"input_size": [112], "mean": [0.5] * 3, "std": [0.25] * 3}
    store = str(tmp_path / "sanity.zarr")
    assert main(["sanity", "--model", "my_models:build", "--weights", str(factory), "--model-arg", "width=6",
                 "--input-size", "112", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--methods", "saliency",
                 "--samples", "4", "--store", store, "--figure", "none", "--json"]) == 0
    stored = storage.ResultStore(store, "r")
    assert {k: stored.identity[k] for k in pre} == pre
    model = zoo.load_model("my_models:build", factory, model_args={"width": 6}, **pre)
    images = zoo.load_dataset("shapes", split="test", size=(112, 112), limit=4).load(0, 4).images
    x = model.preprocess(torch.from_numpy(images))
    with torch.no_grad():
        target = model(x).argmax(1)
    expected = xm.attribute("saliency", model, x, target=target).detach().numpy()
    assert stored.read("original", (0,)).shape == (4, 112, 112)
    np.testing.assert_allclose(stored.read("original", (0,)), expected, rtol=1e-5, atol=1e-7)
    default = zoo.load_model("my_models:build", factory, model_args={"width": 6}, input_size=[112])
    assert default.preprocess.mean != model.preprocess.mean  # the flags changed what the model was given
    assert "--input-size" in PROTOCOLS["sanity"].examples
