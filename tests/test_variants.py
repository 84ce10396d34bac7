"""A metric's parameter variants (issue 35, internal consistency): canonical names, the registry's variant specs
(a variant scores exactly as its metric with the parameter set), the meta-evaluation's internal consistency
(known answers), and `evaluate --variants` end to end: stored beside the metric, resumable, refused in one
line where a metric has none."""
import json

import numpy as np
import pytest
import torch
import xarray as xr

from helpers import images, tiny_cnn
from tasks import meta
from xai_methods import metrics as xmet
from xai_methods import variants as V


@pytest.mark.parametrize("base,params,expected", [
    ("deletion", {}, "deletion"),
    ("deletion", {"substrate": "blur", "steps": 16}, "deletion[steps=16,substrate=blur]"),
    ("road_morf", {"fractions": [0.1, 0.5]}, "road_morf[fractions=[0.1,0.5]]"),
    ("x", {"a": "true", "b": 0.0, "c": None, "d": "two words"}, 'x[a="true",b=0.0,c=null,d=two words]'),
])
def test_names_are_canonical_and_read_back(base, params, expected):
    assert V.name(base, params) == expected
    assert V.parse(expected) == (base, params)
    assert V.base(expected) == base and V.is_variant(expected) == bool(params)


@pytest.mark.parametrize("bad", ["deletion[steps=16", "[steps=16]", "deletion[steps]", "deletion[steps=1,steps=2]"])
def test_a_malformed_name_says_how_to_write_one(bad):
    with pytest.raises(ValueError, match=r"deletion\[substrate=blur\]"):
        V.parse(bad)


def test_a_variant_scores_exactly_as_its_metric_with_the_parameter_set():
    torch.manual_seed(0)
    model, x = tiny_cnn().eval(), images(3)
    maps = torch.rand(3, 16, 16)
    mask = torch.zeros(3, 16, 16, dtype=torch.bool)
    mask[:, 4:9, 4:9] = True
    for name, base, params in (("deletion[steps=4,substrate=blur]", "deletion", {"steps": 4, "substrate": "blur"}),
                               ("pointing_game[tolerance=0]", "pointing_game", {"tolerance": 0}),
                               ("road_morf[fractions=[0.2,0.6]]", "road_morf", {"fractions": [0.2, 0.6]})):
        a = xmet.measure(name, model, x, maps, 1, mask)
        b = xmet.measure(base, model, x, maps, 1, mask, **params)
        assert torch.equal(a.value, b.value) and torch.equal(a.status, b.status)
        assert (a.curve is None) == (b.curve is None) and (a.curve is None or torch.equal(a.curve, b.curve))
        s = xmet.spec(name)
        assert s.name == name and s.family == xmet.spec(base).family and dict(s.defaults).items() >= params.items()
    assert xmet.spec("deletion[steps=4]").points(xmet.spec("deletion[steps=4]").defaults) == 5
    assert xmet.check("deletion[steps=4]", (16, 16)) == 5  # its cost line reads its own parameters


