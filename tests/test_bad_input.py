"""The bad-input corpus: every case ends with a line that names the problem and what would be valid,
a non-zero exit, no traceback, and the existing store byte-identical afterwards (every file hashed
before and after). docs/reliability.md lists the cases."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import storage
import xai_methods as xm
import zoo
from flows.cli import main
from helpers import export_shapes


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ctx(prefect_api, tmp_path_factory):
    """An existing study store, and the files the cases name."""
    from flows.study import study

    root = tmp_path_factory.mktemp("bad")
    store = root / "existing.zarr"
    study(samples=8, block_size=4, store=str(store), methods=["saliency"], device="cpu")
    (root / "afile").write_text("not a store")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("someone's files")
    protocol, _ = storage.ResultStore.open_or_create(str(root / "protocol.zarr"), "sanity", {"model": "x"},
                                                     {"unit": [0]}, [storage.Part("p", ("unit",), {})])
    export_shapes(root / "images", 8)
    shapes_weights = Path(zoo.__file__).parent / "weights" / "shapes_cnn.pt"
    torch.save({"epoch": 3, "model": torch.load(shapes_weights, weights_only=True)}, root / "checkpoint.pt")
    torch.save([1, 2, 3], root / "list.pt")
    torch.save(torch.nn.Linear(2, 2), root / "pickled.pt")
    (root / "outside.png").write_bytes((root / "images" / "circle" / next(
        p.name for p in (root / "images" / "circle").iterdir())).read_bytes())
    linked = root / "linked"
    shutil.copytree(root / "images", linked)
    (linked / "circle" / "escape.png").symlink_to(root / "outside.png")
    (root / "unreadable" / "circle").mkdir(parents=True)
    (root / "unreadable" / "circle" / "a.png").write_bytes(b"")
    (root / "flat").mkdir()
    (root / "flat" / "a.png").write_bytes((root / "outside.png").read_bytes())
    shutil.copy(shapes_weights, root / "carded.pt")  # a model card whose mean and std have two values
    (root / "carded.json").write_text(json.dumps({"mean": [0.5, 0.5], "std": [0.25, 0.25]}))
    first = sorted((root / "images" / "circle").iterdir())[0].name
    (root / "boxes.csv").write_text(f"file,y0,x0,y1,x1\ncircle/{first},80,80,90,90\ncircle/gone.png,0,0,8,8\n")
    for name, damage in STATES.items():  # copies of the store in the states a command can leave it in
        shutil.copytree(store, root / name)
        damage(root / name)
    return {"root": root, "store": store, "weights": shapes_weights}


def _unfinished(path: Path) -> None:
    import zarr

    zarr.open_group(str(path), mode="r+", use_consolidated=False).attrs["created"] = False


def _not_ingested(path: Path) -> None:
    import zarr

    g = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    g["ingested"][:], g["done"][:] = False, False


# (store copy, how it is left): a creation killed before the layout was whole, no block read yet, metadata
# files truncated (the root's and one array's)
STATES = {"unfinished.zarr": _unfinished, "not-ingested.zarr": _not_ingested,
          "damaged.zarr": lambda p: (p / "zarr.json").write_text("{\n"),
          "damaged-array.zarr": lambda p: (p / "done" / "zarr.json").write_text("")}


def new(ctx, name="new.zarr") -> str:
    return str(ctx["root"] / name)


S = ["study", "--samples", "8", "--block-size", "4", "--methods", "saliency", "--figure", "none"]

# (id, argv from ctx, what the line must say); `{store}` is the existing store, `{root}` the folder.
CASES = [
    ("store-is-a-file", S + ["--store", "{root}/afile"], "is a file, not a Zarr store"),
    ("store-is-a-foreign-folder", S + ["--store", "{root}/foreign"], "is a folder with other content"),
    ("store-is-a-protocol-store", S + ["--store", "{root}/protocol.zarr"], "holds the sanity protocol's store"),
    ("protocol-on-a-study-store", ["sanity", "--methods", "saliency", "--store", "{store}"], "holds a study store"),
    ("resume-with-another-dataset", S + ["--store", "{store}", "--dataset", "{root}/images"],
     "the store was made from dataset 'shapes' and this run names dataset"),
    ("resume-with-another-block-size", ["study", "--samples", "8", "--block-size", "2", "--methods", "saliency",
                                        "--store", "{store}"], "Use --block-size 4"),
    ("resume-with-other-parameters", S + ["--store", "{store}", "--param", "saliency.reduce=abs_sum"],
     "parameters of saliency differ"),
    ("resume-with-another-contrast", S + ["--store", "{store}", "--contrast", "square"],
     "Use --contrast runner-up"),
    ("unknown-method", S[:-4] + ["--methods", "saliency,nope", "--store", "{store}"], "unknown method(s) ['nope']"),
    ("unknown-metric", S + ["--metrics", "accuracy", "--store", "{store}"], "unknown metric(s) ['accuracy']"),
    ("bad-metric-param", S + ["--metrics", "deletion", "--metric-param", "deletion.steps=0", "--store", "{store}"],
     "steps"),
    ("metric-needs-masks", S + ["--dataset", "{root}/images", "--metrics", "pointing_game", "--store", "{new}"],
     "needs ground-truth masks"),
    ("contrast-out-of-range", S + ["--methods", "contrastive_gradcam", "--contrast", "9", "--store", "{new}"],
     "--contrast '9' is not a class of the model; valid: runner-up, circle"),
    ("unknown-layer", S + ["--methods", "gradcam", "--layer", "stage9", "--store", "{new}"], "stage9"),
    ("zero-samples", S + ["--samples", "0", "--store", "{new}"], "--samples must be >= 1"),
    ("zero-block-size", S + ["--block-size", "0", "--store", "{new}"], "--block-size must be >= 1"),
    ("unknown-device", S + ["--device", "tpu", "--store", "{new}"], "--device must be cpu, cuda"),
    ("zero-workers", S + ["--workers", "0", "--store", "{new}"], "workers must be >= 1"),
    ("unknown-model", S + ["--model", "no-such-net", "--store", "{new}"], "shapes-cnn"),
    ("torchvision-without-weights", S + ["--model", "resnet18", "--store", "{new}"], "--weights"),
    ("missing-weights", S + ["--weights", "{root}/none.pt", "--store", "{new}"], "does not exist"),
    ("state-dict-of-another-architecture", S + ["--model", "resnet18", "--weights", "{weights}", "--store", "{new}"],
     "does not fit architecture 'resnet18'; missing keys"),
    ("checkpoint-not-a-state-dict", S + ["--weights", "{root}/checkpoint.pt", "--store", "{new}"],
     "non-tensor entries"),
    ("a-list-not-a-state-dict", S + ["--weights", "{root}/list.pt", "--store", "{new}"], "holds a list"),
    ("pickled-full-model", S + ["--weights", "{root}/pickled.pt", "--store", "{new}"], "not a plain state dict"),
    ("symlink-out-of-the-dataset", S + ["--dataset", "{root}/linked", "--store", "{new}"],
     "is a symbolic link to"),
    ("no-readable-image", S + ["--dataset", "{root}/unreadable", "--store", "{new}"], "has no readable images"),
    ("no-class-folders", S + ["--dataset", "{root}/flat", "--store", "{new}"], "has no class sub-folders"),
    ("status-of-a-foreign-folder", ["status", "{root}/foreign"],
     "is a folder with other content, not a Zarr store; give the path of a study store"),
    ("evaluate-a-file", ["evaluate", "{root}/afile", "--metrics", "deletion"], "is a file, not a Zarr store"),
    ("figure-of-a-missing-store", ["figure", "{root}/none.zarr"], "no study store"),
    ("figure-sample-out-of-range", ["figure", "{store}", "--samples", "99", "--out", "{root}/f.png"], "99"),
    # every command on every store state: each names the state and what to run
    ("status-of-an-unfinished-creation", ["status", "{root}/unfinished.zarr"],
     "was interrupted while it was being created (killed before its layout was complete; nothing was computed in "
     "it): rerun the `saliency-atlas study` command"),
    ("evaluate-an-unfinished-creation", ["evaluate", "{root}/unfinished.zarr", "--metrics", "sparseness"],
     "interrupted while it was being created"),
    ("report-of-an-unfinished-creation", ["report", "{root}/unfinished.zarr", "--out", "{root}/r"],
     "interrupted while it was being created"),
    ("report-before-any-block-is-ingested", ["report", "{root}/not-ingested.zarr", "--out", "{root}/r"],
     "has no ingested samples yet"),
    ("clusters-before-any-map", ["clusters", "{root}/not-ingested.zarr", "--method", "saliency"],
     "saliency has no finished maps in this store yet"),
    ("status-of-a-damaged-root-metadata-file", ["status", "{root}/damaged.zarr"],
     "damaged.zarr/zarr.json' is damaged (Expecting"),
    ("study-on-a-damaged-root-metadata-file", S + ["--store", "{root}/damaged.zarr"], "damaged.zarr/zarr.json' is damaged"),
    ("status-of-a-damaged-array-metadata-file", ["status", "{root}/damaged-array.zarr"],
     "damaged-array.zarr/done/zarr.json' is damaged"),
    ("evaluate-of-a-protocol-store", ["evaluate", "{root}/protocol.zarr", "--metrics", "sparseness"],
     "holds the sanity protocol's store, not a study store"),
    # every argument checked before the first write
    ("compare-names-a-method-not-in-the-study", ["evaluate", "{store}", "--metrics", "sparseness", "--compare",
                                                 "saliency:nosuch"], "--compare names nosuch, not among the store's"),
    ("clusters-of-a-class-not-in-the-study", ["clusters", "{store}", "--method", "saliency", "--class", "nosuch"],
     "--class nosuch is not a class of this study"),
    ("evaluate-with-zero-workers", ["evaluate", "{store}", "--metrics", "sparseness", "--workers", "0"],
     "workers must be >= 1"),
    ("report-with-a-protocol-that-is-not-one", ["report", "{store}", "--out", "{root}/r", "--protocol", "{root}/afile"],
     "is not a protocol store"),
    # a user's values checked against the model before any pass
    ("model-card-mean-of-two-values-for-three-channels", S + ["--weights", "{root}/carded.pt", "--store", "{new}"],
     "carded.json' gives mean [0.5, 0.5] and std [0.25, 0.25]: 2 channel(s), but model 'shapes-cnn' takes 3 input"),
    ("mean-of-two-values-for-three-channels", S + ["--mean", "0.5,0.5", "--std", "0.2,0.2", "--store", "{new}"],
     "--mean/--std gives mean [0.5, 0.5]"),
    # data problems said, and refused with --strict
    ("boxes-outside-their-image-with-strict", S + ["--dataset", "{root}/images", "--masks", "{root}/boxes.csv",
                                                   "--strict", "--store", "{new}"],
     "1 row(s) name files that are not readable images of the dataset: circle/gone.png (line 3)"),
    ("occlusion-window-too-large", S + ["--methods", "occlusion", "--param", "occlusion.window=1000",
                                        "--store", "{new}"], "window"),
]


def fill(argv: list[str], ctx) -> list[str]:
    names = {"store": str(ctx["store"]), "root": str(ctx["root"]), "new": new(ctx), "weights": str(ctx["weights"])}
    return [a.format(**names) for a in argv]


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # what earlier runs printed is not this command's
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0, out
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saliency-atlas: error: "), err
    return lines[0]


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_loses_nothing(ctx, capsys, case, argv, expected):
    stores = [ctx["store"], *(ctx["root"] / name for name in STATES)]
    before = [tree_digest(p) for p in stores]
    line = one_line_error(capsys, fill(argv, ctx))
    assert expected in line, line
    assert [tree_digest(p) for p in stores] == before, "an existing store changed"
    assert not Path(new(ctx)).exists(), "nothing is written for a bad argument"
    assert not (ctx["root"] / "r").exists(), "no report is written for a bad argument"


def bad_value(method: str) -> tuple[str, object] | None:
    """A value of one of `method`'s parameters that its checks refuse."""
    model = zoo.load_model("shapes-cnn")
    for name in xm.spec(method).defaults:
        if name in ("report", "progress"):
            continue
        for value in ("nonsense", -5, 0, 10**6, [1, 2]):
            try:
                xm.check(method, model, (64, 64), None, **{name: value})
            except (ValueError, TypeError):
                return name, value
    return None


