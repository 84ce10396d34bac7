"""Evaluation in the store: scores equal the metric on the stored maps, tasks resume after SIGKILL
bit-identically without rescoring a scored block, run the same on Dask, add only what is new, refuse
other metric parameters; the command line's table, JSON and comparisons."""
import json

import numpy as np
import pytest
import torch
import xarray as xr

import storage
import zoo
from flows.cli import main
from flows.study import study
from helpers import assert_inline_figure, killed_run, read_artifacts
from xai_methods import metrics as xmet

METRICS = ["pointing_game", "relevance_rank", "deletion", "max_sensitivity"]
ARGS = dict(samples=24, block_size=8, methods=["saliency", "gradcam"], metrics=METRICS, device="cpu",
            metric_params={"deletion": {"steps": 8}, "max_sensitivity": {"samples": 2}})
CLI = ["study", "--samples", "24", "--block-size", "8", "--methods", "saliency,gradcam", "--metrics",
       ",".join(METRICS), "--metric-param", "deletion.steps=8", "--metric-param", "max_sensitivity.samples=2",
       "--device", "cpu", "--figure", "none"]
METHODS = ["saliency", "gradcam", "random_map", "centre_map", "edge_map"]


def digest(path, var):
    return xr.open_zarr(path)[var].values.tobytes()


