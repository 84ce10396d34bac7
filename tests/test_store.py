"""The store: schema, block logic, write order, compatibility checks."""
import hashlib
import json
import os

import numpy as np
import pytest
import xarray as xr
import zarr

import storage


def template(**changes):
    base = dict(
        sample_ids=[f"test/{i:06d}" for i in range(10)],
        classes=["circle", "square", "triangle", "cross"],
        methods=["saliency", "gradcam"],
        image_shape=(3, 8, 8),
        block_size=4,
        has_masks=True,
        params={"saliency": {"reduce": "max_abs"}, "gradcam": {"layer": None}},
        attrs={"model": "m", "model_fingerprint": "a" * 64, "dataset": "d", "dataset_fingerprint": "b" * 64},
    )
    base.update(changes)
    return storage.Template(**base)


def tree_digest(path):
    """A hash of every file (name and bytes) under a store, to prove it was left untouched."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, path).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


@pytest.fixture
def store(tmp_path):
    path = str(tmp_path / "s.zarr")
    storage.create(path, template())
    return path


def test_schema_read_by_plain_xarray(store):
    ds = xr.open_zarr(store)
    assert ds.attribution.dims == ("xai_method", "sample", "y", "x")
    assert ds.done.dims == ("xai_method", "block")
    assert ds.image.dims == ("sample", "channel", "y", "x")
    assert ds.mask.dims == ("sample", "y", "x")
    assert ds.logits.dims == ("sample", "class")
    for v in ("label", "prediction", "target"):
        assert ds[v].dims == ("sample",)
    assert list(ds.xai_method.values) == ["saliency", "gradcam"]
    assert list(ds["class"].values) == ["circle", "square", "triangle", "cross"]
    assert ds.sample_id.values[3] == "test/000003"
    assert ds.attribution.dtype == np.float32
    assert np.isnan(ds.attribution.values).all(), "not-computed maps must read as NaN"
    assert not ds.done.values.any()
    assert ds.sizes["block"] == 3
    assert ds.attrs["model_fingerprint"] == "a" * 64 and ds.attrs["schema_version"] == storage.SCHEMA_VERSION
    assert storage.Store(store).attrs["params"]["saliency"] == {"reduce": "max_abs"}
    assert ds.attribution.chunks[1] == (4, 4, 2), "one chunk per block along samples"
    assert "method" not in ds.dims


def test_float16_and_no_masks(tmp_path):
    path = str(tmp_path / "h.zarr")
    storage.create(path, template(dtype="float16", has_masks=False))
    ds = storage.open_dataset(path)
    assert ds.attribution.dtype == np.float16 and "mask" not in ds
    storage.Store(path).write_samples(0, mask=np.ones((4, 8, 8), bool), label=np.arange(4))  # mask ignored
    assert list(storage.open_dataset(path).label.values[:4]) == [0, 1, 2, 3]


def test_blocks_and_pending(store):
    assert storage.block_slice(2, 10, 4) == slice(8, 10)
    with pytest.raises(IndexError, match="outside"):
        storage.block_slice(3, 10, 4)
    assert storage.Store(store).pending("gradcam") == [0, 1, 2]
    storage.Store(store).write_attribution("gradcam", 2, np.full((2, 8, 8), 3.0))
    assert storage.Store(store).pending("gradcam") == [0, 1]
    assert storage.Store(store).pending("saliency") == [0, 1, 2]
    ds = storage.open_dataset(store)
    a = ds.attribution.sel(xai_method="gradcam").values
    assert (a[8:] == 3).all() and np.isnan(a[:8]).all()
    assert np.isnan(ds.attribution.sel(xai_method="saliency").values).all()
    assert storage.Store(store).status()["methods"] == {"saliency": 0, "gradcam": 1}


def test_samples_then_ingested_flag(store):
    assert storage.Store(store).pending() == [0, 1, 2]
    storage.Store(store).write_samples(1, label=np.array([1, 2, 3, 0]), image=np.ones((4, 3, 8, 8), np.float32))
    assert storage.Store(store).pending() == [0, 2]
    got = storage.Store(store).read_samples(1, "label", "image")
    assert list(got["label"]) == [1, 2, 3, 0] and got["image"].shape == (4, 3, 8, 8)


def test_done_is_written_after_the_data(store, monkeypatch):
    order = []
    original = zarr.Array.__setitem__

    def recording(self, key, value):
        order.append(self.path)
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", recording)
    storage.Store(store).write_attribution("saliency", 0, np.zeros((4, 8, 8)))
    assert order == ["attribution", "failure", "checksum", "done"]


def test_a_failed_write_leaves_the_block_not_done(store, monkeypatch):
    original = zarr.Array.__setitem__

    def crash_on_data(self, key, value):
        if self.path == "attribution":
            raise OSError("disk full")
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", crash_on_data)
    with pytest.raises(OSError):
        storage.Store(store).write_attribution("saliency", 0, np.zeros((4, 8, 8)))
    monkeypatch.undo()
    assert storage.Store(store).pending("saliency") == [0, 1, 2]


def test_bad_writes_are_refused(store):
    with pytest.raises(ValueError, match="expected"):
        storage.Store(store).write_attribution("saliency", 0, np.zeros((3, 8, 8)))
    with pytest.raises(KeyError, match="not in this store"):
        storage.Store(store).write_attribution("occlusion", 0, np.zeros((4, 8, 8)))
    with pytest.raises(KeyError, match="unknown sample variables"):
        storage.Store(store).write_samples(0, pixels=np.zeros(4))
    assert storage.Store(store).pending("saliency") == [0, 1, 2]


def test_misaligned_chunks_are_refused(store):
    # A store whose chunks do not match its declared block size (e.g. edited by hand)
    # must not be written: such a write could race with a neighbouring block.
    import subprocess
    import sys

    zarr.open_group(store, mode="r+").attrs["block_size"] = 3
    with pytest.raises(storage.StoreLayoutError, match="not aligned"):
        storage.Store(store).write_attribution("saliency", 1, np.zeros((3, 8, 8)))
    # not an assert: the check holds under python -O too
    code = f"import numpy, storage; storage.Store({store!r}).write_attribution('saliency', 1, numpy.zeros((3, 8, 8)))"
    run = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "not aligned" in run.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(attrs={"model": "other", "model_fingerprint": "c" * 64, "dataset": "d", "dataset_fingerprint": "b" * 64}), "model differs"),
        (dict(attrs={"model": "m", "model_fingerprint": "a" * 64, "dataset": "d2", "dataset_fingerprint": "e" * 64}), "dataset differs"),
        (dict(sample_ids=[f"test/{i:06d}" for i in range(8)]), "may add samples after the stored ones"),
        (dict(sample_ids=[f"test/{i:06d}" for i in reversed(range(10))]), "not drop or reorder them"),
        (dict(block_size=5), "block size differs"),
        (dict(params={"saliency": {"reduce": "sum"}, "gradcam": {"layer": None}}), "parameters of saliency differ"),
        (dict(image_shape=(3, 16, 16)), "image shape differs"),
    ],
)
def test_mismatch_is_refused_and_store_untouched(store, change, message):
    storage.Store(store).write_attribution("gradcam", 0, np.ones((4, 8, 8)))
    before = tree_digest(store)
    with pytest.raises(storage.StoreMismatch, match=message) as e:
        storage.Store(store).check_compatible(template(**change))
    assert "Nothing was changed" in str(e.value)
    assert tree_digest(store) == before


def test_same_study_is_compatible_and_subset_of_methods_too(store):
    storage.Store(store).check_compatible(template())
    storage.Store(store).check_compatible(template(methods=["gradcam"]))


def test_create_refuses_existing_and_open_missing(store, tmp_path):
    with pytest.raises(Exception):
        storage.create(store, template())
    with pytest.raises(FileNotFoundError, match="no study store"):
        storage.open_dataset(str(tmp_path / "nope.zarr"))
    assert not storage.exists(str(tmp_path / "nope.zarr")) and storage.exists(store)


def test_template_validation():
    with pytest.raises(ValueError, match="block_size"):
        template(block_size=0)
    with pytest.raises(ValueError, match="dtype"):
        template(dtype="int8")
    with pytest.raises(ValueError, match="distinct"):
        template(methods=["gradcam", "gradcam"])


def test_stored_digest_is_what_is_compared(store):
    storage.Store(store).check_compatible(template(), stored_digest="b" * 64)
    with pytest.raises(storage.StoreMismatch, match="the stored samples changed"):
        storage.Store(store).check_compatible(template(), stored_digest="f" * 64)


def test_growth_appends_samples_and_methods(store):
    storage.Store(store).write_samples(0, label=np.arange(4))
    storage.Store(store).write_samples(2, label=np.array([7, 8]))
    storage.Store(store).write_attribution("gradcam", 0, np.ones((4, 8, 8)))
    storage.Store(store).write_attribution("gradcam", 2, np.full((2, 8, 8), 2.0))
    bigger = template(
        sample_ids=[f"test/{i:06d}" for i in range(15)], methods=["saliency", "gradcam", "occlusion"],
        params={"saliency": {"reduce": "max_abs"}, "gradcam": {"layer": None}, "occlusion": {"window": 4}},
        attrs={"model": "m", "model_fingerprint": "a" * 64, "dataset": "d", "dataset_fingerprint": "g" * 64},
    )
    storage.Store(store).check_compatible(bigger, stored_digest="b" * 64)
    assert storage.Store(store).grow(bigger) == {"samples": 5, "methods": ["occlusion"], "metrics": []}
    ds = xr.open_zarr(store)  # consolidated metadata was refreshed
    assert ds.attribution.shape == (3, 15, 8, 8) and ds.done.shape == (3, 4)
    assert list(ds.xai_method.values) == ["saliency", "gradcam", "occlusion"]
    assert list(ds.sample_id.values[-5:]) == [f"test/{i:06d}" for i in range(10, 15)]
    assert (ds.attribution.sel(xai_method="gradcam").values[:4] == 1).all(), "done blocks are kept"
    assert list(ds.label.values[:4]) == [0, 1, 2, 3]
    # the short last block (samples 8-9) now holds 8-11: it is redone, the full block 0 is not
    assert storage.Store(store).pending("gradcam") == [1, 2, 3]
    assert storage.Store(store).pending("occlusion") == [0, 1, 2, 3]
    assert storage.Store(store).pending() == [1, 2, 3]
    assert storage.Store(store).attrs["params"]["occlusion"] == {"window": 4}
    assert storage.Store(store).attrs["dataset_fingerprint"] == "g" * 64
    assert storage.Store(store).grow(bigger) == {"samples": 0, "methods": [], "metrics": []}, "growing twice adds nothing"


def test_an_interrupted_growth_is_completed(store, monkeypatch):
    bigger = template(sample_ids=[f"test/{i:06d}" for i in range(13)])
    original = storage.Store._extend_names

    def crash(self, coord, names):
        self.group[coord].resize((len(names),))  # the coordinate grew, its new names were never written
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.Store, "_extend_names", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.Store(store).grow(bigger)
    monkeypatch.setattr(storage.Store, "_extend_names", original)
    assert storage.Store(store).sample_ids() == [f"test/{i:06d}" for i in range(10)], "unwritten slots don't count"
    storage.Store(store).check_compatible(bigger)
    assert storage.Store(store).grow(bigger)["samples"] == 3
    assert xr.open_zarr(store).sample_id.values[-1] == "test/000012"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_recorded_checksums_are_those_of_what_is_read_back(tmp_path, dtype):
    """Checksums are made from the arrays as written, not read back: they must be what `verify` reads, through
    the dtype casts (float64 maps into float16, int32 labels into int64) and with variables left unwritten."""
    path = str(tmp_path / "c.zarr")
    storage.create(path, template(dtype=dtype))
    s, rng = storage.Store(path), np.random.default_rng(0)
    s.write_samples(1, label=np.array([1, 2, 3, 0], np.int32), image=rng.normal(size=(4, 3, 8, 8)),
                    mask=rng.random((4, 8, 8)) > 0.5)  # logits, prediction, target, contrast: left as filled
    maps = rng.normal(size=(4, 8, 8))
    maps[2] = np.nan
    s.write_attribution("gradcam", 1, maps, failure=np.array([0, 0, 2, 0]))
    g = zarr.open_group(path, mode="r")
    assert int(g["ingested_checksum"][1]) == s._sample_checksum(1) != 0
    assert int(g["checksum"][1, 1]) == s._map_checksum(1, 1)
    assert s.verify() == []
    g = zarr.open_group(path, mode="r+")
    g["attribution"][1, 4] = 0.5  # a changed value is found
    assert [(d["kind"], d["block"]) for d in storage.Store(path).verify()] == [("maps", 1)]


def test_names_are_read_once_and_a_growth_rereads_them(store, monkeypatch):
    """A block's writes look up their method's index: the coordinate is read once per Store, not per
    lookup, and the Store that grows sees the methods it added."""
    s = storage.Store(store)
    reads = []
    arr = s.group["xai_method"]
    real = type(arr).__getitem__
    monkeypatch.setattr(type(arr), "__getitem__", lambda a, k: reads.append(a.path) or real(a, k))
    for block in (0, 1, 2):
        s.write_attribution("gradcam", block, np.ones((4 if block < 2 else 2, 8, 8)))
    assert reads.count("xai_method") == 1
    more = template(methods=["saliency", "gradcam", "occlusion"],
                    params={"saliency": {"reduce": "max_abs"}, "gradcam": {"layer": None}, "occlusion": {}})
    s.grow(more)
    assert s.methods() == ["saliency", "gradcam", "occlusion"] and s.pending("occlusion") == [0, 1, 2]
    s.write_attribution("occlusion", 0, np.full((4, 8, 8), 3.0))
    assert (storage.Store(store).read_maps("occlusion", 0) == 3).all()


@pytest.mark.parametrize("compression", ["zstd", "blosc", "none"])
def test_layout_options_round_trip(tmp_path, compression):
    path = str(tmp_path / f"{compression}.zarr")
    storage.create(path, template(compression=compression, chunk_samples=2, keep_images=False, dtype="float16"))
    g = zarr.open_group(path, mode="r")
    assert g["attribution"].shards == (1, 4, 8, 8) and g["attribution"].chunks == (1, 2, 8, 8)
    assert len(g["attribution"].compressors) == (0 if compression == "none" else 1)
    assert "image" not in g and storage.Store(path).attrs["images_stored"] is False
    maps = np.random.default_rng(0).normal(size=(4, 8, 8))
    storage.Store(path).write_attribution("gradcam", 1, maps)
    np.testing.assert_array_equal(storage.open_dataset(path).attribution.values[1, 4:8], maps.astype(np.float16))
    st = storage.Store(path).status()
    assert st["map_dtype"] == "float16" and st["compression"] == compression
    assert 0 < st["bytes_per_map"] and st["bytes_stored"]["attribution"] > 0


def test_compression_shrinks_maps(tmp_path):
    sizes = {}
    for c in ("zstd", "none"):
        path = str(tmp_path / f"{c}.zarr")
        storage.create(path, template(compression=c))
        storage.Store(path).write_attribution("gradcam", 0, np.zeros((4, 8, 8)))  # very compressible
        sizes[c] = storage.Store(path).status()["bytes_per_map"]
    assert sizes["zstd"] < sizes["none"] / 2


def test_bad_layout_options():
    with pytest.raises(ValueError, match="compression must be one of"):
        template(compression="gzip")
    with pytest.raises(ValueError, match="chunk_samples must divide block_size 4"):
        template(chunk_samples=3)


def test_fsspec_memory_url():
    path = "memory://saliency-atlas-test/study.zarr"
    storage.create(path, template())
    storage.Store(path).write_attribution("saliency", 0, np.ones((4, 8, 8)))
    assert storage.exists(path) and storage.Store(path).pending("saliency") == [1, 2]
    assert float(xr.open_zarr(path).attribution.sel(xai_method="saliency").isel(sample=0).mean()) == 1.0


def test_a_store_whose_consolidated_metadata_was_dropped_still_opens(tmp_path):
    """A run killed between a change of the layout (attributes written array by array) and the consolidation
    that follows leaves a root without consolidated metadata: readers fall back to the arrays' own."""
    import zarr

    path = str(tmp_path / "s.zarr")
    storage.create(path, template())
    g = zarr.open_group(path, mode="r+", use_consolidated=False)
    g.attrs["note"] = "written without consolidating"  # drops the consolidated metadata from the root
    assert "consolidated_metadata" not in json.loads((tmp_path / "s.zarr" / "zarr.json").read_text()) or \
        json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["consolidated_metadata"] is None
    ds = storage.open_dataset(path)
    assert ds.attrs["note"] == "written without consolidating" and "attribution" in ds


def test_a_protocol_store_killed_during_creation_is_created_again(tmp_path):
    import zarr

    path = str(tmp_path / "p.zarr")
    parts = [storage.Part("p", ("unit",), {"v": (("unit",), "float32")})]
    storage.ResultStore.open_or_create(path, "sanity", {"model": "x"}, {"unit": [0, 1]}, parts)
    zarr.open_group(path, mode="r+", use_consolidated=False).attrs["created"] = False  # as a kill leaves it
    with pytest.raises(storage.StoreStateError, match="interrupted while it was being created"):
        storage.ResultStore(path, mode="r").status()
    store, created = storage.ResultStore.open_or_create(path, "sanity", {"model": "x"}, {"unit": [0, 1]}, parts)
    assert created and store.status()["parts"] == {"p": (0, 2)}
