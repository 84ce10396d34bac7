"""The study flow end to end under a temporary Prefect API."""
import hashlib
import os

import numpy as np
import pytest
import xarray as xr
import zarr

import storage
from flows.study import study

METHODS = ["saliency", "gradcam", "occlusion"]
FAST = {"occlusion": {"window": 16, "stride": 16}}


def attribution_digest(path):
    return hashlib.sha256(xr.open_zarr(path).attribution.values.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(prefect_api, tmp_path_factory):
    """One small study run to the end: 40 samples in blocks of 16 (the last one short)."""
    path = str(tmp_path_factory.mktemp("flow") / "study.zarr")
    figure = path.replace(".zarr", ".png")
    summary = study(samples=40, store=path, block_size=16, methods=METHODS, params=FAST,
                    figure=figure, figure_samples=[0, 1, 2], device="cpu")
    return path, summary


def test_store_satisfies_the_contract(finished):
    path, summary = finished
    ds = xr.open_zarr(path)
    assert ds.attribution.shape == (3, 40, 64, 64)
    assert list(ds.xai_method.values) == METHODS
    assert ds.done.values.all() and ds.done.shape == (3, 3)
    assert not np.isnan(ds.attribution.values).any()
    assert set(np.unique(ds.label.values)) <= {0, 1, 2, 3}
    assert (ds.target.values == ds.prediction.values).all()
    assert (ds.prediction.values == ds.logits.values.argmax(1)).all()
    assert ds.mask.values.any(axis=(1, 2)).all(), "every built-in sample has a ground-truth mask"
    for key in ("model_fingerprint", "dataset_fingerprint", "params", "package_version", "schema_version"):
        assert key in ds.attrs
    assert storage.Store(path).attrs["params"]["occlusion"]["window"] == 16
    assert summary["accuracy"] >= 0.9
    assert summary["computed_blocks"] == {m: 3 for m in METHODS}
    sec = summary["seconds"]  # the flow's body holds the blocks, which hold the time inside the tasks
    assert sec["flow"] >= sec["blocks"] >= sec["in_tasks"] >= sec["attribute"]["compute"] > 0


def test_figure_is_a_png(finished):
    _, summary = finished
    with open(summary["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(summary["figure"]) > 10_000


def test_maps_match_a_direct_call(finished):
    """What the pipeline stored is exactly what the method returns for those inputs."""
    import torch

    import xai_methods as xm
    import zoo

    path, _ = finished
    ds = xr.open_zarr(path)
    model = zoo.load_model("shapes-cnn")
    images = torch.from_numpy(ds.image.values[16:32])
    direct = xm.attribute("gradcam", model, images, target=torch.from_numpy(ds.target.values[16:32]))
    np.testing.assert_array_equal(ds.attribution.sel(xai_method="gradcam").values[16:32], direct.numpy())


def test_rerun_computes_nothing_and_changes_nothing(finished):
    path, _ = finished
    before = attribution_digest(path)
    summary = study(samples=40, store=path, block_size=16, methods=METHODS, params=FAST, device="cpu")
    assert summary["computed_blocks"] == {m: 0 for m in METHODS} and summary["ingested_blocks"] == 0
    assert attribution_digest(path) == before


def test_a_lost_block_is_recomputed_bit_identically(finished, tmp_path):
    import shutil

    path, _ = finished
    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(path, copy)
    before = attribution_digest(copy)
    g = zarr.open_group(copy, mode="r+")
    g["done"][2, 1] = False  # as if the run had died while writing occlusion's block 1
    g["attribution"][2, 16:32] = np.nan
    summary = study(samples=40, store=copy, block_size=16, methods=METHODS, params=FAST, device="cpu")
    assert summary["computed_blocks"] == {"saliency": 0, "gradcam": 0, "occlusion": 1}
    assert attribution_digest(copy) == before


def test_other_parameters_are_refused(finished):
    path, _ = finished
    with pytest.raises(storage.StoreMismatch, match="parameters of occlusion differ"):
        study(samples=40, store=path, block_size=16, methods=METHODS,
              params={"occlusion": {"window": 8, "stride": 8}}, device="cpu")


def test_references_only_float16_sharded_store_holds_the_same_maps(finished, tmp_path):
    path, _ = finished
    lean = str(tmp_path / "lean.zarr")
    study(samples=40, store=lean, block_size=16, methods=METHODS, params=FAST, device="cpu",
          keep_images=False, dtype="float16", chunk_samples=8, compression="blosc")
    ds, ref = xr.open_zarr(lean), xr.open_zarr(path)
    assert "image" not in ds and ds.attribution.dtype == np.float16
    np.testing.assert_array_equal(ds.attribution.values, ref.attribution.values.astype(np.float16))
    np.testing.assert_array_equal(ds.logits.values, ref.logits.values)


def test_task_runners_and_gpu_limits(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    import tasks
    from flows.study import task_runner

    assert isinstance(task_runner(None, None), ThreadPoolTaskRunner)
    assert isinstance(task_runner(1, None), ThreadPoolTaskRunner)
    assert isinstance(task_runner(2, None), DaskTaskRunner)
    assert isinstance(task_runner(None, "tcp://127.0.0.1:8786"), DaskTaskRunner)
    with pytest.raises(ValueError, match="not both"):
        task_runner(2, "tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        task_runner(0, None)
    # Pretend to have two GPUs: a third worker would share one, so it is refused.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert isinstance(task_runner(2, None, "cuda"), DaskTaskRunner)
    with pytest.raises(ValueError, match="more than the 2 GPU"):
        task_runner(3, None, "cuda")
    assert tasks.resolve_device("cuda") == "cuda"  # not in a Dask worker: the default GPU


@pytest.mark.slow
def test_two_dask_workers_equal_one_process(finished, tmp_path):
    path, _ = finished
    store = str(tmp_path / "dask.zarr")
    study(samples=40, store=store, block_size=16, methods=METHODS, params=FAST, device="cpu", workers=2)
    for var in ("attribution", "image", "logits"):
        np.testing.assert_array_equal(xr.open_zarr(store)[var].values, xr.open_zarr(path)[var].values)


def test_a_block_is_not_attributed_before_it_is_ingested(finished, tmp_path):
    import shutil

    import tasks

    path, _ = finished
    copy = str(tmp_path / "early.zarr")
    shutil.copytree(path, copy)
    group = zarr.open_group(copy, mode="r+", use_consolidated=False)
    group["ingested"][1] = False
    group["done"][0, 1] = False  # saliency's block 1 is to do (a done block is skipped, not recomputed)
    spec = tasks.StudySpec(samples=40, store=copy, block_size=16, methods=tuple(METHODS), device="cpu",
                           params=FAST)
    with pytest.raises(RuntimeError, match="not ingested yet"):
        tasks.attribute_block.fn(spec, "saliency", 1)


def test_a_methods_warning_is_logged_with_its_block_and_the_hook_is_restored(tmp_path, monkeypatch, caplog):
    """What a method warns while a block computes goes to the log, named by method and block (the loader
    and writer threads run meanwhile); the process's warning hook is as it was afterwards."""
    import warnings

    import tasks.study as ts
    from tasks.study import units
    from tasks.study.work import Work

    real = units.xm.attribute_many

    def warning_many(methods, model, images, **kw):
        warnings.warn_explicit(f"{len(images)} images looked odd", UserWarning, "m", 1)
        return real(methods, model, images, **kw)

    spec = ts.StudySpec(samples=16, store=str(tmp_path / "w.zarr"), block_size=8, methods=["saliency"], device="cpu")
    ts.prepare_store(spec)
    hook = warnings.showwarning
    monkeypatch.setattr(units.xm, "attribute_many", warning_many)
    with caplog.at_level("WARNING", logger="tasks.loading"):
        ts.run_units(spec, [Work.ingest(0), Work.ingest(1)], wait=True)
        ts.run_units(spec, [Work.attribute(["saliency"], 0), Work.attribute(["saliency"], 1)], wait=True)
    assert [r.getMessage() for r in caplog.records] == ["saliency, block 0: 8 images looked odd",
                                                        "saliency, block 1: 8 images looked odd"]
    assert warnings.showwarning is hook and storage.Store(spec.store).pending("saliency") == []