@pytest.mark.parametrize("method", [m for m in xm.available() if bad_value(m)])
def test_a_bad_parameter_of_every_method_is_caught_before_any_store_exists(ctx, capsys, method):
    name, value = bad_value(method)
    argv = ["study", "--samples", "4", "--methods", method, "--param", f"{method}.{name}={json.dumps(value)}",
            "--store", new(ctx), "--figure", "none"]
    line = one_line_error(capsys, argv)
    assert name in line, line
    assert not Path(new(ctx)).exists()


def test_a_model_whose_output_is_not_batch_by_classes_is_refused(ctx, capsys, monkeypatch):
    import tasks.loading as ts

    class Dense(torch.nn.Module):  # a segmentation-style output: (B, classes, H, W)
        preprocess, classes, arch = zoo.load_model("shapes-cnn").preprocess, None, "dense"

        def forward(self, x):
            return x[:, :2]

    monkeypatch.setattr(ts, "load_model", lambda *a: Dense())
    line = one_line_error(capsys, S + ["--store", new(ctx)])
    assert "returns shape (2, 2, 64, 64) for a batch of 2; a classifier must return a (batch, classes)" in line


def test_a_full_disk_is_one_line_and_keeps_every_finished_block(ctx, capsys, monkeypatch, tmp_path):
    import errno

    from zarr.storage import LocalStore

    store = tmp_path / "full.zarr"
    shutil.copytree(ctx["store"], store)
    before = tree_digest(store)

    async def full(self, key, value, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.root) / key))

    monkeypatch.setattr(LocalStore, "set", full)
    code = main(S[:-4] + ["--methods", "saliency,gradcam", "--store", str(store), "--figure", "none"])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("saliency-atlas: error: no space left on the device while writing") and \
        "every block finished before is kept" in last and "free space, then rerun the same command" in last, last
    monkeypatch.undo()
    assert tree_digest(store) == before
    assert storage.Store(str(store)).verify() == []


