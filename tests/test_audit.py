"""The dataset-audit flow: share measures, then end to end on a tiny folder under a temporary Prefect API."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

import helpers
import storage
import zoo
from flows.audit import dataset_audit
from tasks.audit.rows import ARTIFACT_KEYS, audit_limits, check_region, threshold_violations, true_classes

METHODS = ["gradcam", "saliency"]


def export_shapes(root, start, stop):
    """Samples [start, stop) of the built-in shapes dataset as PNG files in class sub-folders."""
    batch = zoo.load_dataset("shapes", limit=stop).load(start, stop)
    for image, label, sample_id in zip(batch.images, batch.labels, batch.ids):
        folder = root / zoo.shapes.CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{sample_id.replace('/', '-')}.png")


def read_artifacts(flow_run_id):
    return helpers.read_artifacts(ARTIFACT_KEYS.values(), flow_run_id)


# ---------------------------------------------------------------- the measures (the metrics are tested in test_metrics)


def test_labels_and_predictions_name_the_model_classes():
    """Both index the store's class coordinate (the study maps a folder's classes by name);
    -1 is a class the model does not know."""
    ds = xr.Dataset(
        {"label": ("sample", [0, 3, 1, -1]), "prediction": ("sample", [0, 3, 0, 1])},
        coords={"class": ["circle", "square", "triangle", "cross"]},
    )
    names, correct, order = true_classes(ds)
    assert list(names) == ["circle", "cross", "square", "(unknown)"]
    np.testing.assert_array_equal(correct[:3], [True, True, False])
    assert np.isnan(correct[3])
    assert order == ["circle", "square", "cross", "(unknown)"]


@pytest.mark.parametrize("region", [[0, 0, 16], [0, 0, 16, 65], [8, 0, 8, 16], [0, 0, 16.0, 16]])
def test_bad_regions_are_refused(region):
    with pytest.raises(ValueError, match="region"):
        check_region(region, (64, 64))


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-data") / "images"
    export_shapes(root, 0, 12)
    return root


@pytest.fixture(scope="module")
def audited(prefect_api, folder, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("audit") / "audit.zarr")
    state = dataset_audit(dataset=str(folder), store=store, block_size=4, methods=METHODS,
                          region=[0, 0, 16, 16], max_region_share=1.0, return_state=True)
    return store, state


def test_audit_runs_and_reports(audited):
    store, state = audited
    assert state.is_completed(), state.message
    result = state.result()
    assert result["samples"] == 12 and result["new_samples"] == 12 and result["violations"] == []
    assert result["study"]["computed_blocks"] == {m: 3 for m in [*METHODS, "random_map", "centre_map", "edge_map"]}
    assert result["report_dir"] == store[: -len(".zarr")] + ".report"
    files = result["files"]
    assert set(files) == {"table", "shares_chart", "samples_figure", "summary", "report",
                          *(f"clusters_{m}" for m in METHODS)}
    for name in ("shares_chart", "samples_figure", "clusters_gradcam"):
        with open(files[name], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = open(files["summary"]).read()
    assert "All thresholds respected" in summary and "region_share" in summary
    assert "## Strategies" in summary and "| gradcam | square |" in summary
    assert files["report"] == result["report_dir"] + "/index.html"
    assert "| outside_mask_share" not in summary, "a folder has no masks: nothing to measure outside them"


def test_audit_figures_match_the_store(audited, folder):
    """The reported region share and accuracy are what a direct numpy computation gives."""
    store, state = audited
    rows = state.result()["rows"]
    ds = xr.open_zarr(store)
    pos = np.clip(ds.attribution.values.astype(np.float64), 0, None)
    share = pos[..., :16, :16].sum((2, 3)) / pos.sum((2, 3))
    for k, method in enumerate(ds.xai_method.values):
        row = next(r for r in rows if r["xai_method"] == method and r["class"] == "all")
        assert row["region_share"] == pytest.approx(np.nanmean(share[k]), abs=1e-4)
        assert row["samples"] == 12
    # accuracy, straight from the model on the PNG files, classes compared by name
    model = zoo.load_model("shapes-cnn")
    data = zoo.load_dataset(str(folder))
    batch = data.load(0, len(data))
    with torch.no_grad():
        pred = model(model.preprocess(torch.from_numpy(batch.images))).argmax(1).numpy()
    truth = [data.classes[k] for k in batch.labels]
    expected = np.mean([model.classes[p] == t for p, t in zip(pred, truth)])
    assert rows[0]["accuracy"] == pytest.approx(expected, abs=1e-4)
    per_class = {r["class"]: r["samples"] for r in rows if r["xai_method"] == "gradcam" and r["class"] != "all"}
    assert per_class == {c: truth.count(c) for c in set(truth)}


def test_audit_publishes_artifacts(audited):
    _, state = audited
    found = read_artifacts(state.state_details.flow_run_id)
    assert set(found) == set(ARTIFACT_KEYS.values())
    assert found["dataset-audit-summary"].type == "markdown"
    assert "Dataset audit" in found["dataset-audit-summary"].data
    table = found["dataset-audit-table"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {(r["xai_method"], r["class"]) for r in rows} >= {(m, "all") for m in METHODS}
    result = state.result()
    for key, name in (("dataset-audit-shares-chart", "shares_chart"), ("dataset-audit-samples-figure", "samples_figure")):
        helpers.assert_inline_figure(found[key], result["files"][name])  # the UI's browser can show it
        assert Path(result["files"][name]).resolve().as_uri() in found[key].data
    assert Path(result["files"]["report"]).resolve().as_uri() in found["dataset-audit-atlas"].data
    trust = found["dataset-audit-trust"].data  # how far to trust the audit's scores, beside them
    assert "How far to trust this table" in trust and "region_share:" in trust


def test_another_region_on_the_same_store_is_refused(audited, folder):
    """The region is region_share's parameter, recorded in the store like every metric parameter."""
    store, _ = audited
    with pytest.raises(storage.StoreMismatch, match="parameters of region_share differ"):
        dataset_audit(dataset=str(folder), store=store, block_size=4, methods=METHODS, region=[0, 0, 64, 64])


