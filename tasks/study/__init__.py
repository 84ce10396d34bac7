"""A study's room: its options (`spec`), its plan and store (`plan`), its units of work as Prefect tasks
(`units`, run overlapped by `pipeline`, sized to the device by `memory`) and its accuracy (`accuracy`)."""
from .._lazy import exports

# each name from the module that owns it, on first use (`tasks.study.accuracy` is the module, `tasks.accuracy`
# its task)
__getattr__ = exports(__name__, {
    **dict.fromkeys(("load_dataset", "load_model", "model_of", "resolve_device"), "..loading"),
    **dict.fromkeys(("option", "options_of"), "..spec"), "accuracy_warning": "accuracy",
    **dict.fromkeys(("StudyPlan", "attribution_units", "contrasts_of", "is_complete", "plan", "prepare_store"),
                    "planning"),
    **dict.fromkeys(("BASELINE_MAPS", "OPTIONS", "StudySpec", "check_options", "spec_of_store"), "spec"),
    "memory": "memory", "pipeline": "pipeline",
    **dict.fromkeys(("LastBlock", "attribute_block", "block_units", "evaluate_block", "ingest_block", "run_units"),
                    "units"),
})

__all__ = [
    "BASELINE_MAPS", "LastBlock", "OPTIONS", "StudyPlan", "StudySpec", "accuracy", "accuracy_warning",
    "attribute_block", "attribution_units", "block_units", "check_options", "contrasts_of", "evaluate_block",
    "ingest_block", "is_complete", "load_dataset", "load_model", "memory", "model_of", "option", "options_of", "pipeline", "plan",
    "prepare_store", "resolve_device", "run_units", "spec_of_store",
]