def test_an_unwritable_store_location_is_refused_before_any_work(ctx):
    """As a user without write permission: CI runs as root, so a forked child becomes `nobody` first."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="saliency-atlas-unwritable-"))
    try:
        locked = top / "locked"
        locked.mkdir()
        os.chmod(top, 0o755)
        os.chmod(locked, 0o555)
        store = str(locked / "s.zarr")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop root, run the command, report its exit status and stderr
            os.close(read)
            sys.stderr = os.fdopen(write, "w")
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                code = main(S + ["--store", store])
            except BaseException:  # noqa: BLE001 - any escape is the failure the test reports
                import traceback

                traceback.print_exc()
                code = 99
            sys.stderr.flush()
            os._exit(code)
        os.close(write)
        with os.fdopen(read) as f:
            err = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("saliency-atlas: error: --store ") and \
            "is not writable by this user (uid" in err, err
        assert not Path(store).exists()
    finally:
        os.chmod(top / "locked", 0o755)
        shutil.rmtree(top)


def test_malformed_form_values_reach_the_same_validation(ctx, capsys):
    """The Prefect UI's form fills the flow's parameters; their values meet the checks the flags meet."""
    from flows.study import study

    cases = [
        ({"samples": 0}, ["--samples", "0"], "samples must be >= 1"),
        ({"params": {"occlusion": {"window": 0}}, "methods": ["occlusion"]},
         ["--methods", "occlusion", "--param", "occlusion.window=0"], "window must be a positive int"),
        ({"contrast": "hexagon"}, ["--contrast", "hexagon"], "is not a class of the model"),
    ]
    for _, flag_args, expected in cases:  # first the flags (a failed flow's logs arrive later, on stderr)
        assert expected in one_line_error(capsys, S + flag_args + ["--store", new(ctx, "form.zarr")])
    for options, _, expected in cases:
        with pytest.raises(ValueError, match=expected):
            study(store=new(ctx, "form.zarr"), device="cpu", **options)
        assert not Path(new(ctx, "form.zarr")).exists()


def test_odd_image_files_are_converted_or_skipped_and_named(ctx, prefect_api, tmp_path, capsys):
    """RGBA, 16-bit and grayscale images are converted and studied; an empty file, a text file and an
    image over PIL's decompression-bomb limit are skipped and named; the rest is studied."""
    root = export_shapes(tmp_path / "odd", 4)
    cls = root / zoo.shapes.CLASSES[0]
    cls.mkdir(exist_ok=True)
    Image.new("RGBA", (40, 30), (200, 10, 10, 128)).save(cls / "rgba.png")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(cls / "deep.png")
    Image.new("L", (64, 64), 90).save(cls / "gray.png")
    (cls / "empty.png").write_bytes(b"")
    (cls / "notes.png").write_text("not an image")
    Image.new("1", (15000, 12500)).save(cls / "huge.png")  # 187.5 M pixels: over PIL's 2 x 89 M limit
    os.mkfifo(cls / "pipe.png")  # reading a named pipe would wait forever
    (cls / "dangling.png").symlink_to(cls / "gone.png")
    (cls / "loop-a.png").symlink_to(cls / "loop-b.png")
    (cls / "loop-b.png").symlink_to(cls / "loop-a.png")
    (cls / "nested").mkdir()
    store = str(tmp_path / "odd.zarr")
    assert main(["study", "--dataset", str(root), "--samples", "all", "--block-size", "4", "--methods",
                 "saliency", "--store", store, "--figure", "none"]) == 0
    out = capsys.readouterr().out
    ids = list(storage.open_dataset(store).sample_id.values)
    for name in ("rgba.png", "deep.png", "gray.png"):
        assert any(i.endswith(name) for i in ids), name
    skipped = next(line for line in out.splitlines() if line.startswith("skipped 8 unreadable file(s)"))
    for name in ("empty.png", "notes.png", "huge.png (DecompressionBombError", "pipe.png (a named pipe, not an image",
                 "dangling.png (a symbolic link that leads nowhere or in a loop", "loop-a.png (a symbolic link",
                 "loop-b.png (a symbolic link", "nested (a folder (images are read one level deep"):
        assert name in skipped, skipped
    assert len(ids) == 4 + 3


