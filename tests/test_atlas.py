"""The atlas: spectral relevance analysis (known answers, scikit-learn as the reference, the edge
cases), clusters in the store, a model with a watermark shortcut on half of one class found by its
clusters (Lapuschkin et al. 2019's horses), the HTML report in headless Chromium, and the figures'
colours."""
import json

import numpy as np
import pytest
import xarray as xr

import storage
from browser import broken_images, chromium, console_errors
from flows.cli import main
from xai_methods import spray

from zoo.clever_hans import WATERMARKED  # file-name prefix of the test images that carry the watermark


def blobs(n, k, seed=0, side=32):
    """n maps in k groups: each group's map is hot in its own 10x10 cell, plus noise."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % k
    maps = rng.normal(0, 0.3, (n, side, side))
    for i, c in enumerate(truth):
        y, x = divmod(int(c), 3)
        maps[i, y * 10:y * 10 + 10, x * 10:x * 10 + 10] += 3
    return maps, truth


# ---------------------------------------------------------------- SpRAy, pure


@pytest.mark.parametrize("k", [2, 3, 4])
def test_the_eigengap_finds_the_number_of_groups_and_the_groups(k):
    from sklearn.metrics import adjusted_rand_score

    maps, truth = blobs(90, k)
    found = spray.analyse(maps, seed=0)
    assert found.k == k
    assert adjusted_rand_score(truth, found.labels) == 1.0
    assert found.eigenvalues[:k].max() < 1e-8 < found.eigengap, "k disconnected groups: k zero eigenvalues"


def test_agrees_with_scikit_learn_spectral_clustering():
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score

    maps, _ = blobs(120, 3, seed=3)
    maps += np.random.default_rng(4).normal(0, 1.0, maps.shape)  # groups that touch: a real clustering problem
    found = spray.analyse(maps, clusters=3, seed=0)
    ref = SpectralClustering(n_clusters=3, affinity="nearest_neighbors", n_neighbors=10, random_state=0)
    assert adjusted_rand_score(ref.fit_predict(spray.features(maps)), found.labels) > 0.95


def test_one_strategy_is_one_cluster_and_magnitude_does_not_count():
    """Noise around one shape is one group; the same shapes scaled by 1 or 100 cluster alike (unit norm)."""
    rng = np.random.default_rng(0)
    maps = rng.normal(0, 0.2, (60, 16, 16)) + np.outer(np.hanning(16), np.hanning(16))
    assert spray.analyse(maps).k == 1
    scaled, truth = blobs(60, 2)
    scaled[::2] *= 100.0
    assert (spray.analyse(scaled).labels == spray.analyse(blobs(60, 2)[0]).labels).all()


def test_large_groups_take_the_sparse_eigensolver_and_agree(monkeypatch):
    """Past `DENSE` maps the spectrum comes from Lanczos iteration: the same groups and eigenvalues as the
    dense solver's."""
    maps, truth = blobs(spray.DENSE + 100, 3, side=30)
    found = spray.analyse(maps, size=10, seed=0)
    assert found.k == 3 and len(set(zip(found.labels, truth))) == 3
    monkeypatch.setattr(spray, "DENSE", len(maps))
    dense = spray.analyse(maps, size=10, seed=0)
    assert (dense.labels == found.labels).all()
    np.testing.assert_allclose(dense.eigenvalues, found.eigenvalues, atol=1e-8)


def test_the_graph_is_the_same_whatever_the_slab_of_distances_held_at_once(monkeypatch):
    """Memory bounded by `SLAB` distances, not by N: a slab of one row or of all rows gives the same graph, ties
    (duplicated maps) included."""
    maps, _ = blobs(300, 3, side=12)
    x = spray.features(np.concatenate([maps, maps[:20]]), size=6)
    whole = spray.affinity(x, 10)
    for slab in (1, 7 * len(x) + 3):
        monkeypatch.setattr(spray, "SLAB", slab)
        assert (spray.affinity(x, 10) != whole).nnz == 0


def test_labels_are_by_size_seeded_and_repeatable():
    maps, _ = blobs(30, 2)
    maps = np.concatenate([maps, maps[:10:2]])  # group 0 gets 5 more maps
    a, b = spray.analyse(maps, seed=1), spray.analyse(maps, seed=1)
    assert (a.labels == b.labels).all()
    sizes = np.bincount(a.labels)
    assert list(sizes) == sorted(sizes, reverse=True)


