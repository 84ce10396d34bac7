"""Kill a study with SIGKILL at chosen moments, resume it, and compare bit for bit with an
uninterrupted run; grow a study with new samples and methods."""
import hashlib

import numpy as np
import pytest
import xarray as xr

import storage
from flows.study import study
from helpers import killed_run

ARGS = dict(samples=48, block_size=16, methods=["saliency", "gradcam", "occlusion"],
            params={"occlusion": {"window": 16, "stride": 16}}, device="cpu")
CLI = ["study", "--samples", "48", "--block-size", "16", "--methods", "saliency,gradcam,occlusion",
       "--param", "occlusion.window=16", "--param", "occlusion.stride=16", "--device", "cpu", "--figure", "none"]

def digest(path, var="attribution"):
    return hashlib.sha256(xr.open_zarr(path)[var].values.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(prefect_api, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    study(store=path, **ARGS)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "array, nth, half",
    [
        ("ingested", 2, False),    # between blocks: after the second block's inputs
        ("attribution", 5, True),  # during a block write: half of the block's maps written
        ("done", 7, False),        # a block's maps written, its done flag not yet
    ],
)
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, array, nth, half):
    store = str(tmp_path / "killed.zarr")
    killed_run(CLI, store, array, nth, half)
    done_before = storage.open_dataset(store).done.values.copy() if storage.exists(store) else None
    summary = study(store=store, **ARGS)
    if done_before is not None:
        # Exactly the blocks not done at the kill were computed: no done block was redone.
        for i, m in enumerate(ARGS["methods"]):
            assert summary["computed_blocks"][m] == int((~done_before[i]).sum())
    for var in ("attribution", "image", "logits", "prediction", "label"):
        assert digest(store, var) == digest(reference, var), var
    assert xr.open_zarr(store).done.values.all()


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


def test_a_changed_sample_is_refused(prefect_api, tmp_path):
    """A folder dataset whose stored image changed on disk is refused, naming the dataset."""
    from PIL import Image

    import zoo

    root = tmp_path / "data"
    batch = zoo.load_dataset("shapes", limit=6).load(0, 6)
    for i, (img, label) in enumerate(zip(batch.images, batch.labels)):
        (root / zoo.shapes.CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img.transpose(1, 2, 0) * 255).astype(np.uint8)).save(root / zoo.shapes.CLASSES[label] / f"{i}.png")
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
