"""The ``study`` flow: attribution maps of a model over a dataset, into a resumable store."""
from __future__ import annotations

import os
from typing import Any

import torch

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from tqdm.auto import tqdm

import storage
from tasks import StudySpec, attribute_block, freeze_params, ingest_block, prepare_store, render_figure, resolve_device


def task_runner(workers: int | None, dask_address: str | None, device: str = "cpu") -> TaskRunner:
    """Where block tasks run: one at a time in this process (default), on a local Dask
    cluster of ``workers`` single-threaded processes, or on an existing Dask cluster at
    ``dask_address``. On GPUs, a local cluster has at most one worker per GPU."""
    gpus = torch.cuda.device_count() if resolve_device(device).startswith("cuda") else 0
    if gpus and workers is not None and workers > gpus:
        raise ValueError(f"--workers {workers} is more than the {gpus} GPU(s) here: one task per GPU at a time; "
                         f"use --workers {gpus} or fewer, or --device cpu")
    if workers is not None and dask_address is not None:
        raise ValueError("give --workers N (a local Dask cluster) or --dask-address (an existing one), not both")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if dask_address is None and (workers or 1) == 1:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if dask_address is not None:
        return DaskTaskRunner(address=dask_address)
    # One single-threaded process per worker, each with its share of the cores for torch.
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
        "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
    })


@flow(name="study-blocks")
def compute_blocks(
    spec: StudySpec, todo_ingest: list[int], todo: list[tuple[str, int]], total: int, already: int
) -> list[dict[str, Any]]:
    """Ingest, then attribute, the pending blocks on the flow's task runner; returns the receipts."""
    receipts: list[dict[str, Any]] = []
    with tqdm(total=total, initial=already, desc="study", unit="block", disable=None) as bar:

        def collect(futures: list) -> None:
            for future in as_completed(futures):
                receipts.append(future.result())
                bar.update()

        # Inputs and targets first, all of them: attribution reads what ingestion writes.
        collect([ingest_block.submit(spec, b) for b in todo_ingest])
        collect([attribute_block.submit(spec, m, b) for m, b in todo])
    return [r for r in receipts if "xai_method" in r]


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
    workers: int | None = None,
    dask_address: str | None = None,
    dtype: str = "float32",
    compression: str = "zstd",
    chunk_samples: int | None = None,
    keep_images: bool = True,
    contrast: str = "runner-up",
) -> dict[str, Any]:
    """Explain ``model`` on ``dataset`` with each of ``methods`` and store every map.

    Re-running with the same arguments computes only blocks not yet done; more samples
    or methods are added to an existing store.

    Args:
        dataset: "shapes" (built in) or a local folder of class sub-folders of images.
        model: "shapes-cnn" (built in) or a torchvision architecture name with ``weights``.
        methods: attribution methods (see `saliency-atlas methods`).
        samples: how many samples of the dataset (None = all).
        store: the Zarr store path or fsspec URL; an existing store of the same study is resumed.
        weights: a local state-dict file for the model (never downloaded).
        layer: the layer of layer methods (dotted module name); None = the last spatial layer.
        block_size: samples per block, the unit of work and of Zarr chunks.
        device: cpu, cuda, cuda:N or auto.
        params: per-method parameters, e.g. {"occlusion": {"window": 8, "stride": 4}}.
        figure: where to write the overview figure (PNG), or None for no figure.
        figure_samples: the samples shown in the figure.
        workers: run the block tasks on a local Dask cluster of this many processes.
        dask_address: run them on an existing Dask cluster (tcp://HOST:PORT) instead.
        dtype: precision of the stored maps of a new store: float32 or float16.
        compression: codec of a new store's maps, images and masks: zstd, blosc or none.
        chunk_samples: samples per chunk inside a block's shard (None: one chunk per block).
        keep_images: store the model inputs (True) or only sample ids (False).
        contrast: the foil of contrastive methods ("why the prediction, not this class?"):
            "runner-up" (the best other class of each sample) or a class name; recorded per
            sample in the store's `contrast` variable.
    """
    log = get_run_logger()
    spec = StudySpec(
        dataset=dataset, model=model, methods=tuple(methods), samples=samples, store=store,
        weights=weights, layer=layer, block_size=block_size, device=device, params=freeze_params(params),
        dtype=dtype, compression=compression, chunk_samples=chunk_samples, keep_images=keep_images,
        contrast=contrast,
    )
    plan = prepare_store(spec)
    for skipped in plan["skipped_files"]:
        log.warning("skipped unreadable file %s", skipped)
    log.info("%s store %s: %d samples in %d blocks", "created" if plan["created"] else "resuming",
             store, plan["samples"], plan["blocks"])
    if plan["added"]["samples"] or plan["added"]["methods"]:
        log.info("added %d new samples and methods %s to the store", plan["added"]["samples"], plan["added"]["methods"])

    todo_ingest = storage.pending(store)
    todo = [(m, b) for m in methods for b in storage.pending(store, m)]
    total = plan["blocks"] * (1 + len(methods))
    already = total - len(todo_ingest) - len(todo)
    log.info("%d of %d block tasks already done; %d to compute", already, total, len(todo_ingest) + len(todo))
    runner = task_runner(workers, dask_address, device)
    receipts = compute_blocks.with_options(task_runner=runner)(spec, todo_ingest, todo, total, already)
    seconds = {m: round(sum(r["seconds"] for r in receipts if r["xai_method"] == m), 3) for m in methods}

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
        "attribution_seconds": seconds,
        "accuracy": accuracy,
    }
    if accuracy is not None:
        log.info("model accuracy on the study's samples: %.2f%%", 100 * accuracy)
    if figure:
        summary["figure"] = render_figure(store, figure, [s for s in figure_samples if s < plan["samples"]])
        log.info("figure written to %s", summary["figure"])
    return summary