def test_edge_cases():
    """Too few maps, identical maps (all distances tie), zero maps, NaN and bad parameters."""
    assert spray.analyse(np.ones((2, 8, 8)), size=8).labels.tolist() == [0, 0]
    assert np.isnan(spray.analyse(np.ones((2, 8, 8)), size=8).eigengap)
    assert spray.analyse(np.zeros((0, 8, 8)), size=8).labels.size == 0
    same = spray.analyse(np.ones((20, 8, 8)), size=4)  # every distance ties (broken by index)
    assert same.k == 1 and same.labels.tolist() == [0] * 20, "identical maps are one strategy"
    assert (spray.features(np.zeros((3, 8, 8)), 4) == 0).all(), "a zero map stays zero (no division by 0)"
    with pytest.raises(ValueError, match="NaN"):
        spray.analyse(np.full((5, 8, 8), np.nan), size=8)
    with pytest.raises(ValueError, match="size must be between 1 and"):
        spray.features(np.ones((5, 8, 8)), 9)
    with pytest.raises(ValueError, match="neighbours must be an integer >= 1"):
        spray.analyse(np.ones((5, 8, 8)), neighbours=0)
    with pytest.raises(ValueError, match="clusters must be an integer >= 1 or None"):
        spray.analyse(np.ones((5, 8, 8)), clusters=0)


def test_features_are_area_means_with_unit_norm():
    maps = np.arange(2 * 8 * 8, dtype=float).reshape(2, 8, 8)
    got = spray.features(maps, 4)
    expected = maps.reshape(2, 4, 2, 4, 2).mean((2, 4)).reshape(2, -1)
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected, axis=1, keepdims=True))


# ---------------------------------------------------------------- a watermark on half of one class


@pytest.fixture(scope="module")
def watermarked(prefect_api, tmp_path_factory):
    """A shapes-cnn trained (3 epochs, seeded) on images where half of the squares carry a watermark
    (`zoo.clever_hans`), studied with Grad-CAM on a folder of fresh images marked the same way."""
    from zoo.clever_hans import REGION, build

    root = tmp_path_factory.mktemp("watermark")
    paths = build(root)
    store = str(root / "wm.zarr")
    assert main(["study", "--dataset", str(paths["images"]), "--model", "shapes-cnn", "--weights", str(paths["weights"]),
                 "--methods", "gradcam", "--store", store, "--block-size", "40", "--device", "cpu", "--figure", "none",
                 "--metrics", "region_share", "--metric-param", f"region_share.region={list(REGION)}"]) == 0
    return store