def test_a_crossed_threshold_fails_with_a_clear_message(prefect_api, folder, tmp_path):
    store = str(tmp_path / "whole.zarr")
    state = dataset_audit(dataset=str(folder), store=store, block_size=4, methods=METHODS,
                          region=[0, 0, 64, 64], max_region_share=0.1, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError) as info:
        state.result()
    message = str(info.value)
    for method in METHODS:
        assert f"region_share inside the region [0, 0, 64, 64] crossed for method {method!r} on all classes" in message
    assert "the mean is 1.0000 over 12 maps, above the max 0.1" in message
    assert "'random_map'" not in message, "the baseline maps are never limited"
    # the artifacts were published before the run failed, so the UI shows why
    found = read_artifacts(state.state_details.flow_run_id)
    assert "Thresholds crossed" in found["dataset-audit-summary"].data


def test_bad_arguments_fail_before_any_work(prefect_api, folder, tmp_path):
    store = str(tmp_path / "never.zarr")
    with pytest.raises(ValueError, match=r"region \[0, 0, 16, 99\] must satisfy"):
        dataset_audit(dataset=str(folder), store=store, region=[0, 0, 16, 99])
    with pytest.raises(ValueError, match="max_region_share is set but region is not"):
        dataset_audit(dataset=str(folder), store=store, max_region_share=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dataset_audit(dataset=str(folder), store=store, region=[0, 0, 8, 8], max_region_share=5.0)
    with pytest.raises(ValueError, match="limits: 'nope' is not a metric"):
        dataset_audit(dataset=str(folder), store=store, limits={"nope": {"max": 1}})
    with pytest.raises(ValueError, match="limits: deletion needs"):
        dataset_audit(dataset=str(folder), store=store, limits={"deletion": {"below": 1}})
    assert not storage.exists(store)


def test_every_limit_holds_per_class_as_well():
    """A shortcut of one class in four is diluted in the dataset mean: the per-class rule catches it."""
    rows = [{"xai_method": "gradcam", "class": "all", "maps_scored": 40, "region_share": 0.13},
            {"xai_method": "gradcam", "class": "square", "maps_scored": 10, "region_share": 0.42},
            {"xai_method": "gradcam", "class": "circle", "maps_scored": 10, "region_share": 0.03},
            {"xai_method": "random_map", "class": "all", "maps_scored": 40, "region_share": 0.5}]
    limits = audit_limits(None, 0.15, None)
    [only] = threshold_violations(rows, limits, [0, 48, 16, 64])
    assert "for method 'gradcam' on class 'square': the mean is 0.4200 over 10 maps, above the max 0.15" in only
    assert threshold_violations(rows, limits, [0, 48, 16, 64], per_class=False) == []
    low = threshold_violations([{"xai_method": "gradcam", "class": "all", "maps_scored": 4, "pointing_game": 0.5}],
                               audit_limits({"pointing_game": {"min": 0.8}}, None, None), None)
    assert low == ["pointing_game crossed for method 'gradcam' on all classes: the mean is 0.5000 over 4 maps, "
                   "below the min 0.8"]


def test_a_class_above_its_limit_fails_the_audit_while_the_mean_passes(audited, folder):
    """End to end: a limit between the dataset's mean and its worst class fails on that class only."""
    store, state = audited
    rows = [r for r in state.result()["rows"] if r["xai_method"] == "gradcam"]
    overall = next(r["region_share"] for r in rows if r["class"] == "all")
    worst = max((r for r in rows if r["class"] != "all"), key=lambda r: r["region_share"])
    limit = round((overall + worst["region_share"]) / 2, 4)
    args = dict(dataset=str(folder), store=store, block_size=4, methods=["gradcam"], region=[0, 0, 16, 16],
                max_region_share=limit)
    failed = dataset_audit(**args, return_state=True)
    assert failed.is_failed()
    with pytest.raises(ValueError, match=f"on class {worst['class']!r}"):
        failed.result()
    assert dataset_audit(**args, per_class=False)["violations"] == []


def test_outside_mask_limit_needs_masks(audited, folder):
    store, _ = audited
    with pytest.raises(ValueError, match="max_outside_mask_share is set but the dataset .* has no ground-truth masks"):
        dataset_audit(dataset=str(folder), store=store, block_size=4, methods=METHODS, max_outside_mask_share=0.5)


def test_new_images_are_added_and_only_they_are_computed(audited, folder, tmp_path):
    store, _ = audited
    grown, copy = tmp_path / "images", str(tmp_path / "audit.zarr")
    shutil.copytree(folder, grown)
    shutil.copytree(store, copy)
    before = xr.open_zarr(copy).load()
    export_shapes(grown, 12, 16)
    result = dataset_audit(dataset=str(grown), store=copy, block_size=4, methods=METHODS, region=[0, 0, 16, 16])
    assert result["samples"] == 16 and result["new_samples"] == 4
    assert result["study"]["computed_blocks"] == {m: 1 for m in [*METHODS, "random_map", "centre_map", "edge_map"]}
    after = xr.open_zarr(copy)
    old_ids = list(before.sample_id.values)
    assert set(old_ids) < set(after.sample_id.values)
    position = {sid: i for i, sid in enumerate(after.sample_id.values)}
    kept = after.attribution.isel(sample=[position[s] for s in old_ids]).values
    np.testing.assert_array_equal(kept, before.attribution.values)
    assert not np.isnan(after.attribution.values).any()


def test_the_audit_takes_a_users_preprocessing_like_a_study(prefect_api, folder, tmp_path):
    """The audit's options derive from `RunSpec`: the input size, mean and std reach the study it runs."""
    store = str(tmp_path / "preprocessed.zarr")
    result = dataset_audit(dataset=str(folder), store=store, block_size=4, methods=["saliency"], input_size=[48],
                           mean=[0.5] * 3, std=[0.2] * 3, region=[0, 0, 16, 16], max_region_share=1.0)
    a = storage.Store(store, "r").attrs
    assert a["image_shape"][1:] == [48, 48] and a["image_mean"] == [0.5] * 3 and a["image_std"] == [0.2] * 3
    assert result["samples"] == 12 and result["violations"] == []
