"""Meta-evaluation (`tasks.meta`, `saliency-atlas rank`, issue 35): known answers (identical metrics agree
perfectly, noise is not reliable, bootstrap rank intervals cover the true rank at their rate) and agreement with
the reference implementations (krippendorff, scipy, scikit-posthocs)."""
import json

import numpy as np
import pytest
import xarray as xr

from tasks import meta

krippendorff = pytest.importorskip("krippendorff")
posthocs = pytest.importorskip("scikit_posthocs")


def scores(values: dict[str, np.ndarray], methods: list[str]) -> xr.Dataset:
    """A study's scores as `storage.open_dataset` gives them: (xai_method, sample, metric)."""
    stacked = np.stack([values[k] for k in values], axis=-1).astype(np.float32)
    return xr.Dataset({"score": (("xai_method", "sample", "metric"), stacked)},
                      coords={"xai_method": methods, "metric": list(values)})


def test_alpha_agrees_with_the_krippendorff_package():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(40, 7)) + np.arange(7)  # 40 raters of 7 units
    data[rng.random(data.shape) < 0.1] = np.nan
    for d in (data, np.round(data)):
        assert meta.krippendorff_alpha(d) == pytest.approx(
            krippendorff.alpha(reliability_data=d, level_of_measurement="interval"), abs=1e-9)


def test_tau_agrees_with_scipy_with_ties():
    from scipy.stats import kendalltau

    rng = np.random.default_rng(1)
    for _ in range(50):
        a, b = rng.integers(0, 4, 6).astype(float), rng.integers(0, 4, 6).astype(float)
        expected = kendalltau(a, b).statistic
        got = meta.tau_b(a, b)
        assert (np.isnan(expected) and np.isnan(got)) or got == pytest.approx(expected, abs=1e-12)


def test_nemenyi_agrees_with_scikit_posthocs():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 5)) + np.array([0, 0.1, 0.5, 0.55, 1.2])
    expected = posthocs.posthoc_nemenyi_friedman(x).to_numpy()
    np.testing.assert_allclose(meta.nemenyi(-x), expected, atol=1e-12)  # ours ranks the highest first: same pairs


def test_identical_metrics_agree_perfectly_and_noise_is_not_reliable():
    rng = np.random.default_rng(3)
    methods = ["a", "b", "c", "d"]
    signal = rng.normal(size=(4, 500)) + np.array([3, 2, 1, 0])[:, None]
    ds = scores({"pointing_game": signal, "relevance_mass": signal, "sparseness": rng.normal(size=(4, 500))}, methods)
    r = meta.rank(ds, n_boot=200)
    assert r["agreement"]["pointing_game|relevance_mass"] == {"tau": 1.0, "low": 1.0, "high": 1.0}
    assert r["reliability"]["pointing_game"]["family_alpha"] == 1.0
    noise = r["reliability"]["sparseness"]
    assert abs(noise["alpha"]) < 0.05 and noise["verdict"] == "not reliable here"
    assert [m for m, v in sorted(r["ranking"]["pointing_game"].items(), key=lambda kv: kv[1]["rank"])] == methods
    assert r["groups"]["pointing_game"] == [["a"], ["b"], ["c"], ["d"]]  # far apart: told apart
    assert r["consensus"]["a"]["mean_rank"] == pytest.approx((1 + 1 + r["ranking"]["sparseness"]["a"]["rank"]) / 3,
                                                             abs=1.5)


def test_rank_intervals_cover_the_true_rank_at_their_rate():
    """Methods whose true means are close: over 100 seeded studies, each 95% rank interval holds the true
    rank in at least 90% of them (the Monte Carlo error of 100 draws at 95% is about 2%)."""
    truth, methods = np.array([0.3, 0.2, 0.1, 0.0]), ["a", "b", "c", "d"]
    covered = np.zeros(4)
    for rep in range(100):
        rng = np.random.default_rng(100 + rep)
        ds = scores({"insertion": truth[:, None] + rng.normal(size=(4, 120))}, methods)
        ranking = meta.rank(ds, n_boot=200, seed=rep)["ranking"]["insertion"]
        covered += [ranking[m]["low"] <= i + 1 <= ranking[m]["high"] for i, m in enumerate(methods)]
    assert (covered / 100 >= 0.90).all(), covered


def test_groups_and_beats_random_in_the_cases_where_anchors_go_wrong():
    rng = np.random.default_rng(4)
    chance = rng.normal(size=200)
    methods = ["better", "same", "random_map"]
    ds = scores({"insertion": np.stack([chance + 1.0, chance, chance]),
                 "deletion": np.stack([chance, chance, chance])}, methods)  # lower is better: deletion is negated
    r = meta.rank(ds, n_boot=200)
    assert r["beats_random"]["insertion"] == {"better": True, "same": False, "random_map": None}
    assert r["beats_random"]["deletion"] == {"better": False, "same": False, "random_map": None}
    assert r["groups"]["deletion"] == [methods] and r["tests"]["deletion"]["p"] is None  # all tied: one group
    assert r["reliability"]["deletion"]["alpha"] is None  # every image ties every method: alpha undefined
    nan = scores({"insertion": np.full((3, 10), np.nan)}, methods)
    empty = meta.rank(nan, n_boot=10)
    assert empty["ranking"]["insertion"]["better"]["rank"] is None
    assert empty["reliability"]["insertion"]["verdict"].startswith("unknown here")


def test_orientation_follows_the_metric(monkeypatch):
    """deletion is lower-better: the method with the lowest scores ranks first."""
    ds = scores({"deletion": np.stack([np.full(30, 0.1), np.full(30, 0.5)]) + np.linspace(0, 0.01, 30)}, ["x", "y"])
    assert meta.rank(ds, n_boot=50)["ranking"]["deletion"]["x"]["rank"] == 1.0


