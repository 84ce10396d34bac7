"""The benchmark script's machinery on a tiny model (no timing thresholds: structure and arithmetic only)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def test_floor_parts_cover_every_pass_in_chunks(bench):
    parts = bench.floor_parts(fwd_images=130, bwd_images=64, chunk=64)
    assert parts == [("fwd", 64, 2), ("fwd", 2, 1), ("bwd", 64, 1)]
    assert bench.floor_parts(0, 8, 64) == [("bwd", 8, 1)]


def test_floor_times_and_extrapolates(bench):
    model = tiny_model()
    floor = bench.Floor(model, (16, 16), fwd_images=10, bwd_images=3, chunk=2, classes=5, max_chunks=2)
    assert floor.extrapolated  # 5 full forward chunks, only 2 timed
    assert floor() > 0
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the floor


def test_plan_shrinks_images_then_rounds_within_budget(bench):
    calib = bench.Calibration(fwd_s=0.01, fwd_big_s=0.01, bwd_s=0.02)
    cheap = bench.BudgetPlan(calib, (1, 1), None, n_calls=2, max_chunks=4)
    assert cheap.choose(8, 5, budget_s=60, multi=False) == (8, 5)
    costly = bench.BudgetPlan(calib, (1001, 0), 64, n_calls=2, max_chunks=4)
    images, rounds = costly.choose(8, 5, budget_s=60, multi=True)
    assert images < 8 and costly.seconds(images, rounds) <= 60
    assert costly.choose(8, 5, budget_s=0.001, multi=True) == (1, 1)  # the cheapest measurement, never none


def test_met_needs_floor_ratio_and_fastest_peer(bench):
    row = bench.Row(method="m", ours_ms=12.0, floor_ms=10.0, kind="single", peers=[("p", 20.0, "")])
    assert row.met is True
    row.peers = [("p", 11.0, ""), ("q", None, "peer fails: boom")]
    assert row.best_peer == ("p", 11.0) and row.met is False
    assert bench.Row(method="m", ours_ms=13.0, floor_ms=10.0, kind="single").met is False
    assert bench.Row(method="m", ours_ms=14.0, floor_ms=10.0, kind="fullgrad").met is True


def test_bench_method_and_table_on_a_tiny_model(bench):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = tiny_model()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top = model(images).topk(2, dim=1).indices
    calib = bench.Calibration(fwd_s=1e-3, fwd_big_s=1e-3, bwd_s=2e-3)
    rows = []
    for name in ("saliency", "gradcam", "occlusion", "no_such_method"):
        row, _ = bench.bench_method(
            name, model, images, top[:, 0], top[:, 1], repeats=2, budget_s=30, quick=True, calib=calib,
            floor_chunks=2, classes=5, log=lambda m: None,
        )
        rows.append(row)
    saliency, gradcam, occlusion, missing = rows
    assert missing.skipped == "not registered yet"
    for row in (saliency, gradcam, occlusion):
        assert row.skipped is None, row.skipped
        assert row.ours_ms > 0 and row.floor_ms > 0 and (row.images, row.rounds) == (2, 2)
        assert all(ms is not None and ms > 0 for _, ms, _ in row.peers), row.peers
        # the forward hook saw exactly the declared passes
        assert row.observed == tuple(map(float, row.passes)), (row.observed, row.passes)
    assert saliency.passes == (1, 1) and saliency.kind == "single"
    assert [label for label, _, _ in gradcam.peers] == ["captum LayerGradCam", "grad-cam GradCAM"]
    assert occlusion.params["window"] == 32 and occlusion.kind == "occlusion"
    assert all(p.requires_grad for p in model.parameters()) and not model._forward_hooks

    text = bench.render_markdown(
        rows, [], command="python benchmarks/bench_methods.py --quick", info=bench.machine_info(),
        load=(1.5, 1.0, 1.0), date="today", workload="tiny", calib=calib,
    )
    assert text.startswith("# Performance")
    assert "python benchmarks/bench_methods.py --quick" in text and "shared/noisy" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4  # header + one row per method
    assert "| gradcam | defaults | 1/1 | 2 x 2 |" in text
    assert "not registered yet" in text


def test_shapes_cnn_workload_for_generator_methods(bench):
    """`--model shapes-cnn`: the built-in model with its generator, built-in images, target top-1, contrast top-2."""
    model, images, target, contrast = bench.build_workload(4, 64, model_name="shapes-cnn")
    assert images.shape == (4, 3, 64, 64) and hasattr(model, "generative")
    with torch.no_grad():
        top = model(images).topk(2, dim=1).indices
    assert (target == top[:, 0]).all() and (contrast == top[:, 1]).all()


def test_resnet50_workload_and_the_device_flag_checked_before_any_work(bench, capsys):
    """The GPU table's workload (ResNet-50) builds; a device that is not one, or a GPU torch cannot see, is one
    line naming what is valid."""
    model, images, target, _ = bench.build_workload(1, 64, model_name="resnet50")
    assert images.shape == (1, 3, 64, 64) and model.fc.out_features == 1000 and target.shape == (1,)
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "gpu"])
    assert "--device must be cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda:0"])
        assert "torch sees no GPU here; use --device cpu" in capsys.readouterr().err


def test_timed_waits_for_the_gpu_when_one_is_in_use(bench, monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append("sync"))
    assert bench.timed(lambda: synced.append("work")) >= 0 and synced == ["sync", "work", "sync"]


def test_overhead_script_prints_a_row_per_method(capsys):
    spec = importlib.util.spec_from_file_location("bench_overhead", SCRIPT.parent / "bench_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--methods", "occlusion,rise", "--size", "32", "--batch", "2", "--repeats", "1"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[1].strip() for r in rows] == ["occlusion", "rise"]
    assert int(rows[0][3]) == 2 and int(rows[1][3]) == 4001  # one 32x32 window on 32x32 + the unperturbed pass
    assert all(float(r[5]) > 0 for r in rows)


def test_protocol_benchmark_sets_ours_and_quantus_beside_the_floor(capsys):
    spec = importlib.util.spec_from_file_location("bench_protocols", SCRIPT.parent / "bench_protocols.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.sanity(4, ["saliency"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    names = [r[1].strip() for r in rows[1:]]
    assert names == ["floor (maps only)", "ours, 4 measures", "ours, spearman only", "Quantus MPRT (spearman)"]
    assert float(rows[1][3]) == 1.0 and all(float(r[2]) > 0 for r in rows[1:])


def test_the_shared_pass_benchmark_runs_every_contestant():
    """bench_shared.py's four contestants run on a tiny model (structure only, no timing)."""
    spec = importlib.util.spec_from_file_location("bench_shared", SCRIPT.parent / "bench_shared.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, images = tiny_model(), torch.randn(2, 3, 16, 16)
    calls = module.contestants(model, images, torch.tensor([1, 3]), "3")  # the ReLU before the pooling
    assert set(calls) == {"shared", "singles", "peers", "floor"}
    for call in calls.values():
        call()
    assert module.EIGHT == ["saliency", "input_x_gradient", "cam", "gradcam", "gradcam_pp", "hirescam", "layercam",
                            "xgradcam"]
    row = module.table({"w": {"shared": 1.2, "singles": 4.0, "peers": 8.0, "floor": 1.0}}, {"w": "W"})[-1]
    assert row == "| W | 1.2 | 4.0 | 8.0 | 1.0 | 1.20x | 3.33x | 6.67x | met |"


def test_the_memory_bound_runs_each_case_in_a_fresh_process(bench):
    rows = bench.run_memory(size=32, threads=1, quick=True, log=lambda _: None, methods=["smoothgrad"])
    assert [r["internal_batch"] for r in rows] == [4, 16]
    for r in rows:
        assert "skipped" not in r, r
        assert 1 <= r["max_batch"] <= r["internal_batch"] and r["rss_growth_mb"] >= 0
