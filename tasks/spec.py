"""What every run's options are made of: `option` fields of frozen dataclasses, and `RunSpec`,
the options that a study, each protocol and the audit share (model, preprocessing, data, device,
method parameters).

A spec is the one definition of a command's options: the flow's signature (and so the Prefect UI's
form), the command line's flags and the validation all derive from its fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def option(default: Any, help: str, **cli: Any) -> Any:
    """An option of a spec: its default, the one-line help the UI form and `--help` show, and
    argparse settings for the command line (``flag``, ``type``, ``choices``, ``group``...)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "cli": cli})
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass(frozen=True)
class RunSpec:
    """The options every run shares: which model (and how its inputs are prepared), which images, which
    device, the methods' parameters, and where the tasks run (this process, or Dask). `StudySpec`, each
    protocol's spec and the audit derive from it, so `--input-size`, `--mean`, `--std`, `--classes` and
    `--workers` mean the same everywhere."""

    dataset: str = option("shapes", "built-in name (shapes) or a local folder of class sub-folders of images")
    model: str = option("shapes-cnn", "built-in name (shapes-cnn), a torchvision architecture (resnet18), timm:NAME "
                                      "or your factory package.module:function, the last three with --weights")
    weights: str | None = option(None, "local state-dict file of the model (loaded with weights_only=True; "
                                       "nothing is downloaded); a model card W.json / W.yaml beside W.pt may give "
                                       "input_size, mean, std, classes and accuracy")
    model_args: dict[str, Any] = option({}, "arguments of a factory model (package.module:function) or of a "
                                            "timm:NAME architecture; on the command line NAME=VALUE, e.g. "
                                            "num_classes=10",
                                        flag="--model-arg", type="kv", group="model")
    input_size: list[int] | None = option(None, "the model's input size H,W (or one side); None: the "
                                                "architecture's or the model card's", type="ints", group="model")
    mean: list[float] | None = option(None, "per-channel mean the model was trained with, e.g. 0.5,0.5,0.5; "
                                            "None: the architecture's or the model card's", type="floats", group="model")
    std: list[float] | None = option(None, "per-channel std the model was trained with; None: the "
                                           "architecture's or the model card's", type="floats", group="model")
    classes: str | None = option(None, "text file of the model's class names, one a line, in output order "
                                       "(folder classes are matched to them by name)", group="model")
    masks: str | None = option(None, "ground-truth masks of a folder dataset: a folder MASKS/<class>/<image "
                                     "stem>.png (non-zero = object) or a CSV of boxes file,y0,x0,y1,x1 in the "
                                     "image's pixels; default: IMAGE.mask.png beside an image, when present")
    layer: str | None = option(None, "layer of layer methods (dotted module name); None: the last spatial layer")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (a GPU when there is one)")
    params: dict[str, dict[str, Any]] = option({}, "per-method parameters, e.g. {\"occlusion\": {\"window\": 8}}",
                                               flag="--param", type="param")
    workers: int | None = option(None, "run the tasks on a local Dask cluster of this many processes", group="where")
    dask_address: str | None = option(None, "run the tasks on an existing Dask cluster (tcp://HOST:PORT); its "
                                            "workers need this package installed", group="where")

    def method_params(self, method: str) -> dict[str, Any]:
        """Defaults of the method merged with the user's, plus the layer for layer methods."""
        import xai_methods as xm  # here: the options themselves stay light to import (the command line's --help)

        spec = xm.spec(method)
        p = {**spec.defaults, **self.params.get(method, {})}
        if spec.needs_layer:
            p["layer"] = self.layer
        return p

    def recomputed(self, method: str) -> dict[str, Any]:
        """What a metric that recomputes the method (max_sensitivity) is given: the method, its layer and its
        other parameters, as this run made its maps."""
        own = self.method_params(method)
        return {"method": method, "layer": own.pop("layer", None), "method_params": own}


def options_of(cls: type) -> dict[str, dataclasses.Field]:
    """The options of a spec class (`StudySpec`, a protocol's spec) by name, in definition order."""
    return {f.name: f for f in dataclasses.fields(cls)}
