"""Contrastive methods in studies: --contrast, the store's `contrast` variable, refusal, figure titles
(a bad --contrast is in test_cli)."""
import numpy as np
import pytest
import torch
import xarray as xr

import storage
import xai_methods as xm
import zoo
from flows.study import study
from tasks import StudySpec, figure

METHODS = ["contrastive_gradcam", "cem_pn", "cdeepex"]
FAST = {"cem_pn": {"steps": 15, "c_steps": 1}, "cdeepex": {"steps": 20}}
SQUARE = zoo.shapes.CLASSES.index("square")


@pytest.fixture(scope="module")
def why_not_square(prefect_api, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("contrast") / "study.zarr")
    summary = study(samples=16, store=path, block_size=8, methods=METHODS, params=FAST, device="cpu",
                    contrast="square", figure=None)
    return path, summary


def test_the_contrast_is_stored_per_sample(why_not_square):
    path, _ = why_not_square
    ds = xr.open_zarr(path)
    assert ds.attrs["contrast"] == "square" and ds.done.values.all()
    target, contrast, logits = ds.target.values, ds.contrast.values, ds.logits.values
    assert (contrast != target).all()
    squares = target == SQUARE
    assert squares.any() and (~squares).any()  # both cases occur in these 16 samples
    assert (contrast[~squares] == SQUARE).all()
    # samples predicted "square" fall back to their runner-up
    runner_up = np.where(np.arange(4) == target[:, None], -np.inf, logits).argmax(1)
    np.testing.assert_array_equal(contrast[squares], runner_up[squares])


def test_stored_maps_are_the_methods_with_the_stored_contrast(why_not_square):
    path, _ = why_not_square
    ds = xr.open_zarr(path)
    model = zoo.load_model("shapes-cnn")
    images = torch.from_numpy(ds.image.values[:8])
    kwargs = dict(target=torch.from_numpy(ds.target.values[:8]), contrast=torch.from_numpy(ds.contrast.values[:8]))
    for name in ("contrastive_gradcam", "cdeepex"):
        direct = xm.attribute(name, model, images, **kwargs, **FAST.get(name, {}))
        np.testing.assert_array_equal(ds.attribution.sel(xai_method=name).values[:8], direct.numpy())


def test_another_contrast_is_refused_and_nothing_changes(why_not_square):
    path, _ = why_not_square
    before = xr.open_zarr(path).attribution.values.copy()
    with pytest.raises(storage.StoreMismatch, match="contrast differs.*'square'.*'runner-up'"):
        study(samples=16, store=path, block_size=8, methods=METHODS, params=FAST, device="cpu", figure=None)
    np.testing.assert_array_equal(xr.open_zarr(path).attribution.values, before)


def test_figure_titles_say_target_vs_contrast(why_not_square, tmp_path, monkeypatch):
    path, _ = why_not_square
    titles: list[str] = []
    original = figure.plt.Figure.savefig

    def record(fig, *args, **kwargs):
        titles.extend(ax.get_title() for ax in fig.axes)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(figure.plt.Figure, "savefig", record)
    figure.render(path, str(tmp_path / "f.png"), samples=[0, 1])
    ds = xr.open_zarr(path)
    classes = list(ds["class"].values)
    for s in (0, 1):
        expected = f"{classes[int(ds.target[s])]} vs {classes[int(ds.contrast[s])]}"
        assert sum(expected in t for t in titles) >= 3, titles


def test_contrast_class_resolution():
    from tasks.study import contrasts_of

    model = zoo.load_model("shapes-cnn")
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0], [0.0, 5.0, 4.0, 1.0]])
    target = logits.argmax(1)
    assert contrasts_of(StudySpec(), model, logits, target).tolist() == [2, 2]
    assert contrasts_of(StudySpec(contrast="square"), model, logits, target).tolist() == [SQUARE, 2]
