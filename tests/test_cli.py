"""The command line: help, tables, and one clear line (no traceback) for bad arguments."""
import os
import subprocess
import sys

import pytest

from flows.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_table(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    for name in ("saliency", "gradcam", "occlusion"):
        assert name in out
    assert "1 fwd + 1 bwd" in out and "perturbation" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert "captum:CLASS" in out and "package.module:function" in out  # the peers' methods, after the table
    assert rows["contrastive_gradcam"][1:4] == ["contrastive", "yes", "yes"]
    assert rows["cem_pp"][1:4] == ["contrastive", "-", "-"]


def test_the_catalogue_is_the_registries():
    """What `methods`, `metrics` and --help read without torch is what the registries hold (a method or metric
    registered without rewriting the catalogue fails here, with the command that rewrites it)."""
    import json

    from xai_methods import catalogue

    assert json.loads(catalogue.PATH.read_text()) == catalogue.build(), f"run `{catalogue.WRITE}`"
    assert catalogue.methods() == __import__("xai_methods").available()


HEAVY = ("torch", "prefect", "xarray", "zarr", "dask")


@pytest.mark.parametrize("argv", [["--help"], ["methods"], ["metrics"], ["study", "--help"], ["evaluate", "--help"],
                                  ["sanity", "--help"], ["manipulate", "--help"], ["status", "--help"]])
def test_listings_and_help_import_none_of_the_heavy_packages(argv):
    """Listings and --help answer at once at any size: none of torch, Prefect, xarray, zarr or Dask is imported
    (each takes a second or more to import), so what they print comes from the catalogue and the specs."""
    code = ("import sys\nfrom flows.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]", r.stdout[-300:]
    assert len(r.stdout.splitlines()) > 5  # it printed the listing or the help


def test_a_folder_named_storage_does_not_stand_in_for_the_package(tmp_path):
    """A Dask worker's spill folder `storage` first on sys.path: `tasks` still gets the project's package."""
    (tmp_path / "storage").mkdir()
    r = subprocess.run([sys.executable, "-c", "import tasks, storage; print(storage.Store.__name__)"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "Store", r.stderr


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["study", "--methods", "saliency,nope"], "unknown method(s) ['nope']"),
        (["study", "--methods", ","], "--methods is empty"),
        (["study", "--dataset", "imagenet-from-the-internet"], "shapes"),
        (["study", "--model", "resnet18"], "--weights"),
        (["study", "--model", "no-such-net"], "shapes-cnn"),
        (["study", "--model", "shapes-cnn", "--weights", "/nonexistent/w.pt"], "/nonexistent/w.pt"),
        (["study", "--samples", "0"], "--samples must be >= 1"),
        (["study", "--block-size", "0"], "--block-size must be >= 1"),
        (["study", "--param", "occlusion.size=3"], "unknown parameter 'size'; valid parameters: window"),
        (["study", "--param", "occlusion.window=0"], "window must be a positive int"),
        (["study", "--param", "lime.samples=3"], "not among the methods"),
        (["study", "--device", "tpu"], "--device must be"),
        (["study", "--contrast", "hexagon"], "--contrast 'hexagon' is not a class of the model; valid: runner-up, circle"),
        (["status", "/nonexistent/store.zarr"], "no study store"),
        (["figure", "/nonexistent/store.zarr"], "no study store"),
    ],
)
def test_bad_arguments_give_one_clear_line(capsys, argv, expected):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("saliency-atlas: error: "), err
    assert expected in err
    assert "Traceback" not in err


def test_a_bad_argument_in_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "study", "--methods", "gradcam",
                        "--layer", "stage9", "--samples", "4", "--store", str(tmp_path / "s.zarr")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "stage9" in r.stderr and "stage3" in r.stderr, r.stderr  # the valid layers are listed
    assert not (tmp_path / "s.zarr").exists(), "nothing is written for a bad argument"


def test_parser_errors_teach(capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "--samples", "many"])
    assert e.value.code == 2
    assert "'all'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "--param", "window=8"])
    assert "METHOD.NAME=VALUE" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "xr.open_zarr" in out


