"""Aggregating a study with Dask: every statistic equals plain numpy on the same data,
each computed chunk of ``attribution`` is read once, and the CLI writes store and plots."""
import collections
import json
import shutil
import threading
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import storage
from flows.cli import main
from tasks.drawing.aggregate import correct_path, plot_means

CLASSES = ["a", "b", "c"]
METHODS = ["saliency", "gradcam", "occlusion"]
N, B, H, W = 22, 4, 6, 5  # 6 blocks, the last one short; H != W catches a transposed map
NOT_DONE = {"gradcam": [1, 4], "occlusion": [5]}  # gradcam block 4 is written but its flag unset
METRICS = ["deletion", "pointing"]


class Study:
    """A small study written through the store API, and the same data as numpy arrays."""

    def __init__(self, root):
        rng = np.random.default_rng(0)
        self.path = str(root / "study.zarr")
        storage.create(self.path, storage.Template(
            sample_ids=[f"s{i:03d}" for i in range(N)], classes=CLASSES, methods=METHODS,
            image_shape=(1, H, W), block_size=B, has_masks=False, params={},
            attrs={"model": "m", "model_fingerprint": "f" * 64, "dataset": "d", "dataset_fingerprint": "e" * 64}))
        self.label = rng.integers(0, 3, N)
        self.label[5] = -1  # a sample without a ground-truth label
        self.pred = np.where(rng.random(N) < 0.6, self.label, rng.integers(0, 3, N))
        self.pred[5] = 1
        self.maps = rng.normal(1.0, 2.0, (len(METHODS), N, H, W)).astype(np.float32)
        self.maps[0, 2, 1, 3] = self.maps[0, 9, 0, 0] = np.nan  # a few NaN pixels in done maps
        self.maps[0, 13] = np.nan  # a done map that is NaN everywhere: it must not count
        self.maps[2] += 5.0  # a method with a large mean, to check the std numerics
        self.done = np.ones((len(METHODS), N), bool)  # per sample: its block is done for the method
        for b in range(storage.n_blocks(N, B)):
            s = storage.block_slice(b, N, B)
            storage.Store(self.path).write_samples(b, label=self.label[s], prediction=self.pred[s], target=self.pred[s])
            for m, name in enumerate(METHODS):
                if b in NOT_DONE.get(name, []):
                    self.done[m, s] = False
                    if b != 4:
                        continue
                storage.Store(self.path).write_attribution(name, b, self.maps[m, s])
        zarr.open_group(self.path, mode="r+")["done"][1, 4] = False  # data written, flag not (a crash)
        self.score = rng.random((len(METHODS), N, len(METRICS)))
        self.score[1, 0, 0] = np.nan
        # As an evaluation writes it (xarray's append mode replaces the group's attributes: keep them).
        kept = dict(zarr.open_group(self.path, mode="r").attrs)
        xr.Dataset({"score": (("xai_method", "sample", "metric"), self.score)}, coords={"metric": METRICS},
                   attrs=kept).to_zarr(self.path, mode="a", zarr_format=3, consolidated=True)

    def counted(self, m):
        """Samples that count for method m: block done and the map not NaN everywhere."""
        return self.done[m] & np.isfinite(self.maps[m]).any(axis=(1, 2))

    def expect(self, m, select):
        """numpy mean, std and count of method m's maps over the counted samples in ``select``."""
        rows = self.counted(m) & select
        x = self.maps[m, rows].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an empty group: NaN, as the aggregate has
            return np.nanmean(x, axis=0), np.nanstd(x, axis=0), int(rows.sum())


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return Study(tmp_path_factory.mktemp("agg"))


@pytest.fixture(scope="module")
def agg(study):
    return storage.aggregate(study.path)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_per_class_statistics_equal_numpy(study, agg):
    assert agg.map_mean.dims == ("xai_method", "class", "y", "x")
    assert agg.map_mean.shape == (3, 3, H, W) and agg.map_mean.dtype == np.float32
    assert list(agg.xai_method.values) == METHODS and list(agg["class"].values) == CLASSES
    for m, name in enumerate(METHODS):
        for k, cls in enumerate(CLASSES):
            mean, std, count = study.expect(m, study.label == k)
            cell = agg.sel(xai_method=name, **{"class": cls})
            close(cell.map_mean.values, mean)
            close(cell.map_std.values, std)
            assert int(cell.map_count) == count
        mean, std, count = study.expect(m, np.ones(N, bool))  # overall, the unlabelled sample too
        close(agg.map_mean_all.sel(xai_method=name).values, mean)
        close(agg.map_std_all.sel(xai_method=name).values, std)
        assert int(agg.map_count_all.sel(xai_method=name)) == count


