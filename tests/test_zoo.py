"""Tests of the zoo: the shapes generator, the shipped model, folder datasets, torchvision loading."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torchvision
from PIL import Image

import zoo
from zoo import folder
from zoo.models import SHAPES_WEIGHTS
from zoo.shapes import CLASSES, ShapesDataset, class_area, render, sample_rng

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
RECONSTRUCTION_CLASS_KEPT = 0.5  # share of shapes-vae reconstructions that shapes-cnn classifies as the original


# ----------------------------------------------------------------------------- shapes

def test_shapes_deterministic_alone_or_in_a_range() -> None:
    ds = ShapesDataset(seed=3, split="val", size=(64, 64), length=20)
    batch = ds.load(4, 10)
    alone = ds.load(7, 8)
    grown = ShapesDataset(seed=3, split="val", size=(64, 64), length=500).load(7, 8)
    for b in (alone, grown):
        assert np.array_equal(batch.images[3], b.images[0])
        assert np.array_equal(batch.masks[3], b.masks[0])
        assert batch.labels[3] == b.labels[0]
    assert batch.ids == [f"val/{i:06d}" for i in range(4, 10)] == ds.ids(4, 10)
    assert alone.ids == ["val/000007"]
    # other indices and other splits give other images
    assert not np.array_equal(batch.images[0], batch.images[1])
    other_split = ShapesDataset(seed=3, split="test", length=20).load(7, 8)
    assert not np.array_equal(other_split.images[0], alone.images[0])


def test_shapes_fingerprint() -> None:
    fp = ShapesDataset(seed=0, split="test", length=10).fingerprint()
    assert fp == ShapesDataset(seed=0, split="test", length=999).fingerprint()  # not the length
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp != ShapesDataset(seed=1, split="test").fingerprint()
    assert fp != ShapesDataset(seed=0, split="train").fingerprint()
    assert fp != ShapesDataset(seed=0, split="test", size=(32, 32)).fingerprint()


def test_render_geometry_does_not_depend_on_size() -> None:
    _, m64, l64, p64 = render(sample_rng(0, "test", 5), 64)
    _, m128, l128, p128 = render(sample_rng(0, "test", 5), 128)
    assert l64 == l128 and p64["center"] == p128["center"] and p64["r"] == p128["r"]
    assert abs(m128.sum() / 4 - m64.sum()) / m64.sum() < 0.1  # same object, 2x resolution


@pytest.mark.parametrize("index", range(40))
def test_mask_is_the_class_object(index: int) -> None:
    size = 128  # finer pixels make the analytic area check tight
    image, mask, label, p = render(sample_rng(7, "train", index), size)
    assert image.shape == (3, size, size) and image.dtype == np.float32 and mask.dtype == bool
    assert p["shape"] == CLASSES[label]
    # area matches the analytic area of the sampled shape
    expected = class_area(label, p["r"]) * size * size
    assert abs(mask.sum() - expected) / expected < 0.04
    # one connected component (8-connectivity: a triangle's tip may touch diagonally)
    assert ndi.label(mask, structure=EIGHT_CONNECTED)[1] == 1
    # pixels inside the mask have the object colour, up to the pixel noise
    inside = image[:, mask]
    assert np.allclose(inside.mean(axis=1), p["color"], atol=0.01)
    assert np.abs(inside - p["color"][:, None]).max() < 0.2
    # 1-3 distractors, none touching the class object (not even diagonally)
    assert 1 <= len(p["distractors"]) <= 3
    assert p["distractor_mask"].any()
    assert not (ndi.binary_dilation(mask, EIGHT_CONNECTED) & p["distractor_mask"]).any()


def test_classes_balanced_and_in_range() -> None:
    batch = ShapesDataset(seed=0, split="test", length=400).load(0, 400)
    assert batch.labels.dtype == np.int64 and batch.images.dtype == np.float32
    assert batch.images.shape == (400, 3, 64, 64) and batch.masks.shape == (400, 64, 64)
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    counts = np.bincount(batch.labels, minlength=len(CLASSES))
    assert len(counts) == 4 and counts.min() >= 70, counts  # 100 expected per class


def test_load_dataset_shapes_and_bad_names(tmp_path: Path) -> None:
    ds = zoo.load_dataset("shapes", split="val", size=32, limit=5, seed=2)
    assert isinstance(ds, zoo.Dataset) and len(ds) == 5 and ds.has_masks and ds.skipped == []
    assert ds.classes == ["circle", "square", "triangle", "cross"] and ds.name == "shapes"
    assert ds.load(0, 5).images.shape == (5, 3, 32, 32)
    assert len(zoo.load_dataset("shapes")) == 1000
    with pytest.raises(ValueError, match=r"shapes.*class sub-folders"):
        zoo.load_dataset("no-such-dataset")
    with pytest.raises(ValueError, match="split"):
        zoo.load_dataset("shapes", split="training")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        zoo.load_dataset(str(tmp_path / "file.txt"))


# ----------------------------------------------------------------------------- shipped model

def test_shipped_weights_accuracy() -> None:
    torch.manual_seed(0)
    model = zoo.load_model("shapes-cnn")  # shipped weights, loaded with weights_only=True
    batch = ShapesDataset(seed=12345, split="test", length=1000).load(0, 1000)  # never trained on
    with torch.no_grad():
        logits = model(model.preprocess(torch.from_numpy(batch.images)))
    accuracy = (logits.argmax(1).numpy() == batch.labels).mean()
    assert accuracy >= 0.95, accuracy


def test_load_model_attributes_and_fingerprint() -> None:
    model = zoo.load_model("shapes-cnn")
    assert not model.training and all(not m.training for m in model.modules())
    assert model.classes == CLASSES and model.arch == "shapes-cnn"
    assert model.preprocess.size == (64, 64)
    assert isinstance(model.pool, torch.nn.AdaptiveAvgPool2d) and model.fc.out_features == 4
    assert any(isinstance(m, torch.nn.ReLU) for m in model.stage3.modules())
    with torch.no_grad():
        assert model.stage3(model.stage2(model.stage1(torch.zeros(1, 3, 64, 64)))).shape[-2:] == (16, 16)
    assert SHAPES_WEIGHTS.stat().st_size < 1_000_000

    fp = zoo.model_fingerprint(model)
    assert fp == zoo.model_fingerprint(zoo.load_model("shapes-cnn"))
    with torch.no_grad():
        model.fc.weight[0, 0] += 1e-3
    assert zoo.model_fingerprint(model) != fp
    with torch.no_grad():
        model.fc.weight[0, 0] -= 1e-3
    model.stage1[1].running_mean[0] += 1  # buffers count too
    assert zoo.model_fingerprint(model) != fp


def test_preprocess_round_trip_and_resize() -> None:
    pre = zoo.load_model("shapes-cnn").preprocess
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = pre(x)
    assert not torch.allclose(y, x)
    assert torch.allclose(pre.invert(y), x, atol=1e-6)
    assert pre(torch.rand(1, 3, 100, 80)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="images must be"):
        pre(torch.rand(3, 64, 64))


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"shapes-cnn.*torchvision"):
        zoo.load_model("not-a-model")


# ----------------------------------------------------------------------------- folder datasets

def _make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "not_a_class.txt").write_text("ignored: files at the top level are not classes")
    rgb = lambda h, w: rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)  # noqa: E731
    Image.fromarray(rgb(40, 50)).save(root / "cat" / "a.png")
    Image.fromarray(rgb(30, 30)).save(root / "cat" / "b.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, size=(20, 20), dtype=np.uint8), mode="L").save(root / "cat" / "c_gray.png")
    Image.fromarray(rng.integers(0, 256, size=(33, 17, 4), dtype=np.uint8), mode="RGBA").save(root / "dog" / "d_rgba.png")
    (root / "dog" / "e_corrupt.png").write_bytes(rng.integers(0, 256, size=300, dtype=np.uint8).tobytes())
    Image.fromarray(rgb(64, 64)).convert("P").save(root / "dog" / "f_palette.png")


def test_folder_dataset(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    ds = zoo.load_dataset(str(tmp_path), size=(24, 32))
    assert ds.classes == ["cat", "dog"] and not ds.has_masks
    assert len(ds) == 5
    assert ds.ids(0, 5) == ["cat/a.png", "cat/b.jpg", "cat/c_gray.png", "dog/d_rgba.png", "dog/f_palette.png"]
    assert [p for p, _ in ds.skipped] == ["dog/e_corrupt.png"] and ds.skipped[0][1]
    batch = ds.load(0, 5)
    assert batch.images.shape == (5, 3, 24, 32) and batch.images.dtype == np.float32
    assert 0 <= batch.images.min() and batch.images.max() <= 1
    assert batch.labels.tolist() == [0, 0, 0, 1, 1] and batch.masks is None
    assert batch.ids == ds.ids(0, 5)
    gray = batch.images[2]
    assert np.allclose(gray[0], gray[1]) and np.allclose(gray[1], gray[2])  # gray -> equal channels
    part = ds.load(3, 4)
    assert np.array_equal(part.images[0], batch.images[3]) and part.ids == ["dog/d_rgba.png"]


def test_the_check_keeps_decoded_pixels_for_the_first_load_only_while_files_stay(tmp_path: Path, monkeypatch) -> None:
    _make_folder(tmp_path)
    monkeypatch.setattr(folder, "KEEP_DECODED_BYTES", 3 * 3 * 24 * 32 * 4)  # room for the first three files
    ds = folder.FolderDataset(tmp_path, size=(24, 32))
    assert sorted(ds._kept) == ["cat/a.png", "cat/b.jpg", "cat/c_gray.png"]
    kept = {rel: pixels.copy() for rel, (_, pixels) in ds._kept.items()}
    for rel in ("cat/a.png", "cat/b.jpg"):  # what the check kept is what a fresh decode gives, bit for bit
        assert np.array_equal(kept[rel], folder._read_rgb(tmp_path / rel, (24, 32)))
    gray = tmp_path / "cat" / "c_gray.png"
    Image.fromarray(np.full((20, 20), 7, np.uint8), mode="L").save(gray)  # changed after the check
    os.utime(gray, ns=(gray.stat().st_atime_ns, gray.stat().st_mtime_ns + 10**9))
    batch = ds.load(0, 5)
    assert not ds._kept  # each kept once, for its first load
    assert np.array_equal(batch.images[0], kept["cat/a.png"]) and np.array_equal(batch.images[1], kept["cat/b.jpg"])
    assert np.allclose(batch.images[2], 7 / 255) and not np.allclose(kept["cat/c_gray.png"], 7 / 255)  # decoded anew
    again = ds.load(0, 5)
    assert np.array_equal(again.images, batch.images)  # later loads decode the files


def test_a_file_the_load_could_not_decode_is_skipped_by_the_check(tmp_path: Path, monkeypatch) -> None:
    _make_folder(tmp_path)
    monkeypatch.setattr(folder.ImageOps, "exif_transpose", lambda img: (_ for _ in ()).throw(OSError("bad EXIF")))
    with pytest.raises(ValueError, match="no readable images"):  # not a study that fails at its first block
        folder.FolderDataset(tmp_path, size=(24, 32))


def test_folder_limit_and_fingerprint(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    full = zoo.load_dataset(str(tmp_path))
    few = zoo.load_dataset(str(tmp_path), limit=2)
    assert few.ids(0, 10) == ["cat/a.png", "cat/b.jpg"]
    assert few.fingerprint() == full.fingerprint()  # the source, not how many samples are used
    assert full.fingerprint() == zoo.load_dataset(str(tmp_path)).fingerprint()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "dog" / "g.png")
    assert zoo.load_dataset(str(tmp_path)).fingerprint() != full.fingerprint()


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a built-in dataset or an existing directory"):
        zoo.load_dataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"no class sub-folders.*DIR/<class>/<image>"):
        zoo.load_dataset(str(tmp_path))
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"no readable images \(1 files.*1 unreadable"):
        zoo.load_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        zoo.FolderDataset(tmp_path / "cat" / "bad.jpg")


# ----------------------------------------------------------------------------- torchvision models

@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_torchvision_model_with_local_weights(resnet18_file: tuple[Path, torch.nn.Module]) -> None:
    path, reference = resnet18_file
    model = zoo.load_model("resnet18", weights=path)
    assert not model.training and model.arch == "resnet18" and model.classes is None
    assert model.preprocess.size == (224, 224) and model.preprocess.mean == (0.485, 0.456, 0.406)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(model.preprocess(x))
        assert out.shape == (1, 3)
        assert torch.equal(out, reference(model.preprocess(x)))
    assert zoo.model_fingerprint(model) != zoo.model_fingerprint(zoo.load_model("shapes-cnn"))


def test_torchvision_errors(resnet18_file: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, reference = resnet18_file
    with pytest.raises(ValueError, match=r"--weights FILE.*nothing is downloaded"):
        zoo.load_model("resnet18")
    with pytest.raises(ValueError, match=r"nope\.pt.*does not exist"):
        zoo.load_model("resnet18", weights=tmp_path / "nope.pt")
    with pytest.raises(ValueError, match=r"resnet18\.pt.*does not fit architecture 'resnet34'.*missing keys: layer1\.2"):
        zoo.load_model("resnet34", weights=path)
    with pytest.raises(ValueError, match=r"does not fit architecture 'shapes-cnn'"):
        zoo.load_model("shapes-cnn", weights=path)
    full = tmp_path / "full_model.pt"
    torch.save(reference, full)  # a pickled full model, refused by weights_only=True
    with pytest.raises(ValueError, match=r"full_model\.pt.*not a plain state dict.*model\.state_dict\(\)"):
        zoo.load_model("resnet18", weights=full)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="could not be read"):
        zoo.load_model("resnet18", weights=junk)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": reference.state_dict(), "epoch": 3}, ckpt)
    with pytest.raises(ValueError, match=r"not a state dict of tensors.*state_dict\(\)"):
        zoo.load_model("resnet18", weights=ckpt)


def test_shapes_cnn_accepts_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fresh = zoo.ShapesCNN()
    path = tmp_path / "mine.pt"
    torch.save(fresh.state_dict(), path)
    model = zoo.load_model("shapes-cnn", weights=path)
    assert torch.equal(model.fc.weight, fresh.fc.weight)
    assert zoo.model_fingerprint(model) != zoo.model_fingerprint(zoo.load_model("shapes-cnn"))


# --------------------------------------------------------------------------- the generative model


def test_shipped_generator_reconstructs_the_class() -> None:
    """The shapes VAE (weights_only, float16 file) reproduces images well enough that shapes-cnn
    gives most reconstructions the class of the original."""
    gen = zoo.load_generator()
    model = zoo.load_model("shapes-cnn")
    assert isinstance(model.generative, zoo.Generative) and model.generative.latent_dim == gen.latent_dim
    batch = ShapesDataset(seed=0, split="test", length=200).load(0, 200)
    x = model.preprocess(torch.from_numpy(batch.images))
    with torch.no_grad():
        z = gen.encode(x)
        rec = gen.decode(z)
        kept = (model(rec).argmax(1).numpy() == batch.labels).mean()
    assert z.shape == (200, gen.latent_dim) and rec.shape == x.shape
    torch.testing.assert_close(gen.reconstruct(x[:4]), rec[:4])
    pixels = rec * 0.25 + 0.5
    assert pixels.min() >= 0 and pixels.max() <= 1  # a sigmoid in pixel space, normalised like the inputs
    assert kept >= RECONSTRUCTION_CLASS_KEPT, kept


def test_generator_is_not_part_of_the_classifier() -> None:
    with_gen = zoo.load_model("shapes-cnn")
    assert not any(k.startswith(("generative", "vae")) for k in with_gen.state_dict())
    assert all(not isinstance(m, zoo.ShapesVAE) for m in with_gen.modules())
    del with_gen.generative
    assert zoo.model_fingerprint(with_gen) == zoo.model_fingerprint(zoo.load_model("shapes-cnn"))


def test_generator_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown generator 'gan'.*shapes-vae"):
        zoo.load_generator("gan")
    bad = tmp_path / "bad.pt"
    torch.save({"encoder.0.weight": torch.zeros(2, 3, 4, 4)}, bad)
    with pytest.raises(ValueError, match="does not fit"):
        zoo.load_generator(weights=bad)
    # a broken generator file does not stop the classifier from loading; cdeepex then says what is missing
    from zoo import generative

    monkeypatch.setattr(generative, "SHAPES_VAE_WEIGHTS", tmp_path / "missing.pt")
    with pytest.warns(UserWarning, match="without its generative model"):
        model = zoo.load_model("shapes-cnn")
    assert not hasattr(model, "generative")