def test_rank_command_prints_the_contract(tmp_path, capsys, monkeypatch):
    import storage
    from flows.cli import main

    rng = np.random.default_rng(5)
    ds = scores({"pointing_game": rng.random((3, 40)), "deletion": rng.random((3, 40))},
                ["gradcam", "saliency", "random_map"])
    monkeypatch.setattr(storage, "open_dataset", lambda path: ds)
    assert main(["rank", "any.zarr", "--json", "--boot", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"ranking", "groups", "consensus", "agreement", "reliability", "beats_random"}
    assert set(out["ranking"]["deletion"]["gradcam"]) >= {"rank", "low", "high", "p_first"}
    assert set(out["consensus"]["saliency"]) >= {"mean_rank", "spread"}
    assert set(out["agreement"]["pointing_game|deletion"]) >= {"tau", "low", "high"}
    assert set(out["reliability"]["deletion"]) >= {"alpha", "verdict"}
    assert main(["rank", "any.zarr", "--boot", "50"]) == 0
    text = capsys.readouterr().out
    assert "reliability: alpha" in text and "consensus over 2 metrics" in text
    assert main(["rank", "any.zarr", "--methods", "gradcam,saliency", "--json", "--boot", "20"]) == 0
    assert set(json.loads(capsys.readouterr().out)["ranking"]["deletion"]) == {"gradcam", "saliency"}
    assert main(["rank", "any.zarr", "--methods", "gradcam,lime"]) != 0
    assert "--methods names lime, not in the store" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["rank", str(tmp_path / "none.zarr")]) != 0  # no store: one line
    assert "no study store" in capsys.readouterr().err


def test_the_agreement_figure_puts_agreeing_metrics_together(tmp_path):
    from tasks.drawing.agreement import clustered, plot_agreement, tau_matrix

    rng = np.random.default_rng(6)
    base = rng.normal(size=(5, 200)) + np.arange(5)[:, None]
    ds = scores({"insertion": base, "sparseness": rng.normal(size=(5, 200)), "pointing_game": base + 0.01,
                 "relevance_mass": rng.normal(size=(5, 200)), "relevance_rank": base * 2}, list("abcde"))
    r = meta.rank(ds, n_boot=50)
    metrics, tau = tau_matrix(r)
    order = [metrics[i] for i in clustered(tau)]
    together = sorted(order.index(k) for k in ("insertion", "pointing_game", "relevance_rank"))
    assert together[-1] - together[0] == 2, order  # the three identical orderings side by side
    path = plot_agreement(r, str(tmp_path / "agreement.png"))
    assert path and (tmp_path / "agreement.png").stat().st_size > 10_000
    assert plot_agreement(meta.rank(scores({"insertion": base}, list("abcde")), n_boot=10), str(tmp_path / "x.png")) is None


def test_past_the_bootstrap_limit_the_means_are_drawn_from_their_normal_distribution(monkeypatch):
    """A million images: the draws of the means come from their joint normal distribution (one pass over the
    scores), which the bootstrap's matches past `BOOTSTRAP_MAX` images: the same spreads and correlations,
    the same rank intervals, a metric's own missing scores included."""
    from storage import scores as stored

    rng = np.random.default_rng(7)
    shared = rng.normal(size=(1, 20_000, 1))  # image difficulty: the methods' means move together
    values = shared + rng.normal(size=(4, 20_000, 2)) * np.array([1.0, 2.0]) + np.array([0, .02, .04, .06])[:, None, None]
    values[0, :50, 1] = np.nan
    o = meta.oriented(scores({"insertion": values[..., 0], "sparseness": values[..., 1]}, list("abcd")))
    normal = meta.boot_means(o, 2000, 1)
    monkeypatch.setattr(stored, "BOOTSTRAP_MAX", 10**9)
    boot = meta.boot_means(o, 2000, 1)
    np.testing.assert_allclose(normal.std(0), boot.std(0), rtol=0.1)
    np.testing.assert_allclose(np.corrcoef(normal[:, :, 0].T), np.corrcoef(boot[:, :, 0].T), atol=0.08)
    np.testing.assert_allclose(normal.mean(0), meta.means(o), atol=0.002)  # about 5 standard errors of 2000 draws
    by_normal = meta.metric_ranking(o, "insertion", normal)
    by_boot = meta.metric_ranking(o, "insertion", boot)
    for m in "abcd":
        assert abs(by_normal[m]["low"] - by_boot[m]["low"]) <= 1 and abs(by_normal[m]["high"] - by_boot[m]["high"]) <= 1


def test_group_shift_finds_a_known_shift_and_no_other():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(6)
    n = 400
    inside = np.arange(n) % 4 == 0
    base = rng.normal(size=(2, n))
    moved = base + np.array([[0.0], [0.5]]) * inside  # method b scores 0.5 higher on the group
    moved[0, 3] = np.nan  # a score left out, not counted
    ds = scores({"insertion": moved}, ["a", "b"])
    found = meta.group_shift(ds, inside, n_boot=500)["insertion"]
    assert not found["a"]["shifts"] and found["b"]["shifts"]
    assert found["b"]["low"] < 0.5 < found["b"]["high"]
    assert found["a"]["n_inside"] + found["a"]["n_outside"] == n - 1
    x, y = moved[1, inside], moved[1, ~inside]
    assert found["b"]["p"] == pytest.approx(mannwhitneyu(x, y).pvalue)
    among = np.arange(n) < 200  # the rest within the first half only
    assert meta.group_shift(ds, inside, among)["insertion"]["b"]["n_outside"] == (among & ~inside).sum()
    with pytest.raises(ValueError, match="one bool per sample"):
        meta.group_shift(ds, inside[:10])
