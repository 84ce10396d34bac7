"""Prefect tasks and the pure functions under them, in rooms that say what they hold:

- `tasks.study`: a study's options, plan, units of work (ingest, attribute, score), pipeline and memory;
- `tasks.protocols`: the reliability protocols (sanity, invariance, manipulation, roar) and their table;
- `tasks.audit`: the audit's rows and limits, SpRAy clusters, the HTML report;
- `tasks.drawing`: figures, the evaluation and aggregate plots, Prefect artifacts;
- `tasks.spec` and `tasks.loading`: the options every run shares, and the model, data and device they name.

The names notebooks use are exported here as before (``from tasks import StudySpec, sanity, report``).
"""
from ._lazy import exports
from ._unshadow import own_package

own_package("storage")  # first: a Dask worker's spill folder "storage" must not stand in for it

# Each exported name and the room that owns it, imported on first use, so that `import tasks` (and the
# command line's --help, which reads `tasks.study.spec`) does not import torch, Prefect or xarray.
__getattr__ = exports(__name__, {
    **dict.fromkeys(("clusters", "report"), "audit"), "figure": "drawing.figure",
    **dict.fromkeys(("render", "render_figure"), "drawing.figure"),
    **dict.fromkeys(("invariance", "manipulation", "roar", "sanity"), "protocols"),
    "accuracy": "study.accuracy", "meta": "meta",
    **dict.fromkeys(("OPTIONS", "StudyPlan", "StudySpec", "attribute_block", "block_units",
                     "check_options", "evaluate_block", "ingest_block", "is_complete", "load_model", "memory",
                     "pipeline", "plan", "prepare_store", "resolve_device", "spec_of_store"), "study"),
})

__all__ = [
    "OPTIONS", "StudyPlan", "StudySpec", "accuracy", "attribute_block", "block_units", "check_options", "clusters",
    "meta",
    "evaluate_block", "figure", "ingest_block", "is_complete", "invariance", "load_model", "manipulation", "memory",
    "pipeline", "plan", "prepare_store", "render", "render_figure", "report", "resolve_device", "roar", "sanity",
    "spec_of_store",
]
