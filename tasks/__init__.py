"""Prefect tasks: small idempotent units that read and write the study store."""
from .figure import render, render_figure
from .study import (
    Plan,
    StudySpec,
    attribute_block,
    finished,
    freeze_params,
    ingest_block,
    load_model,
    plan,
    prepare_store,
    resolve_device,
)

__all__ = [
    "Plan", "StudySpec", "attribute_block", "finished", "freeze_params", "ingest_block", "load_model", "plan",
    "prepare_store", "render", "render_figure", "resolve_device",
]