def test_not_done_blocks_and_nan_maps_are_excluded(study, agg):
    # gradcam: blocks 1 (never written) and 4 (written, flag unset) are out; saliency: one all-NaN map out.
    assert int(agg.map_count_all.sel(xai_method="gradcam")) == N - 8
    assert int(agg.map_count_all.sel(xai_method="saliency")) == N - 1
    assert int(agg.map_count_all.sel(xai_method="occlusion")) == N - 2
    # Were the block-4 gradcam maps (finite, but not done) included, the mean would differ.
    leaky = np.nanmean(study.maps[1][study.done[1] | (np.arange(N) // B == 4)], axis=0)
    assert not np.allclose(agg.map_mean_all.sel(xai_method="gradcam").values, leaky)
    # A NaN pixel is left out of that pixel's statistics only.
    k = study.label[2]
    pixel = agg.map_mean.sel(xai_method="saliency").isel({"class": k}).values[1, 3]
    rows = study.counted(0) & (study.label == k)
    assert np.isfinite(pixel)
    close(pixel, np.nanmean(study.maps[0, rows, 1, 3]))


def test_correct_incorrect_split_equals_numpy(study, agg):
    assert agg.map_mean_by_correct.dims == ("xai_method", "correct", "y", "x")
    assert list(agg.correct.values) == [False, True]
    labelled = study.label >= 0
    right = labelled & (study.label == study.pred)
    wrong = labelled & (study.label != study.pred)
    assert right.sum() > 3 and wrong.sum() > 3
    for m, name in enumerate(METHODS):
        for flag, rows in ((True, right), (False, wrong)):
            mean, std, count = study.expect(m, rows)
            cell = agg.sel(xai_method=name, correct=flag)
            close(cell.map_mean_by_correct.values, mean)
            close(cell.map_std_by_correct.values, std)
            assert int(cell.map_count_by_correct) == count
            for k, cls in enumerate(CLASSES):
                mean, std, count = study.expect(m, rows & (study.label == k))
                cell = agg.sel(xai_method=name, correct=flag, **{"class": cls})
                close(cell.map_mean_by_class_correct.values, mean)
                close(cell.map_std_by_class_correct.values, std)
                assert int(cell.map_count_by_class_correct) == count


def test_grouping_by_prediction(study):
    agg = storage.summarize(storage.open_dataset(study.path), by="prediction", class_correct=False)
    assert agg.attrs["grouped_by"] == "prediction" and "map_mean_by_class_correct" not in agg
    for k, cls in enumerate(CLASSES):
        mean, std, count = study.expect(1, study.pred == k)
        cell = agg.sel(xai_method="gradcam", **{"class": cls})
        close(cell.map_mean.values, mean)
        close(cell.map_std.values, std)
        assert int(cell.map_count) == count


def test_score_summary_equals_numpy(study, agg):
    assert agg.score_mean.dims == ("xai_method", "metric") and list(agg.metric.values) == METRICS
    for m, name in enumerate(METHODS):
        s = np.where(study.done[m][:, None], study.score[m], np.nan)
        close(agg.score_mean.sel(xai_method=name).values, np.nanmean(s, axis=0))
        close(agg.score_std.sel(xai_method=name).values, np.nanstd(s, axis=0))
        close(agg.score_median.sel(xai_method=name).values, np.nanmedian(s, axis=0))
        assert list(agg.score_count.sel(xai_method=name).values) == list(np.isfinite(s).sum(axis=0))


@pytest.fixture
def chunk_reads(monkeypatch):
    """Counts every read of an ``attribution`` chunk from the local Zarr store."""
    reads = collections.Counter()
    lock = threading.Lock()
    original = zarr.storage.LocalStore.get

    async def counting(self, key, *args, **kwargs):
        if key.startswith("attribution/c/"):
            with lock:
                reads[key] += 1
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting)
    return reads


def test_each_done_chunk_is_read_exactly_once(study, chunk_reads, tmp_path):
    storage.aggregate(study.path, str(tmp_path / "a.agg.zarr"))
    done = zarr.open_group(study.path, mode="r")["done"][:]
    expected = {f"attribution/c/{m}/{b}/0/0" for m, b in zip(*np.nonzero(done))}
    assert len(expected) == 18 - 3
    assert set(chunk_reads) == expected, "chunks of blocks not done must not be read"
    assert all(n == 1 for n in chunk_reads.values()), chunk_reads


def test_select_is_lazy_and_matches_numpy(study, chunk_reads):
    ds = storage.open_dataset(study.path)
    sub = storage.select(ds, "gradcam", "b", correct=False)
    rows = (study.label == 1) & (study.label != study.pred)
    assert list(sub.sample.values) == list(np.flatnonzero(rows))
    assert "xai_method" not in sub.attribution.dims and sub.attribution.chunks is not None
    assert not chunk_reads, "select reads only the small per-sample vectors"
    close(sub.attribution.values, study.maps[1, rows])
    by_pred = storage.select(ds, ["saliency", "occlusion"], [0, "c"], by="prediction", correct=True)
    rows = np.isin(study.pred, [0, 2]) & (study.label == study.pred) & (study.label >= 0)
    assert list(by_pred.sample.values) == list(np.flatnonzero(rows)) and by_pred.sizes["xai_method"] == 2
    done = storage.select(ds, "gradcam", done_only=True)
    assert list(done.sample.values) == list(np.flatnonzero(study.done[1]))
    # A summary of a selection is the same computation on the subset.
    sub_agg = storage.summarize(storage.select(ds, "saliency", correct=True))
    mean, _, count = study.expect(0, (study.label >= 0) & (study.label == study.pred))
    close(sub_agg.map_mean_all.sel(xai_method="saliency").values, mean)
    assert int(sub_agg.map_count_all.sel(xai_method="saliency")) == count


@pytest.mark.parametrize("kwargs, message", [
    (dict(cls="zebra"), "classes: ['a', 'b', 'c']"),
    (dict(cls=7), "outside 0..2"),
    (dict(xai_method="lime"), "it has ['saliency', 'gradcam', 'occlusion']"),
    (dict(by="target"), "by must be one of"),
])
def test_select_refuses_bad_arguments(study, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        storage.select(storage.open_dataset(study.path), **kwargs)


def test_aggregate_store_opens_with_plain_xarray(study, agg, tmp_path):
    path = storage.default_out(study.path)
    assert path.endswith("study.agg.zarr")
    back = xr.open_zarr(path)
    for name in ("map_mean", "map_std", "map_count", "map_mean_by_correct", "score_median"):
        close(back[name].values, agg[name].values)
    assert back.attrs["model_fingerprint"] == "f" * 64 and back.attrs["dataset_fingerprint"] == "e" * 64
    assert back.attrs["aggregate_of"].endswith("study.zarr")
    assert json.loads(back.attrs["done_blocks"])["gradcam"] == [4, 6]
    # Aggregating again replaces the old aggregate, but never a store that is not one.
    storage.aggregate(study.path)
    with pytest.raises(ValueError, match="is the study store itself"):
        storage.aggregate(study.path, out=study.path + "/")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an aggregate store"):
        storage.aggregate(study.path, out=str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_plot_means_from_the_stored_aggregate(study, agg, tmp_path):
    out = str(tmp_path / "means.png")
    paths = plot_means(xr.open_zarr(storage.default_out(study.path)), out, methods=["gradcam"])
    assert paths == [out, correct_path(out)]  # there are incorrect predictions, so both figures
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not in the aggregate"):
        plot_means(agg, out, methods=["lime"])


def test_cli_aggregate_writes_store_and_plot(study, capsys, tmp_path):
    out, png = str(tmp_path / "cli.agg.zarr"), str(tmp_path / "plots" / "means.png")
    assert main(["aggregate", study.path, "--out", out, "--plot", png]) == 0
    printed = capsys.readouterr().out
    assert out in printed and png in printed and correct_path(png) in printed
    assert xr.open_zarr(out).map_mean.shape == (3, 3, H, W)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, expected", [
    (["aggregate", "/nonexistent/store.zarr"], "no study store at '/nonexistent/store.zarr'"),
    (["aggregate", "STUDY", "--out", "STUDY"], "is the study store itself"),
])
def test_cli_aggregate_bad_input_is_one_clear_line(study, capsys, argv, expected):
    code = main([study.path if a == "STUDY" else a for a in argv])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("saliency-atlas: error: ") and expected in err, err


def test_chunks_that_straddle_blocks_give_the_same_result(study, agg):
    # A user's rechunked dataset: a chunk can mix samples of done and not-done blocks.
    ds = storage.open_dataset(study.path).chunk({"sample": 6, "y": 3})
    again = storage.summarize(ds)
    for name in ("map_mean", "map_std", "map_count", "map_mean_by_correct", "map_std_all", "score_mean"):
        close(again[name].values, agg[name].values)


def test_slots_of_an_unfinished_growth_are_left_out(study, agg, tmp_path):
    # A growth writes the new names last: an empty method name or sample id is not in the study yet.
    path = str(tmp_path / "growing.zarr")
    shutil.copytree(study.path, path)
    g = zarr.open_group(path, mode="r+")
    g["xai_method"][2] = ""
    ids = g["sample_id"][:]
    ids[-2:] = ""
    g["sample_id"][:] = ids
    grown = storage.aggregate(path)
    assert list(grown.xai_method.values) == METHODS[:2] and grown.attrs["samples"] == N - 2
    mean, _, count = study.expect(0, np.arange(N) < N - 2)
    close(grown.map_mean_all.sel(xai_method="saliency").values, mean)
    assert int(grown.map_count_all.sel(xai_method="saliency")) == count
