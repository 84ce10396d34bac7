"""The reliability protocols as Prefect flows: sanity, invariance, manipulate, roar.

Each flow only composes the tasks of its protocol (`tasks.sanity`, `tasks.invariance`,
`tasks.manipulation`, `tasks.roar`): open or resume the store, compute the units not yet
done, draw the figure, return the `--json` summary. Their parameters are the fields of the
protocol's spec, so the Prefect form, the command line and the validation agree.
"""
from __future__ import annotations

from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from tasks import invariance as inv
from tasks import manipulation as man
from tasks import roar as ro
from tasks import sanity as san
from tasks.artifacts import publish_figure
from tasks.protocol_plot import PLOTS

from .study import spec_signature, task_runner


# Tasks share the process's cached model, and methods hook it: one task at a time (Dask for parallel retrains).
ONE_AT_A_TIME = ThreadPoolTaskRunner(max_workers=1)


def _figure(protocol: str, spec: Any) -> str | None:
    if not spec.figure:
        return None
    path = PLOTS[protocol](spec.store, spec.figure)
    publish_figure(path, f"{protocol}-figure", f"{protocol}: {spec.store}")
    get_run_logger().info("figure written to %s (and shown in the run's artifacts)", path)
    return path


def _run(futures: list, desc: str, report: Callable[[Any], None]) -> list[Any]:
    """Wait for `futures` with a progress bar, passing each result to `report` as it arrives."""
    out = []
    with tqdm(total=len(futures), desc=desc, unit="task", disable=None) as bar:
        for f in as_completed(futures):
            out.append(f.result())
            report(out[-1])
            bar.update()
    return out


@flow(name="sanity", task_runner=ONE_AT_A_TIME)
@spec_signature(san.SanitySpec)
def sanity(**options: Any) -> dict[str, Any]:
    """Model-parameter (cascading and independent) and, optionally, data randomisation: how similar
    each method's maps stay to the original ones (Adebayo et al. 2018)."""
    log = get_run_logger()
    spec = san.SanitySpec(**options)
    store, _ = san.open_store(spec)
    reused = san.original_maps(spec)["reused_from_study"]
    if reused:
        log.info("unrandomised maps of %s reused from the study %s", ", ".join(reused), spec.study)
    steps = sorted({(k, l) for _, k, l in store.pending("step")} | set(store.pending("change")))
    log.info("%d randomised models to explain (%d layers, cascading and independent)", len(steps),
             len(store.coord("layer")))

    def step(r: dict[str, Any]) -> None:
        level = log.warning if r["output_change"] < 1e-6 else log.info
        level("%s %s: output changed by %.3g (relative L2)", r["randomization"], r["layer"], r["output_change"])

    _run([san.randomized_step.submit(spec, k, l) for k, l in steps], "sanity", step)
    if spec.data_randomization:
        acc = san.label_randomized_model(spec)
        chance = acc["chance"]
        log.info("label-randomised model: train accuracy %.3f on its permuted labels, test accuracy %.3f "
                 "(chance %.3f)%s", acc["train_accuracy"], acc["test_accuracy"], chance,
                 "" if acc["test_accuracy"] < chance + 0.1 else " — NOT near chance")
        san.label_randomized_maps(spec)
    _figure("sanity", spec)
    return san.summary(spec.store)



@flow(name="invariance", task_runner=ONE_AT_A_TIME)
@spec_signature(inv.InvarianceSpec)
def invariance(**options: Any) -> dict[str, Any]:
    """Input invariance (Kindermans et al. 2019): each method's maps on the model and on its copy
    that takes the shifted input, the first layer's bias compensating the shift."""
    spec = inv.InvarianceSpec(**options)
    store, _, _ = inv.open_store(spec)
    log = get_run_logger()
    _run([inv.compare_method.submit(spec, m) for (m,) in store.pending("maps")], "invariance",
         lambda r: log.info("%s: relative L1 change of the maps %.3g", r["xai_method"], r["change"]))
    _figure("invariance", spec)
    return inv.summary(spec.store)


@flow(name="manipulate", task_runner=ONE_AT_A_TIME)
@spec_signature(man.ManipulateSpec)
def manipulate(**options: Any) -> dict[str, Any]:
    """Dombrowski et al. 2019's manipulation of a method's maps toward target maps, and the beta-smoothing defence."""
    spec = man.ManipulateSpec(**options)
    man.open_store(spec)
    get_run_logger().info("attacked %d images", man.attack(spec)["attacked"])
    _figure("manipulate", spec)
    return man.summary(spec.store)


@flow(name="roar-retrains")
def roar_retrains(spec: ro.RoarSpec, todo: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    log = get_run_logger()
    return _run([ro.retrain.submit(spec, m, f, s) for m, f, s in todo], "roar", lambda r: log.info(
        "%s at %.2f, seed %d: test accuracy %.3f (%.0f s)", r["xai_method"], r["fraction"], r["seed"],
        r["accuracy"], r["seconds"]))


@flow(name="roar", task_runner=ONE_AT_A_TIME)
@spec_signature(ro.RoarSpec)
def roar(**options: Any) -> dict[str, Any]:
    """Remove and retrain (Hooker et al. 2019): test accuracy of models retrained from scratch on
    images whose top-ranked pixels are removed, per method, fraction and seed, against a random ranking."""
    log = get_run_logger()
    spec = ro.RoarSpec(**options)
    store, _, _ = ro.open_store(spec)
    for (m,) in store.pending("ranking"):
        log.info("rankings of %s computed in %.1f s", *ro.ranking_maps(spec, m).values())
    todo = store.pending("retrain")
    log.info("%d retrains to run", len(todo))
    runner = task_runner(spec.workers, None, spec.device)
    roar_retrains.with_options(task_runner=runner)(spec, todo)
    _figure("roar", spec)
    return ro.summary(spec.store)


FLOWS = {"sanity": sanity, "invariance": invariance, "manipulate": manipulate, "roar": roar}
SPECS = {"sanity": san.SanitySpec, "invariance": inv.InvarianceSpec, "manipulate": man.ManipulateSpec,
         "roar": ro.RoarSpec}
SUMMARIES = {"sanity": san.summary, "invariance": inv.summary, "manipulate": man.summary, "roar": ro.summary}
