"""The ``study`` flow: attribution maps of a model over a dataset, into a resumable store."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from tqdm.auto import tqdm

import storage
from tasks import StudySpec, attribute_block, freeze_params, ingest_block, prepare_store, render_figure


@flow(name="study", log_prints=False)
def study(
    dataset: str = "shapes",
    model: str = "shapes-cnn",
    methods: list[str] = ["saliency", "gradcam", "occlusion"],  # noqa: B006 (Prefect reads defaults for the UI form)
    samples: int | None = 256,
    store: str = "runs/shapes.zarr",
    weights: str | None = None,
    layer: str | None = None,
    block_size: int = 64,
    device: str = "auto",
    params: dict[str, dict[str, Any]] | None = None,
    figure: str | None = None,
    figure_samples: list[int] = [0, 1, 2, 3],  # noqa: B006
) -> dict[str, Any]:
    """Explain ``model`` on ``dataset`` with each of ``methods`` and store every map.

    dataset: "shapes" (built in) or a local folder of class sub-folders of images.
    model: "shapes-cnn" (built in) or a torchvision architecture name with ``weights``.
    samples: how many samples of the dataset (None = all).
    store: the Zarr store path; an existing store of the same study is resumed.
    params: per-method parameters, e.g. {"occlusion": {"window": 8, "stride": 4}}.
    figure: where to write the overview figure (PNG), or None for no figure.

    Re-running with the same arguments computes only blocks not yet ``done``.
    """
    log = get_run_logger()
    spec = StudySpec(
        dataset=dataset, model=model, methods=tuple(methods), samples=samples, store=store,
        weights=weights, layer=layer, block_size=block_size, device=device, params=freeze_params(params),
    )
    plan = prepare_store(spec)
    for skipped in plan["skipped_files"]:
        log.warning("skipped unreadable file %s", skipped)
    log.info("%s store %s: %d samples in %d blocks", "created" if plan["created"] else "resuming",
             store, plan["samples"], plan["blocks"])

    todo_ingest = storage.pending(store)
    todo = [(m, b) for m in methods for b in storage.pending(store, m)]
    total = plan["blocks"] * (1 + len(methods))
    already = total - len(todo_ingest) - len(todo)
    log.info("%d of %d block tasks already done; %d to compute", already, total, len(todo_ingest) + len(todo))
    seconds: dict[str, float] = {m: 0.0 for m in methods}
    with tqdm(total=total, initial=already, desc="study", unit="block", disable=None) as bar:
        for b in todo_ingest:
            ingest_block(spec, b)
            bar.update()
        for m, b in todo:
            receipt = attribute_block(spec, m, b)
            seconds[m] += receipt["seconds"]
            bar.update()

    ds = storage.open_dataset(store)
    label, pred = ds.label.values, ds.prediction.values
    known = label >= 0
    accuracy = float((label[known] == pred[known]).mean()) if known.any() else None
    summary: dict[str, Any] = {
        "store": store,
        "samples": plan["samples"],
        "blocks": plan["blocks"],
        "ingested_blocks": len(todo_ingest),
        "computed_blocks": {m: sum(1 for mm, _ in todo if mm == m) for m in methods},
        "attribution_seconds": {m: round(s, 3) for m, s in seconds.items()},
        "accuracy": accuracy,
    }
    if accuracy is not None:
        log.info("model accuracy on the study's samples: %.2f%%", 100 * accuracy)
    if figure:
        summary["figure"] = render_figure(store, figure, [s for s in figure_samples if s < plan["samples"]])
        log.info("figure written to %s", summary["figure"])
    return summary