def test_study_status_figure_and_refusal(prefect_api, capsys, tmp_path):
    store = str(tmp_path / "cli.zarr")
    args = ["study", "--samples", "20", "--block-size", "10", "--store", store, "--methods", "saliency,occlusion",
            "--param", "occlusion.window=16", "--param", "occlusion.stride=16", "--device", "cpu"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert f"store:   {store}" in out and "figure:  " in out and "accuracy" in out
    assert os.path.exists(store.replace(".zarr", ".png"))

    # A finished study is not run again: no flow, no Prefect server, only the figure.
    code, out, err = run(capsys, *args)
    assert code == 0 and "is complete" in out and "figure:" in out, err

    code, out, _ = run(capsys, "status", store)
    assert code == 0 and "saliency" in out and "2/2" in out

    code, out, _ = run(capsys, "figure", store, "--samples", "0,3", "--out", str(tmp_path / "f.png"))
    assert code == 0 and os.path.exists(tmp_path / "f.png")
    code, _, err = run(capsys, "figure", store, "--samples", "0,99")
    assert code == 2 and "outside the study's 0..19" in err

    # The same store with another model is refused, naming what differs; nothing changes.
    code, _, err = run(capsys, "study", "--samples", "20", "--block-size", "10", "--store", store,
                       "--methods", "saliency", "--weights", str(tmp_path / "missing.pt"))
    assert code == 2 and "missing.pt" in err
    code, _, err = run(capsys, *args[:-4], "--param", "occlusion.window=8", "--param", "occlusion.stride=8")
    assert code == 2 and "parameters of occlusion differ" in err


def test_a_listing_piped_into_head_ends_quietly():
    """`saliency-atlas methods | head -1`: the closed pipe is not an error."""
    r = subprocess.run(f"{sys.executable} -m flows.cli methods | head -1", shell=True, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.stdout.startswith("name") and r.stderr.strip() == "", r.stderr


def test_evaluate_follows_the_stores_baseline_choice_and_says_before_adding_any(prefect_api, capsys, tmp_path):
    """Issue 34: a study scored with --no-baselines keeps its methods when evaluated again; a store never scored
    gets the baseline maps only after a line that says so, before the work."""
    scored, plain = str(tmp_path / "scored.zarr"), str(tmp_path / "plain.zarr")
    common = ["--samples", "8", "--block-size", "8", "--methods", "saliency", "--device", "cpu", "--figure", "none"]
    assert run(capsys, "study", *common, "--store", scored, "--metrics", "pointing_game", "--no-baselines")[0] == 0
    code, out, err = run(capsys, "evaluate", scored, "--metrics", "relevance_mass", "--plot", "none")
    assert code == 0 and "adding the baseline maps" not in out, err
    assert "random_map" not in run(capsys, "status", scored)[1]

    assert run(capsys, "study", *common, "--store", plain)[0] == 0
    code, out, err = run(capsys, "evaluate", plain, "--metrics", "pointing_game", "--plot", "none")
    assert code == 0, err
    said = out.index("adding the baseline maps random_map, centre_map, edge_map")
    assert said < out.index("pointing_game (higher is better")  # before the scores, which come after the work
    assert "random_map" in out[said + 60:]


def test_dry_run_sizes_a_study_and_writes_nothing(capsys, tmp_path):
    """Issue 34: the passes (from the registries' cost lines) and the bytes before compression of a study, so a
    user can size a million-image run; nothing is written."""
    import xai_methods as xm

    store = tmp_path / "big.zarr"
    code, out, err = run(capsys, "study", "--samples", "1000", "--block-size", "100", "--methods", "saliency,occlusion",
                         "--metrics", "pointing_game", "--no-baselines", "--store", str(store), "--device", "cpu",
                         "--dry-run")
    assert code == 0, err
    occlusion = xm.spec("occlusion").passes((64, 64))[0]  # forward passes per image with its defaults
    assert f"1,000 samples at 64x64: {1000 + 1000 + 1000 * occlusion:,} forward and 1,000 backward" in out
    assert "  saliency: 1,000 fwd + 1,000 bwd" in out and f"  occlusion: {1000 * occlusion:,} fwd + 0 bwd" in out
    assert "scored by pointing_game: no model pass" in out
    assert f"attribution {2 * 1000 * 64 * 64 * 4 / 1e6:.1f} MB" in out and "would be created" in out
    assert not store.exists()