@pytest.fixture(scope="module")
def evaluated(prefect_api, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eval") / "eval.zarr")
    summary = study(store=path, **ARGS)
    return path, summary


def test_a_study_with_metrics_draws_the_evaluation_figures(prefect_api, tmp_path):
    summary = study(store=str(tmp_path / "f.zarr"), samples=8, block_size=8, methods=["gradcam"], device="cpu",
                    metrics=["deletion"], metric_params={"deletion": {"steps": 4}}, figure=str(tmp_path / "f.png"))
    assert summary["evaluation_figures"] == [str(tmp_path / "f.curves.png"), str(tmp_path / "f.scores.png")]
    for path in summary["evaluation_figures"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    shown = read_artifacts(["study-figure", "study-curves", "study-scores", "study-trust"])  # in the Prefect UI
    for key, path in zip(("study-figure", "study-curves", "study-scores"), [summary["figure"], *summary["evaluation_figures"]]):
        assert_inline_figure(shown[key], path)
    trust = shown["study-trust"].data  # how far to trust the scores (issue 35): one metric, so no agreement figure
    assert "deletion: " in trust and "Krippendorff's alpha" in trust and summary["agreement_figure"] is None


def test_the_study_scores_every_method_including_the_baselines(evaluated):
    path, summary = evaluated
    ds = xr.open_zarr(path)
    assert list(ds.xai_method.values) == METHODS and list(ds.metric.values) == METRICS
    assert ds.scored.values.all() and summary["scored_blocks"] == {k: 3 * len(METHODS) for k in METRICS}
    assert ds.score.dims == ("xai_method", "sample", "metric") and ds.curve.sizes["step"] == 9
    assert (ds.score_status.values >= 0).all()
    assert json.loads(ds.attrs["metric_params"])["deletion"]["steps"] == 8
    assert "method" not in json.loads(ds.attrs["metric_params"])["max_sensitivity"]


def test_stored_scores_are_the_metric_on_the_stored_maps(evaluated):
    path, _ = evaluated
    ds = xr.open_zarr(path)
    model = zoo.load_model("shapes-cnn")
    images, target = torch.from_numpy(ds.image.values[:8]), torch.from_numpy(ds.target.values[:8])
    mask = torch.from_numpy(ds["mask"].values[:8])
    for method in ("gradcam", "random_map"):
        maps = torch.from_numpy(ds.attribution.sel(xai_method=method).values[:8])
        for metric in ("pointing_game", "deletion"):
            s = xmet.measure(metric, model, images, maps, target, mask, **ARGS["metric_params"].get(metric, {}))
            np.testing.assert_array_equal(ds.score.sel(xai_method=method, metric=metric).values[:8], s.value.numpy())
        d = xmet.measure("deletion", model, images, maps, target, steps=8)
        np.testing.assert_array_equal(ds.curve.sel(xai_method=method, metric="deletion").values[:8], d.curve.numpy())
    s = xmet.measure("max_sensitivity", model, images, torch.from_numpy(ds.attribution.sel(xai_method="gradcam").values[:8]),
                     target, method="gradcam", layer=None, samples=2)
    np.testing.assert_array_equal(ds.score.sel(xai_method="gradcam", metric="max_sensitivity").values[:8], s.value.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("array, nth", [("score", 7), ("scored", 20)])
def test_sigkill_during_evaluation_resumes_bit_identically(evaluated, tmp_path, array, nth):
    reference, _ = evaluated
    store = str(tmp_path / "killed.zarr")
    killed_run(CLI, store, array, nth)
    scored_before = xr.open_zarr(store).scored.values.copy()
    assert not scored_before.all()
    summary = study(store=store, **ARGS)
    for j, metric in enumerate(METRICS):  # exactly the blocks not scored at the kill were scored
        assert summary["scored_blocks"][metric] == int((~scored_before[:, j]).sum())
    for var in ("score", "score_status", "curve", "attribution"):
        assert digest(store, var) == digest(reference, var), var


@pytest.mark.slow
def test_dask_workers_score_identically(evaluated, tmp_path):
    reference, _ = evaluated
    store = str(tmp_path / "dask.zarr")
    study(store=store, workers=2, **ARGS)
    for var in ("score", "score_status", "curve"):
        assert digest(store, var) == digest(reference, var), var


def test_evaluate_adds_only_new_metrics_and_refuses_other_parameters(evaluated, tmp_path, capsys):
    import shutil

    reference, _ = evaluated
    store = str(tmp_path / "more.zarr")
    shutil.copytree(reference, store)
    before = digest(store, "score")
    assert main(["evaluate", store, "--metrics", "sparseness,relevance_mass", "--json", "--device", "cpu"]) == 0
    means = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(means) == {"sparseness", "relevance_mass"} and set(means["sparseness"]) == set(METHODS)
    ds = xr.open_zarr(store)
    assert list(ds.metric.values) == METRICS + ["sparseness", "relevance_mass"] and ds.scored.values.all()
    old = xr.open_zarr(reference).score.values
    np.testing.assert_array_equal(ds.score.values[:, :, : len(METRICS)], old)  # nothing rescored
    assert before  # the reference is untouched
    code = main(["evaluate", store, "--metrics", "deletion", "--metric-param", "deletion.steps=4"])
    err = capsys.readouterr().err
    assert code == 2 and "parameters of deletion differ" in err and "'steps': 8" in err


def test_evaluate_on_a_store_without_metrics_creates_the_scores(prefect_api, tmp_path, capsys):
    store = str(tmp_path / "plain.zarr")
    study(store=store, samples=8, block_size=8, methods=["gradcam"], device="cpu")
    assert "score" not in xr.open_zarr(store)
    assert main(["evaluate", store, "--metrics", "pointing_game", "--plot", "none"]) == 0
    out = capsys.readouterr().out
    assert "pointing_game (higher is better" in out and "gradcam - random_map on pointing_game:" in out
    ds = xr.open_zarr(store)
    assert list(ds.xai_method.values) == ["gradcam", "random_map", "centre_map", "edge_map"]
    assert ds.scored.values.all() and "curve" not in ds


def test_score_table_and_paired_comparison(evaluated):
    path, _ = evaluated
    ds = storage.open_dataset(path)
    rows = storage.score_table(ds, by="label")
    row = next(r for r in rows if r["metric"] == "pointing_game" and r["xai_method"] == "gradcam" and r["class"] == "all")
    values = ds.score.sel(xai_method="gradcam", metric="pointing_game").values
    assert row["n"] == 24 and row["mean"] == pytest.approx(values.mean()) and row["low"] <= row["mean"] <= row["high"]
    per_class = [r for r in rows if r["metric"] == "pointing_game" and r["xai_method"] == "gradcam" and r["class"] != "all"]
    assert sum(r["n"] for r in per_class) == 24
    c = storage.compare(ds, "pointing_game", "gradcam", "random_map")
    diff = values - ds.score.sel(xai_method="random_map", metric="pointing_game").values
    assert c["difference"] == pytest.approx(diff.mean()) and c["low"] <= c["difference"] <= c["high"]
    from scipy.stats import wilcoxon

    assert c["p"] == pytest.approx(wilcoxon(diff).pvalue)
    assert storage.describe_comparison(c).startswith("gradcam - random_map on pointing_game: +")
    with pytest.raises(ValueError, match="method 'nope' is not in this study"):
        storage.compare(ds, "pointing_game", "gradcam", "nope")


def test_bad_metric_arguments_fail_before_any_store(tmp_path, capsys):
    for argv, message in [
        (["--metrics", "nope"], "unknown metric(s) ['nope']"),
        (["--metrics", "deletion", "--metric-param", "deletion.steps=0"], "metric deletion: steps must be a positive int"),
        (["--metrics", "region_share"], "metric region_share: region must be a box"),
        (["--metrics", "deletion", "--metric-param", "pointing_game.tolerance=3"], "not among the metrics"),
        (["--metrics", "max_sensitivity", "--metric-param", "max_sensitivity.method=gradcam"], "the study's own"),
    ]:
        store = tmp_path / "never.zarr"
        assert main(["study", "--store", str(store), *argv]) == 2
        assert message in capsys.readouterr().err
        assert not store.exists()


def test_curve_metrics_added_later_grow_the_curves(prefect_api, tmp_path, capsys):
    """A store scored without curves gains `curve`; a longer curve later grows `step`, older curves NaN past their end."""
    store = str(tmp_path / "grow.zarr")
    study(store=store, samples=8, block_size=8, methods=["gradcam"], device="cpu", metrics=["pointing_game"])
    for metric, steps in (("deletion", 4), ("insertion", 8)):
        assert main(["evaluate", store, "--metrics", metric, "--metric-param", f"{metric}.steps={steps}",
                     "--json"]) == 0
    capsys.readouterr()
    ds = xr.open_zarr(store)
    assert list(ds.metric.values) == ["pointing_game", "deletion", "insertion"] and ds.sizes["step"] == 9
    assert np.isnan(ds.curve.sel(metric="deletion").values[..., 5:]).all()
    assert np.isfinite(ds.curve.sel(metric="deletion").values[..., :5]).all()
    assert np.isfinite(ds.curve.sel(metric="insertion").values).all() and ds.scored.values.all()


def test_past_the_bootstrap_limit_the_interval_is_the_normal_one_and_agrees_with_the_bootstrap():
    """Issue 34: a million scores cannot be resampled a thousand times per row; past `BOOTSTRAP_MAX` the interval is
    mean +- z s / sqrt(n), which the percentile bootstrap matches there within its own resampling error (skewed
    scores, as deletion's are)."""
    from statistics import NormalDist

    from storage.scores import BOOTSTRAP_MAX, interval

    v = np.random.default_rng(0).exponential(size=BOOTSTRAP_MAX + 1)
    low, high = interval(v)
    half = NormalDist().inv_cdf(0.975) * v.std(ddof=1) / np.sqrt(len(v))
    assert (low, high) == pytest.approx((v.mean() - half, v.mean() + half), rel=1e-12)
    boot_low, boot_high = interval(v[:BOOTSTRAP_MAX])  # the last size still bootstrapped
    ref = v[:BOOTSTRAP_MAX].mean()
    assert abs(boot_low - (ref - half)) < 0.1 * half and abs(boot_high - (ref + half)) < 0.1 * half
