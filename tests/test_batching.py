"""Batching block tasks: Prefect's cost per task is measured on the first task and the units are grouped
so that it stays under 5% of the work, with progress kept and parallel workers kept busy; a batched
study stores the same bits as one task per unit."""
import pytest
import xarray as xr

from flows.study import study
from tasks.study import MAX_TASK_SECONDS, units_per_task


@pytest.mark.parametrize("overhead, per_unit, remaining, workers, expected", [
    (0.07, 10.0, 50, 1, 1),    # long blocks: one per task (0.7% overhead)
    (0.07, 0.1, 50, 1, 14),    # short blocks: 0.07 / (0.05 x 0.1) = 14 per task
    (0.07, 0.001, 50, 1, 50),  # tiny blocks: all that remain
    (0.07, 0.1, 50, 2, 13),    # two workers: at most 50 / 4 per task, each keeps two tasks
    (5.0, 0.001, 10**6, 1, int(MAX_TASK_SECONDS / 0.001)),  # at most 30 s of work per task
    (-0.01, 0.1, 5, 1, 1),     # a negative measurement (clock noise) is no overhead
    (0.07, 0.1, 0, 1, 1),
])
def test_units_per_task(overhead, per_unit, remaining, workers, expected):
    assert units_per_task(overhead, per_unit, remaining, workers) == expected


def test_a_batched_study_stores_the_same_bits(prefect_api, tmp_path, monkeypatch):
    import flows.study

    args = dict(samples=24, block_size=4, methods=["saliency", "gradcam", "guided_backprop"], device="cpu", figure=None)
    monkeypatch.setattr(flows.study, "units_per_task", lambda *a: 1)  # one unit per task
    one = study(store=str(tmp_path / "one.zarr"), **args)
    monkeypatch.setattr(flows.study, "units_per_task", lambda *a: 4)
    sizes, submit = [], flows.study.block_units.submit
    monkeypatch.setattr(flows.study.block_units, "submit",
                        lambda spec, kind, units, **kw: sizes.append((kind, len(units))) or submit(spec, kind, units, **kw))
    four = study(store=str(tmp_path / "four.zarr"), **args)
    # per stage two measuring tasks of one unit, then the rest by four (saliency and gradcam share a unit; guided
    # backprop is its own)
    assert sizes == [("ingest", 1), ("ingest", 1), ("ingest", 4), ("attribute", 1), ("attribute", 1),
                     ("attribute", 4), ("attribute", 4), ("attribute", 2)], sizes
    assert one["computed_blocks"] == four["computed_blocks"] == {"saliency": 6, "gradcam": 6, "guided_backprop": 6}
    a, b = xr.open_zarr(tmp_path / "one.zarr"), xr.open_zarr(tmp_path / "four.zarr")
    for var in ("attribution", "image", "logits", "failure"):
        assert a[var].values.tobytes() == b[var].values.tobytes(), var