@pytest.mark.parametrize("name,message", [
    ("deletion[colour=1]", "deletion has no parameter colour; valid: steps"),
    ("deletion[substrate=nope]", "substrate='nope' is not valid"),
    ("deletion[steps=0]", "steps must be a positive int"),
    ("nope[steps=1]", "unknown metric 'nope[steps=1]'"),
])
def test_a_bad_variant_is_refused_before_any_work(name, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[").replace("(", r"\(")):
        xmet.check(name, (16, 16))


def test_every_registered_variant_is_valid_and_listed_in_the_catalogue():
    from xai_methods import catalogue

    for m in xmet.available():
        for v in xmet.variants(m):
            assert V.base(v) == m and xmet.check(v, (64, 64)) >= 0
        assert catalogue.metric(m)["variants"] == xmet.variants(m)
    assert catalogue.metric("deletion[substrate=blur]")["name"] == "deletion"
    assert len(xmet.variants("deletion")) == 4 and xmet.variants("sparseness") == []


def scores(values: dict[str, np.ndarray], methods: list[str]) -> xr.Dataset:
    stacked = np.stack(list(values.values()), axis=-1).astype(np.float32)
    return xr.Dataset({"score": (("xai_method", "sample", "metric"), stacked)},
                      coords={"xai_method": methods, "metric": list(values)})


def test_internal_consistency_has_its_known_answers():
    """A variant equal to its metric: alpha 1 and tau 1; one of pure noise: alpha near 0, its tau's interval
    covering 0. The variants are not ranked as metrics of their own unless named."""
    rng = np.random.default_rng(0)
    methods = ["a", "b", "c", "d"]
    signal = rng.normal(size=(4, 400)) + np.array([3, 2, 1, 0])[:, None]
    ds = scores({"insertion": signal, "insertion[steps=16]": signal, "deletion": -signal,
                 "deletion[substrate=blur]": rng.normal(size=(4, 400))}, methods)
    r = meta.rank(ds, n_boot=200)
    assert list(r["ranking"]) == ["insertion", "deletion"] and list(r["agreement"]) == ["insertion|deletion"]
    same = r["reliability"]["insertion"]["internal"]
    assert same["alpha"] == 1.0 and same["verdict"] == "reliable here"
    assert same["variants"]["insertion[steps=16]"] == {"tau": 1.0, "low": 1.0, "high": 1.0}
    noisy = r["reliability"]["deletion"]["internal"]
    assert abs(noisy["alpha"]) < 0.05 and noisy["verdict"] == "not reliable here"
    tau = noisy["variants"]["deletion[substrate=blur]"]
    assert tau["low"] <= 0 <= tau["high"]
    assert "over its 1 parameter variants: not reliable here" in "\n".join(meta.trust(r))
    named = meta.rank(ds, ["insertion", "insertion[steps=16]"], n_boot=50)
    assert list(named["ranking"]) == ["insertion", "insertion[steps=16]"]  # named: ranked like any metric


CLI = ["--device", "cpu", "--no-baselines", "--plot", "none"]


@pytest.fixture(scope="module")
def small_study(prefect_api, tmp_path_factory):
    from flows.cli import main

    path = str(tmp_path_factory.mktemp("variants") / "v.zarr")
    assert main(["study", "--samples", "16", "--block-size", "8", "--methods", "saliency,gradcam", "--store", path,
                 "--device", "cpu", "--figure", "none"]) == 0
    return path


def test_evaluate_variants_stores_them_beside_the_metric_and_resumes(small_study, capsys):
    import storage
    from flows.cli import main

    assert main(["evaluate", small_study, "--metrics", "pointing_game", "--variants", *CLI]) == 0
    out = capsys.readouterr().out
    assert "scoring 2 parameter variants beside pointing_game: pointing_game[tolerance=0], pointing_game[tolerance=8]" in out
    assert "the parameter variants:" in out and "over its 2 parameter variants:" in out
    ds = storage.open_dataset(small_study)
    assert [str(m) for m in ds.metric.values] == ["pointing_game", "pointing_game[tolerance=0]", "pointing_game[tolerance=8]"]
    maps = torch.from_numpy(ds.attribution.sel(xai_method="gradcam").values)
    mask = torch.from_numpy(ds.mask.values.astype(bool))
    expected = xmet.evaluate("pointing_game", None, torch.zeros(len(maps), 3, *maps.shape[1:]), maps, None, mask,
                             tolerance=0)
    np.testing.assert_array_equal(ds.score.sel(xai_method="gradcam", metric="pointing_game[tolerance=0]").values,
                                  expected.numpy())
    before = ds.score.values.tobytes()
    assert main(["evaluate", small_study, "--metrics", "pointing_game", "--variants", "--json", *CLI]) == 0
    means = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(means) == {"pointing_game", "pointing_game[tolerance=0]", "pointing_game[tolerance=8]"}
    assert storage.open_dataset(small_study).score.values.tobytes() == before
    assert main(["rank", small_study, "--boot", "50"]) == 0
    ranked = capsys.readouterr().out
    assert "internal consistency over its parameter variants" in ranked and "pointing_game[tolerance=8]: tau" in ranked


def test_variants_share_the_parameters_given_to_their_metric(small_study, capsys):
    import storage
    from flows.cli import main

    assert main(["evaluate", small_study, "--metrics", "deletion", "--metric-param", "deletion.steps=4",
                 "--variants", "--json", *CLI]) == 0
    capsys.readouterr()
    params = json.loads(storage.open_dataset(small_study).attrs["metric_params"])
    assert params["deletion[substrate=blur]"]["steps"] == 4 and params["deletion[substrate=blur]"]["substrate"] == "blur"
    assert params["deletion[steps=16]"]["steps"] == 16 and params["deletion"]["steps"] == 4


@pytest.mark.parametrize("metrics,message", [
    ("relevance_mass", "--variants: none of relevance_mass has parameter variants; those that do:"),
    ("deletion[colour=1]", "deletion has no parameter colour"),
])
def test_a_bad_variant_request_is_one_line_and_leaves_the_store_as_it_was(small_study, capsys, metrics, message):
    import storage
    from flows.cli import main

    before = [str(m) for m in storage.open_dataset(small_study).get("metric", xr.DataArray([])).values]
    assert main(["evaluate", small_study, "--metrics", metrics, *(["--variants"] * (metrics == "relevance_mass")), *CLI]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    after = [str(m) for m in storage.open_dataset(small_study).get("metric", xr.DataArray([])).values]
    assert after == before
