"""Unattended audits: failures recorded as failures, the methods' assumptions checked, and
the package working under every install mode. The bad-input corpus and the fault injections
are in test_bad_input.py and test_faults.py."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import storage
import xai_methods as xm
from xai_methods import metrics as xmet


# --------------------------------------------------------------------------- failure codes


def test_failure_codes_name_each_case_and_the_first_that_applies():
    maps = torch.rand(5, 4, 4)
    maps[1, 0, 0] = float("nan")
    maps[2] = 0.0  # nothing found
    maps[3, 2, 1] = float("inf")
    logits = torch.zeros(5, 3)
    logits[4, 1] = float("nan")
    success = torch.tensor([True, True, True, False, True])
    codes = xm.failures(maps, logits=logits, success=success)
    F = xm.failures.__globals__
    assert codes.tolist() == [F["OK"], F["NOT_FINITE_MAP"], F["CONSTANT_MAP"], F["NO_SUCCESS"], F["NOT_FINITE_OUTPUT"]]
    assert set(xm.FAILURES) == set(range(5)) and xm.FAILURES[0] == "ok"
    cleaned = xm.without_failures(maps, codes)
    assert torch.isnan(cleaned[1:]).all() and torch.equal(cleaned[0], maps[0])
    assert xm.failures(torch.ones(2, 3, 3)).tolist() == [F["CONSTANT_MAP"]] * 2  # constant, not only zero
    assert xm.failures(torch.rand(2, 3, 3, 3)).tolist() == [0, 0]  # any trailing shape


def dead_relu_model() -> nn.Module:
    """Every ReLU is dead at and near the all-black input: CEM's pertinent positive never leaves its start."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-0.5)
    return model


def test_cem_pp_that_finds_nothing_is_a_failure_not_a_zero_map():
    model, x = dead_relu_model(), torch.rand(2, 3, 16, 16) * 2
    report: dict = {}
    maps = xm.attribute("cem_pp", model, x, report=report.update, steps=50)
    assert float(maps.abs().max()) == 0.0  # what a study used to store as the answer
    codes = xm.failures(maps, success=report["success"])
    assert (codes > 0).all(), codes


# --------------------------------------------------------------------------- assumptions


class SideReader(nn.Module):
    """Class 0 reads a window on the left minus its mirror image on the right (a shortcut on one side of
    the image, as a watermark): the model is not mirror-invariant. `symmetric`: left plus right, so it is."""

    def __init__(self, symmetric: bool = False) -> None:
        super().__init__()
        self.sign = 1.0 if symmetric else -1.0
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 3)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)[:, 0]
        z = 10 * (a[:, 24:40, 4:20].mean((1, 2)) + self.sign * a[:, 24:40, 44:60].mean((1, 2)))
        return torch.stack([z, torch.full_like(z, 2.0)], 1)


def side_images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 0.2
    x[:, :, 24:40, 4:20] = 1.0
    evidence = torch.zeros(64, 64, dtype=torch.bool)
    evidence[24:40, 4:20] = True
    return x, evidence


def on_evidence(maps: torch.Tensor, evidence: torch.Tensor, k: int = 64) -> list[int]:
    return [int(evidence.flatten()[i].sum()) for i in maps.flatten(1).topk(k).indices]


def test_extremal_jitter_is_turned_off_where_the_model_is_not_mirror_invariant(monkeypatch):
    """Jitter mirrors the image every other step. On a one-sided model it finds nothing (0 of the 64 top
    pixels on the evidence, forced on below); checked on the images at hand, it is turned off with a
    warning and the evidence is found."""
    import xai_methods.perturbation_opt as po

    model, (x, evidence) = SideReader(), side_images()
    kw = dict(target=0, area=0.0625, steps=200)
    with pytest.warns(UserWarning, match="assumes a mirror-invariant model, but on 2 of 2 images.*jitter is off"):
        checked = xm.attribute("extremal_perturbation", model, x, **kw)
    assert min(on_evidence(checked, evidence)) >= 48
    torch.testing.assert_close(checked, xm.attribute("extremal_perturbation", model, x, jitter=False, **kw),
                               rtol=0, atol=0)
    monkeypatch.setattr(po, "mirror_stable", lambda model, x, t, logits, ib: torch.ones(len(t), dtype=torch.bool))
    forced = xm.attribute("extremal_perturbation", model, x, **kw)
    assert max(on_evidence(forced, evidence)) <= 8  # the silent failure the check prevents


