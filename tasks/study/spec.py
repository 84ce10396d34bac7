"""`StudySpec`, what a user asks of a study, and the checks that need neither the model nor the data."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from xai_methods import catalogue, variants

from ..spec import RunSpec, option, options_of

# light to import (the command line's --help reads it): storage, the registries and the device are imported
# where they are used


@dataclass(frozen=True)
class StudySpec(RunSpec):
    """What a user asks of a study: the parameters of the ``study`` flow and of `saliency-atlas study`."""

    methods: list[str] = option(["saliency", "gradcam", "occlusion"],
                                "attribution methods (see `saliency-atlas methods`)", type="names")
    strict: bool = option(False, "refuse masks with problems (rows of a boxes file outside their image or naming "
                                 "files the dataset does not have) instead of warning", flag="--strict",
                          switch_on=True, switch="refuse masks with problems (boxes outside their image, rows naming "
                                                 "missing files) instead of warning")
    samples: int | None = option(256, "how many samples of the dataset (None / 'all': every sample)",
                                 type="samples")
    store: str = option("runs/shapes.zarr", "Zarr store path or fsspec URL; an existing store of the same "
                                            "study is resumed, and grows by new samples or methods")
    block_size: int = option(64, "samples per block: the unit of work, of resumption and of Zarr chunks")
    batch: int | None = option(None, "images per model pass inside a block (predictions, maps); None / auto: the "
                                     "whole block on a CPU, on a GPU what its free memory holds (one probe on two "
                                     "images; a pass out of memory is redone in halves). Maps agree across batches "
                                     "to rounding", type="batch")
    metrics: list[str] = option([], "evaluation metrics, each scored per image into the store's `score` "
                                    "(see `saliency-atlas metrics`)", type="names")
    metric_params: dict[str, dict[str, Any]] = option({}, "per-metric parameters, e.g. {\"deletion\": {\"steps\": 16}}",
                                                      flag="--metric-param", type="param")
    baselines: bool = option(True, "with metrics, also study the baseline maps (random_map, centre_map, edge_map) "
                                   "to read every score against chance", flag="--no-baselines",
                             switch="with metrics, do not add the baseline maps")
    contrast: str = option("runner-up", "the foil of contrastive methods ('why the prediction, not CLASS?'): "
                                        "runner-up (each sample's) or a class name")
    figure: str | None = option(None, "overview figure to write (PNG); None: no figure (the command line "
                                      "defaults to the store path with .png; 'none' for no figure)")
    figure_samples: list[int] = option([0, 1, 2, 3], "the samples shown in the figure", type="ints")
    dtype: str = option("float32", "precision of a new store's maps", choices=("float32", "float16"),
                        group="layout")
    compression: str = option("zstd", "codec of a new store's maps, images and masks",
                              choices=("zstd", "blosc", "none"), group="layout")
    chunk_samples: int | None = option(None, "samples per chunk; below block_size each block becomes one "
                                             "shard of such chunks", group="layout")
    map_size: str = option("input", "grid a new store's maps are stored at: input (the model's input size), native "
                                    "(the grid of the CAM methods' layer: their maps stored exactly, 1/1000 of the "
                                    "bytes at 7x7 of 224x224; other methods' maps averaged to it) or H,W / N (every "
                                    "map averaged to it). Metrics, figures and protocols read maps back upsampled "
                                    "to the input size", group="layout")
    keep_images: bool = option(True, "store the model inputs (False: sample ids only; inputs are remade from "
                                     "the dataset)", flag="--no-images", group="layout",
                               switch="store sample ids only, not the model inputs (they are remade from the data)")

    @property
    def studied(self) -> list[str]:
        """The methods of the study: the user's, then (with metrics) the baseline maps not already named."""
        extra = [b for b in BASELINE_MAPS if b not in self.methods] if self.metrics and self.baselines else []
        return [*self.methods, *extra]

    def metric_arguments(self, metric: str) -> dict[str, Any]:
        """The metric's defaults merged with the user's: what the store records (the method that
        max_sensitivity recomputes is the study's own, supplied per method by the task)."""
        from xai_methods import metrics as xmet

        p = {**xmet.spec(metric).defaults, **self.metric_params.get(metric, {})}
        return {k: v for k, v in p.items() if k not in TASK_SUPPLIED}

    def method_defaults(self, method: str) -> dict[str, Any]:
        """What a key missing from a stored parameter record means (the layer is never missing)."""
        import xai_methods as xm

        return dict(xm.spec(method).defaults)


