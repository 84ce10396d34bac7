"""Maps stored on a grid smaller than the input (`study --map-size`, `storage.grid`, issue 34): CAM maps at their
layer's native grid read back bit-identical to the maps the methods return, so their scores are the same;
other maps are area means of theirs; every reader (metrics, figures, clusters, aggregate, growth) works."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

import storage
from flows.cli import main
from flows.study import study

ARGS = dict(samples=24, block_size=8, methods=["gradcam", "gradcam_pp", "saliency"], metrics=["pointing_game", "deletion"],
            metric_params={"deletion": {"steps": 8}}, baselines=False, device="cpu")


@pytest.fixture(scope="module")
def stores(prefect_api, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    paths = {k: str(root / f"{k}.zarr") for k in ("input", "native", "eight")}
    for k, path in paths.items():
        study(store=path, map_size=k.replace("eight", "8"), **ARGS)
    return paths


def test_cam_maps_at_their_native_grid_read_back_bit_identical_with_the_same_scores(stores):
    raw = xr.open_zarr(stores["native"])
    assert raw.attribution.dims == ("xai_method", "sample", "map_y", "map_x")
    assert raw.attribution.shape[2:] == (16, 16)  # shapes-cnn's stage3 grid for 64x64 inputs
    full, native = storage.open_dataset(stores["input"]), storage.open_dataset(stores["native"])
    assert native.attribution.dims == full.attribution.dims and native.attribution.shape == full.attribution.shape
    for m in ("gradcam", "gradcam_pp"):
        assert np.array_equal(native.attribution.sel(xai_method=m).values, full.attribution.sel(xai_method=m).values)
        assert np.array_equal(native.score.sel(xai_method=m).values, full.score.sel(xai_method=m).values,
                              equal_nan=True)
        s = storage.Store(stores["native"], mode="r")
        assert np.array_equal(s.read_maps(m, 1), storage.Store(stores["input"], mode="r").read_maps(m, 1))
    stored = storage.Store(stores["native"], mode="r").status()
    assert stored["map_grid"] == [16, 16]
    assert stored["bytes_stored"]["attribution"] < storage.Store(stores["input"], mode="r").status()["bytes_stored"]["attribution"]


def test_other_maps_are_area_means_of_the_methods_maps(stores):
    full = storage.open_dataset(stores["input"]).attribution
    for k, grid in (("native", 16), ("eight", 8)):
        stored = storage.open_dataset(stores[k], as_stored=True).attribution
        methods = ["saliency"] if k == "native" else ["saliency", "gradcam"]  # at 8x8 the CAM maps are averaged too
        for m in methods:
            expected = F.interpolate(torch.from_numpy(full.sel(xai_method=m).values)[:, None], size=(grid, grid),
                                     mode="area")[:, 0].numpy()
            np.testing.assert_allclose(stored.sel(xai_method=m).values, expected, rtol=1e-5, atol=1e-7)
            assert not np.array_equal(storage.open_dataset(stores[k]).attribution.sel(xai_method=m).values,
                                      full.sel(xai_method=m).values)  # averaging loses detail: said, not hidden


def test_readers_grow_and_plan_on_a_map_grid(stores, capsys, tmp_path):
    path = stores["eight"]
    summary = study(store=path, **{**ARGS, "samples": 32, "map_size": "input"})  # the store keeps its own grid
    assert sum(summary["computed_blocks"].values()) == 3  # one new block of each method
    assert xr.open_zarr(path).attribution.shape == (3, 32, 8, 8)
    agg = storage.aggregate(path, by="label")
    assert agg.map_mean.shape[-2:] == (64, 64)
    assert main(["clusters", path, "--method", "gradcam", "--clusters", "2", "--figure", "none", "--json"]) == 0
    assert main(["figure", path, "--samples", "0,1", "--out", str(tmp_path / "f.png")]) == 0
    assert main(["status", path]) == 0
    out = capsys.readouterr().out
    assert "float32 at 8x8 (read back upsampled)" in out and "(maps stored at 8x8)" in out
    assert main(["study", "--samples", "24", "--methods", "gradcam", "--map-size", "native", "--dry-run",
                 "--store", str(tmp_path / "plan.zarr")]) == 0
    assert "(maps stored at 16x16)" in capsys.readouterr().out


@pytest.mark.parametrize("value, expected", [("0", "positive integers"), ("a,b", "positive integers"),
                                             ("1,2,3", "positive integers"), ("128", "larger than the model's input")])
def test_a_bad_map_size_is_one_line_naming_what_is_valid(value, expected, capsys, tmp_path):
    assert main(["study", "--samples", "8", "--methods", "gradcam", "--map-size", value, "--dry-run",
                 "--store", str(tmp_path / "s.zarr")]) != 0
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s.zarr").exists()


def test_native_needs_a_layer_with_a_grid(capsys, tmp_path):
    assert main(["study", "--samples", "8", "--methods", "gradcam", "--map-size", "native", "--layer", "fc",
                 "--dry-run", "--store", str(tmp_path / "s.zarr")]) != 0
    assert "whose output is a (C, h, w) grid" in capsys.readouterr().err