def test_extremal_jitter_stays_on_for_a_mirror_invariant_model():
    import xai_methods.perturbation_opt as po

    model, (x, _) = SideReader(symmetric=True), side_images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xm.attribute("extremal_perturbation", model, x, target=0, area=0.0625, steps=20)
    t = torch.zeros(2, dtype=torch.long)
    assert po.mirror_stable(model, x, t, model(x), 16).tolist() == [True, True]
    half = torch.cat([x[:1], x[1:].flip(3)])  # for the one-sided model: its evidence on the other side
    with pytest.warns(UserWarning, match="on 2 of 2 images the target's probability changes.*jitter is off"):
        assert po.mirror_stable(SideReader(), half, t, SideReader()(half), 16) is None


def test_cam_without_a_gap_head_is_refused_before_any_work():
    max_pooled = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                               nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match="CAM needs a global-average-pooling \\+ linear head.*use 'gradcam'"):
        xm.check("cam", max_pooled, (16, 16), "1")
    gap = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    state = torch.random.get_rng_state()
    gap.train()
    xm.check("cam", gap, (16, 16), "1")
    assert gap.training and torch.equal(torch.random.get_rng_state(), state)  # the probe leaves both alone


# --------------------------------------------------------------------------- failures in a study


def test_a_study_records_failed_maps_and_every_reader_leaves_them_out(prefect_api, tmp_path, monkeypatch, capsys):
    """Sample 0 of each block gets a NaN map and sample 1 an all-zero one: both are stored as failures
    (NaN map, a code), counted by `status` and the audit's table, and never scored."""
    from flows.cli import main
    from flows.study import study
    from tasks.audit.rows import audit_rows, true_classes

    real = xm.attribute_many

    def flaky(methods, model, images, **kw):
        maps = real(methods, model, images, **kw)
        if "saliency" in maps:
            maps["saliency"][0], maps["saliency"][1] = float("nan"), 0.0
        return maps

    monkeypatch.setattr(xm, "attribute_many", flaky)
    path = str(tmp_path / "failing.zarr")
    study(samples=8, block_size=4, store=path, methods=["saliency", "gradcam"], metrics=["pointing_game"],
          baselines=False, device="cpu")
    ds = storage.open_dataset(path)
    failure = ds.failure.sel(xai_method="saliency").values
    F = xm.failures.__globals__
    assert failure.tolist() == [F["NOT_FINITE_MAP"], F["CONSTANT_MAP"], 0, 0] * 2
    assert (ds.failure.sel(xai_method="gradcam").values == 0).all()
    maps = ds.attribution.sel(xai_method="saliency").values
    assert np.isnan(maps[failure > 0]).all() and np.isfinite(maps[failure == 0]).all()
    scored = ds.score_status.sel(xai_method="saliency", metric="pointing_game").values
    assert (scored[failure > 0] == xmet.FAILED_MAP).all() and (scored[failure == 0] == 0).all()
    row = next(r for r in storage.score_table(ds) if r["xai_method"] == "saliency")
    assert row["n"] == 4 and row["undefined"] == {xmet.FAILED_MAP: 4}
    assert storage.Store(path).status()["failures"] == {"saliency": {F["NOT_FINITE_MAP"]: 2, F["CONSTANT_MAP"]: 2}}
    classes, correct, order = true_classes(ds)
    rows = audit_rows(ds.score.sel(metric=["pointing_game"]), classes, correct, order, ds.failure)
    assert next(r for r in rows if r["xai_method"] == "saliency" and r["class"] == "all")["maps_failed"] == 4
    assert main(["status", path]) == 0
    assert "saliency: 4 failed map(s), stored as NaN and left out of every score: 2 the map holds NaN" in \
        capsys.readouterr().out


