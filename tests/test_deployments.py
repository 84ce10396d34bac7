"""prefect.yaml: every deployment loads, its parameters validate against the flow's schema
(what the UI's form and the server check), schedules parse, and runs go to a process pool."""
import asyncio
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in CONFIG["deployments"]}
FLOW_NAMES = {"study": "study", "nightly": "dataset-audit", "sanity": "sanity", "invariance": "invariance",
              "manipulate": "manipulate", "roar": "roar", "resilience": "resilience"}  # deployment -> the flow it runs


def load_flow(entrypoint, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)  # entrypoints are relative to the project root, as for `prefect deploy`
    return load_flow_from_entrypoint(entrypoint)


def test_the_project_and_its_deployments():
    assert CONFIG["name"] == "saliency-atlas"
    assert len(DEPLOYMENTS) == len(CONFIG["deployments"]), "deployment names must be distinct"
    assert set(DEPLOYMENTS) == set(FLOW_NAMES)
    for d in DEPLOYMENTS.values():
        assert d["description"].strip() and d["entrypoint"]


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_entrypoint_resolves_and_parameters_validate(name, monkeypatch):
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    d = DEPLOYMENTS[name]
    flow = load_flow(d["entrypoint"], monkeypatch)
    assert flow.name == FLOW_NAMES[name]
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    assert set(d["parameters"]) <= set(schema["properties"]), "every parameter is one the flow takes"
    # what the server enforces on the deployment's parameters (enforce_parameter_schema) ...
    assert validate(d["parameters"], schema, raise_on_error=False) == []
    # ... and what the flow does with them when it runs: coerced to its type hints, defaults added
    validated = flow.validate_parameters(d["parameters"])
    assert set(schema.get("required", [])) <= set(validated)
    for key, value in d["parameters"].items():
        assert validated[key] == value


@pytest.mark.parametrize("name", sorted(FLOW_NAMES.values()))
def test_flow_defaults_validate_against_their_schema(name, monkeypatch):
    """The UI builds its form from the schema and pre-fills it with the defaults."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    entrypoint = next(d["entrypoint"] for n, d in DEPLOYMENTS.items() if FLOW_NAMES[n] == name)
    flow = load_flow(entrypoint, monkeypatch)
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    defaults = {k: p["default"] for k, p in schema["properties"].items() if "default" in p}
    assert validate(defaults, schema, raise_on_error=False, ignore_required=True) == []


def test_the_audit_form_explains_every_parameter(monkeypatch):
    from prefect.utilities.callables import parameter_schema

    flow = load_flow(DEPLOYMENTS["nightly"]["entrypoint"], monkeypatch)
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    assert [k for k, p in schema["properties"].items() if not p.get("description")] == []


def test_the_audit_parameters_make_sense():
    """The region lies inside the built-in model's input and the limits are shares."""
    import zoo
    from tasks.audit.rows import audit_limits, check_region

    p = DEPLOYMENTS["nightly"]["parameters"]
    size = zoo.load_model(p["model"], weights=p["weights"]).preprocess.size
    assert check_region(p["region"], size) == tuple(p["region"])
    limits = audit_limits(p.get("limits"), p["max_region_share"], p["max_outside_mask_share"])
    assert limits["region_share"] == {"max": p["max_region_share"]}
    assert p["max_region_share"] is not None, "the nightly audit checks a region"


def test_the_audit_runs_nightly():
    from prefect.client.schemas.schedules import CronSchedule

    cronsim = pytest.importorskip("cronsim")
    (schedule,) = DEPLOYMENTS["nightly"]["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # Prefect's own validation
    assert schedule.get("active", True)
    it = cronsim.CronSim(schedule["cron"], datetime(2026, 1, 1, tzinfo=timezone.utc))
    runs = [next(it) for _ in range(3)]
    assert all(b - a == runs[1] - runs[0] for a, b in zip(runs, runs[1:])) and (runs[1] - runs[0]).days == 1
    assert not DEPLOYMENTS["study"].get("schedules"), "the study runs when asked, not on a schedule"


def test_runs_go_to_the_process_pool():
    from prefect.workers.process import ProcessWorker

    process_variables = ProcessWorker.get_default_base_job_template()["variables"]["properties"]
    for d in DEPLOYMENTS.values():
        pool = d["work_pool"]
        assert pool["name"] == "saliency-atlas"
        assert set(pool.get("job_variables") or {}) <= set(process_variables)
    readme = (ROOT / "README.md").read_text()
    assert "prefect work-pool create saliency-atlas --type process" in readme


def test_the_pull_step_starts_runs_in_the_project_root(monkeypatch, tmp_path):
    """`prefect deploy` (run from the project root) fills in the placeholder; the step then
    makes the root the working directory of every run."""
    from prefect.deployments.steps.pull import set_working_directory
    from prefect.utilities.templating import apply_values

    (step,) = CONFIG["pull"]
    (function, inputs), = step.items()
    assert function == "prefect.deployments.steps.set_working_directory"
    monkeypatch.setenv("PWD", str(ROOT))
    resolved = apply_values(inputs, {}, remove_notset=False)  # as `prefect deploy` resolves pull steps
    assert resolved["directory"] == str(ROOT)
    monkeypatch.chdir(tmp_path)  # a process worker starts each run in a temporary folder
    assert set_working_directory(**resolved)["directory"] == str(ROOT)
    assert Path.cwd() == ROOT


@pytest.mark.slow
def test_prefect_deploy_registers_the_deployments(prefect_api):
    """`prefect deploy --all` against the temporary API, as a user runs it (a subprocess)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    async def create_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="saliency-atlas", type="process"), overwrite=True)

    asyncio.run(create_pool())
    prefect = Path(sys.executable).parent / "prefect"
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PWD=str(ROOT))
    done = subprocess.run([str(prefect), "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    async def read():
        async with get_client() as client:
            return {f"{FLOW_NAMES[d.name]}/{d.name}": d for d in await client.read_deployments()}

    found = asyncio.run(read())
    assert set(found) == {f"{flow}/{name}" for name, flow in FLOW_NAMES.items()}
    for name, d in found.items():
        config = DEPLOYMENTS[name.split("/")[1]]
        assert d.work_pool_name == "saliency-atlas"
        assert d.parameters == config["parameters"]
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    (schedule,) = found["dataset-audit/nightly"].schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.active
    assert found["study/study"].schedules == []
