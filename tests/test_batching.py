"""Batching block tasks: Prefect's cost per task is measured on the first task and the units are grouped
so that it stays under 5% of the work, with progress kept and parallel workers kept busy; a batched
study stores the same bits as one task per unit."""
import pytest
import xarray as xr

from flows.study import study
from flows.sizing import MAX_TASK_SECONDS, units_per_task


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
    from prefect.task_runners import ThreadPoolTaskRunner

    sizes, submit = [], ThreadPoolTaskRunner.submit  # the block tasks, as submitted to the study's task runner

    def spied(runner, task, parameters, *args, **kwargs):
        if task is flows.study.block_units:
            sizes.append((parameters["units"][0].stage, len(parameters["units"])))
        return submit(runner, task, parameters, *args, **kwargs)

    monkeypatch.setattr(ThreadPoolTaskRunner, "submit", spied)
    four = study(store=str(tmp_path / "four.zarr"), **args)
    # per stage two measuring tasks of one unit, then the rest by four (saliency and gradcam share a unit; guided
    # backprop is its own)
    assert sizes == [("ingest", 1), ("ingest", 1), ("ingest", 4), ("attribute", 1), ("attribute", 1),
                     ("attribute", 4), ("attribute", 4), ("attribute", 2)], sizes
    assert one["computed_blocks"] == four["computed_blocks"] == {"saliency": 6, "gradcam": 6, "guided_backprop": 6}
    a, b = xr.open_zarr(tmp_path / "one.zarr"), xr.open_zarr(tmp_path / "four.zarr")
    for var in ("attribution", "image", "logits", "failure"):
        assert a[var].values.tobytes() == b[var].values.tobytes(), var


def test_io_seconds_sums_the_loading_and_writing_of_every_receipt():
    from flows.sizing import io_seconds
    from tasks.study.work import Receipt

    one = [Receipt("ingest", 0, load_seconds=0.25, write_seconds=0.5)]  # an ingest unit: one receipt
    shared = [Receipt("attribute", 0, m, load_seconds=0.125, write_seconds=0.25) for m in ("saliency", "gradcam")]
    skipped = [Receipt("ingest", 1, skipped=True)]  # finished by another run: nothing loaded or written
    assert io_seconds([one, shared, skipped]) == 0.75 + 0.75
    assert io_seconds([]) == 0


def test_a_units_loading_and_writing_count_as_a_cost_per_task(prefect_api, tmp_path, monkeypatch):
    """A task's first load and last write overlap no compute, so they are paid once per task as Prefect's
    cost is: the measured unit's loading and writing go into the cost per task, its compute into the work."""
    import flows.study

    calls, ios, real_io, real = [], [], flows.study.io_seconds, flows.study.units_per_task
    monkeypatch.setattr(flows.study, "io_seconds", lambda results: ios.append(real_io(results)) or ios[-1])
    monkeypatch.setattr(flows.study, "units_per_task",
                        lambda overhead, work, *rest: calls.append((overhead, work)) or real(overhead, work, *rest))
    study(store=str(tmp_path / "s.zarr"), samples=24, block_size=4, methods=["saliency"], device="cpu", figure=None)
    assert len(calls) == 2 and len(ios) == 4, (calls, ios)  # per stage, two measuring tasks
    for (overhead, work), io in zip(calls, (ios[0:2], ios[2:4])):  # each stage, on its two measurements
        assert min(io) > 0 and overhead >= sum(io) / 2 and work > 0, (calls, ios)


def test_the_units_of_one_block_in_a_task_read_its_inputs_once(prefect_api, tmp_path, monkeypatch):
    """A block's shared pass and its other methods, in one task, read its stored inputs once; each unit
    still gets its own copy (the stored bits are those of one unit per task: the test above)."""
    import flows.study
    import storage

    reads, real = [], storage.Store.read_samples
    monkeypatch.setattr(storage.Store, "read_samples",
                        lambda self, block, *names: reads.append((block, names)) or real(self, block, *names))
    monkeypatch.setattr(flows.study, "units_per_task", lambda *a: 100)
    study(store=str(tmp_path / "s.zarr"), samples=8, block_size=4, methods=["saliency", "gradcam", "guided_backprop"],
          device="cpu", figure=None)
    inputs = [block for block, names in reads if "image" in names]
    # units: (saliency+gradcam, 0) and (guided_backprop, 0) measure, one task each; then block 1's two units
    # in one task, which reads block 1 once
    assert inputs == [0, 0, 1], reads


def test_last_block_hands_out_copies(prefect_api, tmp_path):
    import storage
    import torch
    from tasks.study import LastBlock, StudySpec, model_of

    store = str(tmp_path / "s.zarr")
    study(store=store, samples=4, block_size=4, methods=["saliency"], device="cpu", figure=None)
    spec, last = StudySpec(store=store, samples=4, block_size=4, methods=["saliency"]), LastBlock()
    s = storage.Store(store, mode="r")
    (a, sa), (b, sb) = (last.inputs(spec, s, 0, model_of(spec, "cpu"), "cpu") for _ in range(2))
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    a.zero_()
    sa["target"].fill(-1)
    assert torch.equal(b, torch.from_numpy(s.read_samples(0, "image")["image"])) and (sb["target"] >= 0).all()


def test_a_task_lists_a_folder_once_however_many_units_it_holds(prefect_api, tmp_path, monkeypatch):
    """Each unit loads its samples by id, so a task lists the folder once (`listed_once`); before, each
    ingest unit listed every file twice, which made a large folder's ingestion quadratic in its size."""
    import flows.study
    import tasks.loading
    from test_resume import shapes_folder

    root = tmp_path / "data"
    shapes_folder(root, 24)
    listed, real = [], tasks.loading._listing
    monkeypatch.setattr(tasks.loading, "_listing", lambda name: listed.append(name) or real(name))
    monkeypatch.setattr(flows.study, "units_per_task", lambda *a: 100)
    counts = []
    for n in (12, 24):  # 3 blocks: the two measuring tasks and a task of one unit; 6 blocks: ... of four
        listed.clear()
        study(store=str(tmp_path / f"{n}.zarr"), dataset=str(root), samples=n, block_size=4, methods=["saliency"],
              device="cpu", figure=None)
        counts.append(listed.count(str(root)))
    assert counts[0] == counts[1], counts  # three more units in the last task, no more listings

    listed.clear()
    with tasks.loading.listed_once():
        a, b = (tasks.loading.load_dataset(str(root), None, (64, 64)) for _ in range(2))
    assert a is b and listed == [str(root)]
    shapes_folder(tmp_path / "extra", 1)  # outside the scope, a change in the folder is seen at once
    new = next((tmp_path / "extra").rglob("*.png"))
    new.rename(root / new.parent.name / "new.png")
    assert len(tasks.loading.load_dataset(str(root), None, (64, 64))) == len(a) + 1
