"""A study's room: its options (`spec`), its plan and store (`plan`), its units of work as Prefect tasks
(`units`, run overlapped by `pipeline`, sized to the device by `memory`) and its accuracy (`accuracy`)."""
from ..loading import load_dataset, load_model, model_of, resolve_device
from ..spec import option, options_of
from .accuracy import accuracy, accuracy_warning
from .planning import StudyPlan, attribution_units, contrasts_of, is_complete, plan, prepare_store
from .spec import BASELINE_MAPS, OPTIONS, StudySpec, check_options, spec_of_store
from . import memory, pipeline
from .units import LastBlock, attribute_block, block_units, evaluate_block, ingest_block, run_units

__all__ = [
    "BASELINE_MAPS", "LastBlock", "OPTIONS", "StudyPlan", "StudySpec", "accuracy", "accuracy_warning",
    "attribute_block", "attribution_units", "block_units", "check_options", "contrasts_of", "evaluate_block",
    "ingest_block", "is_complete", "load_dataset", "load_model", "memory", "model_of", "option", "options_of", "pipeline", "plan",
    "prepare_store", "resolve_device", "run_units", "spec_of_store",
]
