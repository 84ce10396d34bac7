"""Attribution methods for image classifiers, in pure PyTorch.

Usage::

    import torch, torchvision
    import xai_methods as xm

    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    images = torch.randn(4, 3, 96, 96)              # already normalised
    xm.available()                                  # ['gradcam', 'occlusion', 'saliency', ...]
    xm.spec("occlusion").passes((96, 96))           # (forward, backward) passes per image
    xm.check("gradcam", model, (96, 96), layer="layer3")  # validate a call without running it
    maps = xm.attribute("gradcam", model, images, target=3)             # (4, 96, 96), layer4 by default
    maps = xm.attribute("occlusion", model, images, window=16, stride=8)  # target=None: top-1 class
    grads = xm.attribute("saliency", model, images, reduce=None)        # (4, 3, 96, 96)
    why = xm.attribute("contrastive_gradcam", model, images, contrast=5)  # why top-1, not class 5?
    many = xm.attribute_many(["saliency", "gradcam", "gradcam_pp"], model, images)  # one pass for all three

    from xai_methods import metrics as xmet
    xmet.evaluate("deletion", model, images, maps, target=3)          # (4,) one score per image
    xm.attribute("random_map", model, images)                          # a baseline map: chance level

Maps are float32 on ``images.device``, larger = more evidence for the target,
and not rescaled. The model is left exactly as found (mode, requires_grad,
in-place flags, hooks). New methods register with ``xai_methods._registry.register``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module that owns it, imported on first use: `import xai_methods` and its
# torch-free `catalogue` (what `saliency-atlas methods` lists) stay light; the registry imports the
# methods' modules (and with them torch) at its first lookup.
_OWNERS = {
    "FAILURES": "failures", "failures": "failures", "without_failures": "failures", "contrasts": "_core",
    "MethodSpec": "_registry", "attribute": "_registry", "available": "_registry", "check": "_registry",
    "of_category": "_registry", "spec": "_registry", "attribute_many": "shared", "metrics": "metrics",
}


def __getattr__(name: str) -> Any:
    if name not in _OWNERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    owner = _OWNERS[name]
    module = importlib.import_module(f"{__name__}.{owner}")
    # every name of that module at once: importing `failures` binds the module to the name its function must have
    for other in (n for n, o in _OWNERS.items() if o == owner):
        globals()[other] = module if other == owner == "metrics" else getattr(module, other)
    return globals()[name]


__all__ = ["FAILURES", "MethodSpec", "attribute", "attribute_many", "available", "check", "contrasts", "failures",
           "metrics", "of_category", "spec", "without_failures"]