OPTIONS = options_of(StudySpec)


BASELINE_MAPS = tuple(catalogue.methods("baseline"))  # random_map, centre_map, edge_map: chance levels


TASK_SUPPLIED = ("method", "method_params", "layer", "contrast")


def spec_of_store(store: str, **changes: Any) -> StudySpec:
    """The options of the study that made `store` (model, data, methods and their parameters, layout),
    with `changes` (e.g. more metrics): what `saliency-atlas evaluate` runs, so only new work is done."""
    import storage

    s = storage.Store(store, mode="r")  # no store, or an unfinished one: one line that says so
    a = s.attrs
    params = {m: dict(p) for m, p in a["params"].items()}
    layers = {p.pop("layer") for p in params.values() if "layer" in p}
    stored_metrics = json.loads(a.get("metric_params", "{}"))
    options = dict(
        dataset=a["dataset"], model=a["model"], weights=None if a.get("model_weights") == "built-in" else a["model_weights"],
        methods=s.methods(), samples=s.n_samples, store=store, block_size=s.block_size, params=params,
        layer=next(iter(layers - {None}), None), contrast=a.get("contrast", "runner-up"), metrics=s.metrics(),
        metric_params=stored_metrics, baselines=False, keep_images=bool(a.get("images_stored", True)),
        compression=a.get("compression", "zstd"), masks=a.get("masks"),
        map_size=",".join(map(str, s.map_grid)) if s.map_grid else "input", **json.loads(a.get("model_options", "{}")),
    )
    merged = {**options, **changes}
    merged["metrics"] = list(dict.fromkeys([*options["metrics"], *changes.get("metrics", [])]))
    merged["metric_params"] = {**stored_metrics, **changes.get("metric_params", {})}
    return StudySpec(**merged)


def baseline_choice(store: str) -> bool | None:
    """Whether `store`'s study scored its maps with the baseline maps beside them: True when it holds one, False
    when it holds scores but no baseline (it was made with --no-baselines), None when it was never scored."""
    import storage

    s = storage.Store(store, mode="r")
    if any(m in BASELINE_MAPS for m in s.methods()):
        return True
    return False if s.metrics() else None


def check_options(spec: StudySpec) -> None:
    """The options that need neither the model nor the data."""
    from storage import grid as storage_grid

    from ..loading import resolve_device

    unknown = [m for m in spec.methods if m not in catalogue.methods() and ":" not in m]  # a peer's: checked by plan
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(catalogue.methods())}")
    if not spec.methods:
        raise ValueError("methods is empty; name at least one of: " + ", ".join(catalogue.methods()))
    if spec.samples is not None and spec.samples < 1:
        raise ValueError(f"samples must be >= 1 or all, got {spec.samples}")
    if spec.block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {spec.block_size}")
    if spec.batch is not None and (isinstance(spec.batch, bool) or not isinstance(spec.batch, int) or spec.batch < 1):
        raise ValueError(f"batch must be a positive number of images per pass or None (auto), got {spec.batch!r}")
    for m in spec.params:
        if m not in spec.studied:
            raise ValueError(f"parameters given for {m!r}, which is not among the methods {list(spec.studied)}")
    unknown = [m for m in spec.metrics if variants.base(m) not in catalogue.metrics()]  # a variant: its base's
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {', '.join(catalogue.metrics())} (and their "
                         "variants, e.g. deletion[substrate=blur])")
    for m in spec.metrics:
        supplied = sorted(set(variants.parse(m)[1]) & set(TASK_SUPPLIED))
        if supplied:
            raise ValueError(f"metric {m}: {', '.join(supplied)} cannot be a variant's parameter: the study supplies it")
    for m, given in spec.metric_params.items():
        if m not in spec.metrics:
            raise ValueError(f"parameters given for metric {m!r}, which is not among the metrics {list(spec.metrics)}")
        supplied = sorted(set(given) & set(TASK_SUPPLIED))
        if supplied:
            raise ValueError(f"metric_params: {m}'s {supplied} are the study's own (each method, its parameters); "
                             "give the other parameters only")
    storage_grid.parse(spec.map_size)
    resolve_device(spec.device)
