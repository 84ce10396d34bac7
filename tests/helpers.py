"""Scaffolding shared by the attribution-method tests: tiny models, inputs, model snapshots, hook checks.

Test modules import it as `from helpers import ...`: tests/ has no __init__.py, so pytest's default
("prepend") import mode puts tests/ on sys.path. Not a test module, so pytest does not rewrite its
asserts: the checks here carry their own messages.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator

import numpy as np
import torch
import torchvision
from torch import nn

# The hook dictionaries every module has; the gradient and DeepLIFT tests also check the last one.
HOOK_DICTS = ("_forward_hooks", "_backward_hooks", "_forward_pre_hooks")
ALL_HOOK_DICTS = (*HOOK_DICTS, "_backward_pre_hooks")


# --------------------------------------------------------------------------- models


class TinyCNN(nn.Module):
    """Three conv stages (BatchNorm + in-place ReLU), global average pooling, linear head.

    `conv_bias`: the convolutions have biases; `max_pool`: stage2 opens with MaxPool2d(2) and a stride-1
    convolution (instead of a stride-2 convolution), so stage2's ReLU is stage2[3], not stage2[2]."""

    def __init__(self, classes: int = 5, conv_bias: bool = False, max_pool: bool = False) -> None:
        super().__init__()

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=conv_bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        self.stage1 = stage(3, 8, 1)
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), *stage(8, 16, 1)) if max_pool else stage(8, 16, 2)
        self.stage3 = stage(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage3(self.stage2(self.stage1(x)))).flatten(1))


