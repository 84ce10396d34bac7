"""One source of truth: the study's options defined once (flow, UI form, command line), every
method's parameters checked before a store exists, stores that survive a new parameter, the
schema table the docs show, and the dataset loaded once per process."""
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import zarr

import storage
import tasks
import zoo
from flows.cli import build_parser, main, study_spec
from test_shared_machinery import BAD

ROOT = Path(__file__).resolve().parent.parent
FAST = {"occlusion": {"window": 16, "stride": 16}}


def spec(tmp_path, **changes):
    base = dict(samples=8, block_size=4, store=str(tmp_path / "s.zarr"), methods=["saliency", "occlusion"],
                params=FAST, device="cpu")
    return tasks.StudySpec(**{**base, **changes})


@pytest.mark.parametrize("method", sorted(m for m, (name, _) in BAD.items() if name))
def test_a_bad_parameter_of_every_method_fails_before_any_store(tmp_path, method):
    name, value = BAD[method]
    bad = spec(tmp_path, methods=[method], params={method: {name: value}})
    with pytest.raises((ValueError, TypeError), match=name):
        tasks.plan(bad)
    assert not (tmp_path / "s.zarr").exists()


def test_the_command_line_refuses_a_bad_parameter_in_one_line_with_no_store(tmp_path, capsys):
    store = tmp_path / "lime.zarr"
    code = main(["study", "--methods", "lime", "--param", "lime.kernel_width=-1", "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "kernel_width must be a number in (0.0" in err
    assert not store.exists()


def test_a_store_made_before_a_parameter_existed_opens_and_extends(tmp_path):
    s = spec(tmp_path)
    tasks.prepare_store.fn(s)
    group = zarr.open_group(s.store, mode="r+", use_consolidated=False)
    recorded = json.loads(group.attrs["params"])
    del recorded["occlusion"]["internal_batch"]  # as if the parameter did not exist when the store was made
    group.attrs["params"] = json.dumps(recorded)
    grown = dataclasses.replace(s, samples=12)
    out = tasks.prepare_store.fn(grown)  # a missing key means the method's default: accepted
    assert out.added["samples"] == 4 and [w.block for w in out.work["ingest"]] == [0, 1, 2]
    changed = dataclasses.replace(grown, params={"occlusion": {**FAST["occlusion"], "internal_batch": 7}})
    with pytest.raises(storage.StoreMismatch, match="parameters of occlusion differ") as err:
        tasks.plan(changed)
    assert [d.what for d in err.value.differences] == ["params"]


def test_the_flow_signature_and_form_are_the_options():
    from prefect.utilities.callables import parameter_schema

    from flows.study import study

    assert list(inspect.signature(study.fn).parameters) == list(tasks.OPTIONS)
    schema = parameter_schema(study.fn).model_dump_for_openapi()["properties"]
    assert set(schema) == set(tasks.OPTIONS)
    for name, f in tasks.OPTIONS.items():
        assert schema[name].get("description") == f.metadata["help"], name


def test_the_command_line_flags_are_the_options():
    args = build_parser().parse_args(["study"])
    parsed = study_spec(args)
    assert dataclasses.replace(parsed, figure=None) == tasks.StudySpec()
    assert parsed.figure == "runs/shapes.png"
    args = build_parser().parse_args(["study", "--no-images", "--param", "occlusion.window=8", "--methods",
                                      "occlusion", "--samples", "all", "--figure", "none"])
    parsed = study_spec(args)
    assert (parsed.keep_images, parsed.params, parsed.samples, parsed.figure) == (
        False, {"occlusion": {"window": 8}}, None, None)


def test_the_dataset_is_loaded_once_per_process(tmp_path, monkeypatch):
    calls = []
    real = zoo.load_dataset

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(zoo, "load_dataset", counting)
    tasks.loading._load_dataset.cache_clear()
    s = spec(tmp_path, keep_images=False)
    tasks.prepare_store.fn(s)
    for block in (0, 1):
        tasks.ingest_block.fn(s, block)
        tasks.attribute_block.fn(s, "saliency", block)
    assert len(calls) == 1


def test_the_docs_show_the_schema_table():
    assert storage.schema_markdown() in (ROOT / "docs" / "architecture.md").read_text()