# --------------------------------------------------------------------------- checksums


def test_status_verify_finds_damaged_chunks_and_the_next_run_recomputes_exactly_them(prefect_api, tmp_path, capsys):
    import hashlib
    import os
    from pathlib import Path

    from flows.cli import main
    from flows.study import study

    path = str(tmp_path / "v.zarr")
    options = dict(samples=12, block_size=4, store=path, methods=["saliency", "gradcam"], device="cpu")
    study(**options)
    original = storage.open_dataset(path).load()
    assert main(["status", path, "--verify"]) == 0
    assert "verified 9 finished blocks: every one matches its checksum" in capsys.readouterr().out
    chunk = Path(path, "attribution", "c", "1", "1", "0", "0")  # gradcam, block 1
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # truncated
    image = Path(path, "image", "c", "2", "0", "0", "0")  # block 2's inputs
    image.write_bytes(os.urandom(image.stat().st_size))  # overwritten by hand
    Path(path, "attribution", "c", "0", "0", "0", "0").unlink()  # saliency block 0: deleted (reads as NaN)
    assert main(["status", path, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "damaged  block 1 gradcam maps: unreadable" in out, out
    assert "damaged  block 2 inputs: unreadable" in out and "damaged  block 0 saliency maps: checksum" in out
    assert "3 of 9 finished blocks damaged and marked not done" in out
    s = storage.Store(path)
    assert s.pending() == [2] and s.pending("saliency") == [0] and s.pending("gradcam") == [1]
    summary = study(**options)
    assert summary["ingested_blocks"] == 1 and summary["computed_blocks"] == {"saliency": 1, "gradcam": 1}
    repaired = storage.open_dataset(path).load()
    for name in ("attribution", "image", "failure", "checksum", "ingested_checksum", "logits"):
        assert hashlib.sha256(repaired[name].values.tobytes()).digest() == \
            hashlib.sha256(original[name].values.tobytes()).digest(), name
    assert main(["status", path, "--verify"]) == 0


# --------------------------------------------------------------------------- security


PACKAGES = ("xai_methods", "storage", "tasks", "flows", "zoo")


def project_calls():
    """Every call in the installed packages' source, as (file, line, dotted callee, the call node)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call):
                    yield path.relative_to(root), node.lineno, ast.unparse(node.func), node


def test_nothing_handed_over_is_run():
    """No eval/exec of strings, no pickle, torch.load only with weights_only=True, YAML only with a safe
    loader, no shell: a checkpoint, a config or a form value is data, never code."""
    problems, seen = [], set()
    for path, line, name, node in project_calls():
        seen.add(name)
        keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
        bad = (name in ("eval", "exec", "compile", "pickle.load", "pickle.loads", "marshal.loads", "os.system")
               or (name == "torch.load" and keywords.get("weights_only") is not True)
               or (name == "yaml.load" and "Loader" not in ast_loader_names(node))
               or (name.startswith("subprocess.") and keywords.get("shell") is True))
        if bad:
            problems.append(f"{path}:{line} {name}")
    assert not problems, problems
    assert "torch.load" in seen  # the scan sees the checkpoint loader it checks


def ast_loader_names(node) -> str:
    import ast

    return " ".join(ast.unparse(k.value) for k in node.keywords if k.arg == "Loader" and "Safe" in ast.unparse(k.value))


def test_servers_listen_on_this_machine_only():
    from prefect.settings import PREFECT_SERVER_API_HOST

    from flows.study import task_runner

    assert PREFECT_SERVER_API_HOST.value() == "127.0.0.1"  # the temporary server and `prefect server start`
    runner = task_runner(2, None, "cpu")
    assert runner.cluster_kwargs["host"] == "127.0.0.1" and runner.cluster_kwargs["dashboard_address"] is None
