"""Prefect tasks: small idempotent units that read and write the study store."""
from ._unshadow import own_package

own_package("storage")  # first: a Dask worker's spill folder "storage" must not stand in for it

from .figure import render, render_figure
from .study import (
    OPTIONS,
    StudyPlan,
    StudySpec,
    accuracy,
    attribute_block,
    block_units,
    check_options,
    evaluate_block,
    finished,
    ingest_block,
    load_model,
    plan,
    prepare_store,
    resolve_device,
    spec_of_store,
)

__all__ = [
    "OPTIONS", "StudyPlan", "StudySpec", "accuracy", "attribute_block", "block_units", "check_options", "evaluate_block", "finished",
    "ingest_block",
    "load_model", "plan", "prepare_store", "render", "render_figure", "resolve_device", "spec_of_store",
]