def test_the_clusters_of_the_class_separate_the_watermarked_images(watermarked, capsys):
    capsys.readouterr()
    assert main(["clusters", watermarked, "--method", "gradcam", "--class", "square", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert list(found) == ["square"]
    clusters = found["square"]
    assert len(clusters) == 2, "the eigengap sees two strategies in the class"
    marked = [[i.split("/")[-1].startswith(WATERMARKED) for i in c["sample_ids"]] for c in clusters]
    assert sorted(np.mean(m) for m in marked) == [0.0, 1.0], "each cluster is all watermarked or all plain"
    squares = sum(c["size"] for c in clusters)
    assert sum(map(sum, marked)) == -(-squares // 2), "every other square is marked: all of them are found"
    assert set(clusters[0]) >= {"cluster", "size", "sample_ids"}


def test_the_audit_view_points_at_the_watermark_cluster(watermarked):
    from tasks.audit.clusters import cluster_table, ensure, strategy_rows

    ensure(watermarked, "gradcam")
    (row,) = [r for r in strategy_rows(cluster_table(watermarked, "gradcam"), "gradcam", "region_share")
              if r["class"] == "square"]
    top = next(c for c in cluster_table(watermarked, "gradcam")["square"] if c["cluster"] == row["cluster"])
    assert all(i.split("/")[-1].startswith(WATERMARKED) for i in top["sample_ids"])
    other = next(c for c in cluster_table(watermarked, "gradcam")["square"] if c["cluster"] != row["cluster"])
    assert other["scores"]["region_share"] < 0.15 < row["class_mean"] < row["region_share"] - 0.15, \
        "the class's mean dilutes what the watermarked cluster shows"


def test_a_clever_hans_model_is_noticed_by_where_the_maps_look_not_by_faithfulness(watermarked, tmp_path, capsys):
    """Issue 35's finding (docs/findings.md): on the squares, watermarked against plain, the audit's region share
    and the maps' concentration (sparseness) move up; deletion calls the watermarked maps *more* faithful (the
    model does rely on the watermark they show), and so it does for the edge map, which knows nothing of it."""
    import shutil

    from tasks import meta

    store = str(tmp_path / "wm.zarr")
    shutil.copytree(watermarked, store)  # the other tests read the fixture's store as it was
    assert main(["evaluate", store, "--metrics", "deletion,sparseness", "--plot", "none", "--json"]) == 0
    capsys.readouterr()
    ds = storage.open_dataset(store)
    ids = [str(i) for i in ds.sample_id.values]
    marked = np.array([i.split("/")[-1].startswith(WATERMARKED) for i in ids])
    squares = np.array(["square/" in i for i in ids])
    shift = meta.group_shift(ds, marked, squares)
    assert shift["region_share"]["gradcam"]["low"] > 0.2 and not shift["region_share"]["random_map"]["shifts"]
    assert shift["sparseness"]["gradcam"]["low"] > 0
    assert shift["deletion"]["gradcam"]["high"] < 0 and shift["deletion"]["edge_map"]["high"] < 0
    assert shift["deletion"]["gradcam"]["n_inside"] == marked.sum() and shift["deletion"]["gradcam"]["n_outside"] == (
        squares & ~marked).sum()


def test_past_the_cap_a_sample_is_clustered_and_the_others_join_their_nearest(watermarked, tmp_path, monkeypatch):
    """A class of more maps than `CAP`: a seeded sample of CAP is clustered, every other usable map gets the label
    of its nearest clustered one; the watermarked squares still form a cluster of their own."""
    import shutil

    from tasks.audit import clusters

    store = str(tmp_path / "wm.zarr")
    shutil.copytree(watermarked, store)
    monkeypatch.setattr(clusters, "CAP", 14)
    clusters.compute(store, "gradcam", neighbours=4)  # a graph of 4 neighbours for a sample of 14 maps
    found = clusters.cluster_table(store, "gradcam")
    ds = storage.open_dataset(store)
    assert (ds.cluster.sel(xai_method="gradcam").values >= 0).sum() == len(ds.sample)  # every map has a cluster
    squares = found["square"]
    assert sum(c["size"] for c in squares) == sum(i.split("/")[-2] == "square" for i in map(str, ds.sample_id.values))
    marked = [np.mean([i.split("/")[-1].startswith(WATERMARKED) for i in c["sample_ids"]]) for c in squares]
    assert sorted(marked) == [0.0, 1.0], "each cluster all watermarked or all plain, as without the cap"
    clusters.compute(store, "gradcam", neighbours=4)
    assert clusters.cluster_table(store, "gradcam") == found  # the sample is seeded


def test_clusters_are_stored_reused_and_redone_when_asked(watermarked, capsys):
    from tasks import clusters

    clusters.ensure(watermarked, "gradcam")
    ds = xr.open_zarr(watermarked)
    assert ds.cluster.dims == ("xai_method", "sample") and ds.cluster.dtype == np.int16
    assert ds.eigengap.dims == ("xai_method", "class") and np.isfinite(ds.eigengap.sel(xai_method="gradcam")).all()
    record = storage.Store(watermarked, mode="r").cluster_params()["gradcam"]
    assert record == {**clusters.DEFAULTS, "samples": 120, "maps": 120}
    before = ds.cluster.values.copy()
    assert clusters.ensure(watermarked, "gradcam") == record  # reused: the same parameters and store
    assert main(["clusters", watermarked, "--method", "gradcam", "--clusters", "3", "--figure", "none"]) == 0
    assert "3 cluster(s)" in capsys.readouterr().out
    assert storage.Store(watermarked, mode="r").cluster_params()["gradcam"]["clusters"] == 3
    clusters.ensure(watermarked, "gradcam")  # back to the eigengap's choice
    np.testing.assert_array_equal(xr.open_zarr(watermarked).cluster.values, before)


@pytest.mark.parametrize("argv, message", [
    (["--method", "saliency"], "--method 'saliency' is not in the store; it has gradcam"),
    (["--method", "gradcam", "--class", "hexagon"], "--class hexagon is not a class of this study"),
    (["--method", "gradcam", "--size", "65"], "size must be an integer between 1 and the maps' side 64"),
    (["--method", "gradcam", "--neighbours", "0"], "neighbours must be an integer >= 1"),
])
def test_bad_cluster_arguments_say_what_is_valid(watermarked, capsys, argv, message):
    capsys.readouterr()
    assert main(["clusters", watermarked, *argv, "--figure", "none"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ---------------------------------------------------------------- the report, in a browser


def test_the_report_shows_every_image_and_its_filters_work(watermarked, tmp_path, capsys):
    assert main(["report", watermarked, "--out", str(tmp_path / "atlas")]) == 0
    page = tmp_path / "atlas" / "index.html"
    assert capsys.readouterr().out.strip() == f"report:  {page}"
    ds = xr.open_zarr(watermarked)
    classes = [str(ds["class"].values[k]) for k in ds.label.values]
    share = ds.score.sel(xai_method="gradcam", metric="region_share").values
    with chromium() as driver:
        driver.get(page.as_uri())
        assert broken_images(driver) == []
        # the input and five maps per sample (gradcam and the baselines), plus the figures
        assert len(driver.find_elements("css selector", "table.grid img")) == 120 * 5
        assert console_errors(driver) == []

        def shown():
            return len([r for r in driver.find_elements("css selector", "tr.sample") if r.is_displayed()])

        from selenium.webdriver.support.ui import Select

        assert shown() == 120
        Select(driver.find_element("id", "class")).select_by_visible_text("square")
        assert shown() == classes.count("square")
        Select(driver.find_element("id", "metric")).select_by_visible_text("region_share")
        Select(driver.find_element("id", "xai_method")).select_by_visible_text("gradcam")
        driver.find_element("id", "low").send_keys("0.2")
        expected = sum(1 for c, v in zip(classes, share) if c == "square" and np.isfinite(v) and round(v, 4) >= 0.2)
        assert 0 < shown() == expected < classes.count("square"), "the watermarked squares only"
        Select(driver.find_element("id", "class")).select_by_visible_text("all")
        Select(driver.find_element("id", "correct")).select_by_visible_text("incorrect")
        driver.find_element("id", "low").clear()
        wrong = int((ds.label.values != ds.prediction.values).sum())
        assert shown() == wrong
        assert driver.find_element("id", "count").text == f"{wrong} of 120 samples shown"
        text = driver.find_element("tag name", "body").text
        assert "SpRAy clusters of gradcam" in text and "random_map (baseline)" in text
        trust = driver.find_element("id", "trust")  # how far to trust the scores (issue 35), beside the table
        assert trust.is_displayed() and "region_share: " in trust.text and "Krippendorff's alpha" in trust.text
        assert trust.screenshot(str(tmp_path / "trust.png")) and (tmp_path / "trust.png").stat().st_size > 1000
        assert console_errors(driver) == []


# ---------------------------------------------------------------- colours


def test_signed_methods_diverge_and_scales_can_be_shared():
    from tasks.drawing.figure import heatmap_style

    positive = np.linspace(0, 1, 100).reshape(10, 10)
    assert heatmap_style("gradcam", positive).cmap == "inferno" and heatmap_style("gradcam", positive).low == 0
    for name in ("integrated_gradients", "deeplift", "contrastive_gradcam"):
        style = heatmap_style(name, positive)
        assert style.signed and style.low == -style.high, name
    assert heatmap_style("saliency", positive - 0.5).signed, "negative values diverge whatever the method"
    nan = heatmap_style("gradcam", np.full((4, 4), np.nan))
    assert (nan.low, nan.high) == (0.0, 1.0)
    hot = np.linspace(0, 1, 400).reshape(20, 20)
    hot[0, 0] = 1e6  # one hot pixel in 400 does not set the scale (the 99.5th percentile does)
    assert heatmap_style("gradcam", hot).high < 2


def test_the_figure_has_colour_bars_and_a_shared_scale(watermarked, tmp_path, monkeypatch):
    import matplotlib.figure

    from tasks.drawing.figure import render

    bars = []
    original = matplotlib.figure.Figure.colorbar
    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar",
                        lambda self, mappable, **kw: bars.append(mappable.get_clim()) or original(self, mappable, **kw))
    render(watermarked, str(tmp_path / "own.png"), [0, 1, 2], ["gradcam"])
    own = list(bars)
    bars.clear()
    render(watermarked, str(tmp_path / "shared.png"), [0, 1, 2], ["gradcam"], shared_scale=True)
    assert len(own) == len(bars) == 3, "one colour bar per map"
    assert len(set(bars)) == 1 and len(set(own)) == 3, "--shared-scale: one scale down the column"
