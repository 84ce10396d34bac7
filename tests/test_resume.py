"""Grow a study with new samples and methods, and refuse a changed sample (the kill trials are in
test_faults.py)."""
import hashlib

import numpy as np
import pytest
import xarray as xr

import storage
from flows.study import study

ARGS = dict(samples=48, block_size=16, methods=["saliency", "gradcam", "occlusion"],
            params={"occlusion": {"window": 16, "stride": 16}}, device="cpu")


def digest(path, var="attribution"):
    return hashlib.sha256(xr.open_zarr(path)[var].values.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(prefect_api, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    study(store=path, **ARGS)
    return path


def test_growth_computes_only_what_is_new_and_matches_a_fresh_run(reference, tmp_path):
    import shutil

    store = str(tmp_path / "grow.zarr")
    shutil.copytree(reference, store)
    bigger = dict(ARGS, samples=72, methods=ARGS["methods"] + ["input_x_gradient"]
                  if "input_x_gradient" in __import__("xai_methods").available() else ARGS["methods"])
    summary = study(store=store, **bigger)
    methods = bigger["methods"]
    # 48 samples = 3 full blocks; 72 adds blocks 3 and 4 (the last one short).
    for m in ARGS["methods"]:
        assert summary["computed_blocks"][m] == 2
    for m in methods[len(ARGS["methods"]):]:
        assert summary["computed_blocks"][m] == 5
    fresh = str(tmp_path / "fresh.zarr")
    study(store=fresh, **bigger)
    for var in ("attribution", "image", "logits", "label"):
        assert digest(store, var) == digest(fresh, var), var
    assert list(xr.open_zarr(store).sample_id.values) == list(xr.open_zarr(fresh).sample_id.values)


def shapes_folder(root, n: int):
    """`n` built-in images as PNGs in class sub-folders of `root`; their batch."""
    from PIL import Image

    import zoo

    batch = zoo.load_dataset("shapes", limit=n).load(0, n)
    for i, (img, label) in enumerate(zip(batch.images, batch.labels)):
        (root / zoo.shapes.CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img.transpose(1, 2, 0) * 255).astype(np.uint8)).save(root / zoo.shapes.CLASSES[label] / f"{i}.png")
    return batch


def test_a_resumed_folder_study_keeps_decoded_pixels_only_for_what_it_ingests(prefect_api, tmp_path):
    """The folder's check keeps decoded pixels for the first load; a run with nothing (or part) to ingest
    does not hold the others in its cached dataset."""
    from tasks.loading import _load_dataset, load_dataset

    root, store = tmp_path / "data", str(tmp_path / "folder.zarr")
    shapes_folder(root, 10)
    args = dict(dataset=str(root), block_size=4, methods=["saliency"], device="cpu", figure=None)
    study(store=store, samples=6, **args)
    assert not load_dataset(str(root), 6, (64, 64))._kept  # each used by its block's load
    _load_dataset.cache_clear()
    study(store=store, samples=6, **args)  # finished: nothing to ingest
    assert not load_dataset(str(root), 6, (64, 64))._kept
    _load_dataset.cache_clear()
    study(store=store, samples=None, **args)  # grown by 4 samples: block 1 gains 2, block 2 is new
    assert not load_dataset(str(root), None, (64, 64))._kept  # those loaded, the stored block's not kept


def test_a_changed_sample_is_refused(prefect_api, tmp_path):
    """A folder dataset whose stored image changed on disk is refused, naming the dataset."""
    from PIL import Image

    import zoo

    root = tmp_path / "data"
    batch = shapes_folder(root, 6)
    store = str(tmp_path / "folder.zarr")
    args = dict(dataset=str(root), samples=None, block_size=4, methods=["saliency"], device="cpu")
    summary = study(store=store, **args)
    # Folder classes sort as circle, cross, square, triangle; the model's order is circle,
    # square, triangle, cross: labels are matched by name, so the (perfect) model is right.
    ds = xr.open_zarr(store)
    by_id = {f"{zoo.shapes.CLASSES[k]}/{i}.png": int(k) for i, k in enumerate(batch.labels)}
    assert [by_id[str(i)] for i in ds.sample_id.values] == list(ds.label.values)
    assert summary["accuracy"] == 1.0
    first = sorted(root.rglob("*.png"))[0]
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(first)
    before = digest(store)
    with pytest.raises(storage.StoreMismatch, match="the stored samples changed"):
        study(store=store, **args)
    assert digest(store) == before