def test_boxes_outside_their_image_or_naming_missing_files_are_said_and_counted(ctx, prefect_api, capsys):
    """Not silently empty masks: the study warns with the rows (before any work), and status counts the samples
    whose mask is empty."""
    store = new(ctx, "boxes.zarr")
    assert main(S + ["--dataset", str(ctx["root"] / "images"), "--masks", str(ctx["root"] / "boxes.csv"),
                     "--store", store]) == 0
    out = capsys.readouterr().out
    warnings_ = [line for line in out.splitlines() if line.startswith("warning: boxes file")]
    assert len(warnings_) == 2, out
    assert "1 row(s) name files that are not readable images of the dataset: circle/gone.png (line 3)" in warnings_[0]
    assert "1 row(s) have boxes outside their image" in warnings_[1] and "(line 2: [80.0, 80.0, 90.0, 90.0] in a " \
        "64x64 image)" in warnings_[1]
    assert out.index("warning: boxes file") < out.index("store:")  # said before the work
    assert main(["status", store]) == 0
    assert "empty mask" not in capsys.readouterr().out  # status reads flags only: masks are counted by --verify
    assert main(["status", store, "--verify"]) == 0
    assert "masks    8 of the ingested samples have an empty mask" in capsys.readouterr().out


def test_a_store_url_whose_backend_is_missing_is_one_line(capsys):
    """`gcs://` needs gcsfs, which the project does not install: fsspec's ImportError becomes the one line."""
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here: the URL would be tried for real")
    line = one_line_error(capsys, ["status", "gcs://bucket/study.zarr"])
    assert "install gcsfs" in line and "fsspec backend is not installed here" in line, line