class LinearModel(nn.Module):
    """f(x) = W x + b on the flattened image."""

    def __init__(self, shape: tuple[int, int, int] = (3, 8, 8), classes: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(int(np.prod(shape)), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters (so BatchNorm's effective bias is not 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.3)
    return model.eval()


def tiny_cnn() -> TinyCNN:
    """TinyCNN from seed 0 with randomised BatchNorm, in eval mode."""
    torch.manual_seed(0)
    return randomise_batchnorm(TinyCNN())


def linear_model() -> LinearModel:
    """LinearModel (3 x 8 x 8 -> 4) from seed 0, in eval mode."""
    torch.manual_seed(0)
    return LinearModel().eval()


def resnet18(bn: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Untrained torchvision resnet18 (10 classes) from seed 0 in eval mode; `bn`: randomised BatchNorm."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    if bn:
        randomise_batchnorm(model)
    return model.to(dtype)


def images(b: int = 3, c: int = 3, h: int = 16, w: int = 16) -> torch.Tensor:
    """A fixed batch of standard-normal images (its own generator, seed 1)."""
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- model state and hooks


def snapshot(model: nn.Module, *, state: bool = False) -> dict:
    """Per-module modes, requires_grad, in-place flags and unset grads; `state`: also the parameter values."""
    shot = {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "inplace": {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")},
        "grad": {n: p.grad is None for n, p in model.named_parameters()},
    }
    if state:
        shot["state"] = {
            k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k
        }
    return shot


def assert_same_snapshot(a: dict, b: dict) -> None:
    """Two snapshots agree (the tensors of their "state", if they have one, exactly)."""
    flags_a = {k: v for k, v in a.items() if k != "state"}
    flags_b = {k: v for k, v in b.items() if k != "state"}
    assert flags_a == flags_b, f"snapshot changed in {sorted(k for k in flags_a if flags_a[k] != flags_b.get(k))}"
    if "state" in a or "state" in b:
        assert a["state"].keys() == b["state"].keys(), "state_dict keys changed"
        changed = [k for k in a["state"] if not torch.equal(a["state"][k], b["state"][k])]
        assert not changed, f"state changed: {changed}"


def assert_no_hooks(model: nn.Module, hooks: tuple[str, ...] = HOOK_DICTS) -> None:
    """No module of the model holds a hook in any of the `hooks` dictionaries."""
    for name, m in model.named_modules():
        for attr in hooks:
            assert not getattr(m, attr), f"{attr} left on {name!r}"


@contextlib.contextmanager
def model_left_as_is(
    model: nn.Module, *, hooks: tuple[str, ...] = HOOK_DICTS, state: bool = False
) -> Iterator[None]:
    """The block must leave the model's snapshot as it was and no hooks on it (checked when it ends normally)."""
    before = snapshot(model, state=state)
    yield
    assert_same_snapshot(snapshot(model, state=state), before)
    assert_no_hooks(model, hooks)


def mix_state(model: nn.Module, mode: str, *, flip: nn.Module, freeze: nn.Parameter, not_inplace: nn.Module) -> None:
    """The model in `mode` ("eval" or "train") with mixed per-module state that must survive an attribution:
    `flip` in the other mode, `freeze` without requires_grad, `not_inplace` with its in-place flag off."""
    model.train(mode == "train")
    flip.train(mode != "train")
    freeze.requires_grad_(False)
    not_inplace.inplace = False


# --------------------------------------------------------------------------- comparisons


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors' values (in float64)."""
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


# --------------------------------------------------------------------------- fault injection

# The real command line (argv after the first three) in a child that SIGKILLs itself at the Nth
# write of ARRAY, whole or half-way through it (the first half of the samples written, then death).
KILLER = textwrap.dedent("""
    import os, signal, sys, zarr
    array, nth, half = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "half"
    original, seen = zarr.Array.__setitem__, [0]
    def setitem(self, key, value):
        if self.path == array:
            seen[0] += 1
            if seen[0] == nth:
                k = key if isinstance(key, tuple) else (key,)
                axis = next((i for i, s in enumerate(k) if isinstance(s, slice)), None)  # samples: value's axis 0
                if half and axis is not None:
                    start, stop, _ = k[axis].indices(self.shape[axis])
                    cut = slice(start, start + (stop - start) // 2)
                    original(self, (*k[:axis], cut, *k[axis + 1:]), value[: cut.stop - cut.start])
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, key, value)
    zarr.Array.__setitem__ = setitem
    from flows.cli import main
    sys.exit(main(sys.argv[4:]))
""")


def killed_run(cli: list[str], store: str, array: str, nth: int, half: bool = False) -> None:
    """Run the command line `cli` on `store` in a child killed at that write; it must have died of SIGKILL."""
    import os
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", KILLER, array, str(nth), "half" if half else "whole", *cli,
                        "--store", store], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


def export_shapes(root, n: int):
    """The first `n` built-in shapes test images as PNG files `root/<class>/<i>.png`; returns `root`."""
    from PIL import Image

    import zoo

    batch = zoo.load_dataset("shapes", limit=n).load(0, n)
    for i, (img, label) in enumerate(zip(batch.images, batch.labels)):
        folder = root / zoo.shapes.CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img.transpose(1, 2, 0) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def read_artifacts(keys, flow_run_id=None):
    """Artifacts by key, read back from the API (of one flow run when given; else the latest of each key)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(sort=ArtifactSort.CREATED_DESC, artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=list(keys)),
                flow_run_id=None if flow_run_id is None else ArtifactFilterFlowRunId(any_=[flow_run_id]),
            ))
        latest = {}
        for a in found:
            latest.setdefault(a.key, a)
        return latest

    return asyncio.run(read())


def assert_inline_figure(artifact, path) -> None:
    """A markdown artifact that carries the PNG at `path` inline and names the file."""
    import base64
    import os
    import re

    assert artifact.type == "markdown"
    found = re.search(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", artifact.data)
    assert found, artifact.data[:200]
    assert base64.b64decode(found.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.abspath(path) in artifact.data


def brightness_map(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """A user's own method for the `package.module:function` adapter's tests (`helpers:brightness_map`): the
    pixels' summed channels, times `scale`, whatever the model."""
    return images.sum(1) * scale
