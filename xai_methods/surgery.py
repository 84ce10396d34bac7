"""Model surgery for the reliability protocols: copies of a model that change one thing.

- `execution_order`: the layers that hold parameters, in the order a forward pass runs them.
- `randomized`: a copy with some layers re-initialised by their own initialiser, seeded per
  layer (Adebayo et al. 2018's model-parameter randomisation, cascading or independent).
- `shift_compensated`: a copy that takes ``x + shift`` and computes exactly what the original
  computes on ``x``, the first layer's bias absorbing the shift (Kindermans et al. 2019).
- `softplus_copy`: every ``nn.ReLU`` replaced by ``Softplus(beta)`` (Dombrowski et al. 2019).

Every function returns a new model in eval mode and leaves the one it is given untouched.
"""
from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

# Modules that only reshape: they may run before the first layer without breaking the compensation.
RESHAPES = (nn.Flatten, nn.Identity, nn.Unflatten)


def _leaf_calls(model: nn.Module, images: Tensor) -> list[tuple[str, nn.Module, Tensor]]:
    """(name, module, first input) of every leaf module, in the order of their first call on `images`."""
    names = {m: n for n, m in model.named_modules()}
    calls: dict[nn.Module, tuple[str, nn.Module, Tensor]] = {}

    def record(module: nn.Module, inputs: tuple, output: object) -> None:
        if module not in calls and inputs and isinstance(inputs[0], Tensor):
            calls[module] = (names[module], module, inputs[0])

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return list(calls.values())


def execution_order(model: nn.Module, images: Tensor) -> list[str]:
    """Names of the modules with parameters of their own, in the order one forward pass on
    `images` first runs them (not the order they are defined in)."""
    return [name for name, m, _ in _leaf_calls(model, images[:1]) if any(True for _ in m.parameters(recurse=False))]


def layer_seed(seed: int, name: str) -> int:
    """The seed of layer `name`'s re-initialisation: the same layer gets the same weights in
    every randomisation of the same seed (cascading step k and independent step k agree)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % 2**63


def reinitialize(module: nn.Module, seed: int) -> None:
    """Re-initialise `module` in place with its own ``reset_parameters`` (and running statistics),
    drawing from a CPU generator seeded by `seed`; the global random state is left as it was."""
    if not hasattr(module, "reset_parameters"):
        raise ValueError(f"layer of type {type(module).__name__} has no reset_parameters(), so it has no initialiser "
                         "of its own to re-draw; randomise only layers such as Conv2d, Linear and BatchNorm2d")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module.reset_parameters()


def randomized(model: nn.Module, layers: Sequence[str], seed: int = 0) -> nn.Module:
    """A copy of `model` (eval mode, on the model's device) whose `layers` are re-initialised,
    each with `layer_seed(seed, name)`. Drawn on the CPU, so the weights do not depend on the device."""
    device = next(model.parameters()).device
    out = copy.deepcopy(model).cpu()
    modules = dict(out.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; layers with parameters: "
                         f"{[n for n, m in out.named_modules() if any(True for _ in m.parameters(recurse=False))]}")
    for name in layers:
        reinitialize(modules[name], layer_seed(seed, name))
    return out.to(device).eval()


def weight_noise(model: nn.Module, sigma: float, seed: int = 0) -> nn.Module:
    """A copy of `model` (eval mode, on its device) with every parameter multiplied by 1 + sigma * N(0, 1),
    drawn on the CPU from a generator seeded by `seed` (MetaQuantus's model resilience perturbation)."""
    device = next(model.parameters()).device
    out = copy.deepcopy(model).cpu()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(1 + sigma * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out.to(device).eval()


class Compensated(nn.Module):
    """``layer(x) - offset``: an affine first layer whose bias absorbs a constant input shift."""

    def __init__(self, layer: nn.Module, offset: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("offset", offset)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x) - self.offset


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def shift_compensated(model: nn.Module, images: Tensor, shift: Tensor, rtol: float = 1e-4) -> nn.Module:
    """A copy `m2` of `model` with ``m2(x + shift) == model(x)`` for inputs shaped like `images`.

    `shift` is broadcastable to one image (a number, or one value per channel). The first layer
    (a Conv2d or Linear that reads the input, reshapes aside) gets the bias ``b - W shift``: a
    bias map for a padded convolution, whose border sees fewer shifted pixels. The equality is
    verified on `images`; a model whose first operation is not affine is refused.
    """
    calls = _leaf_calls(model, images[:1])
    first = next(((n, m, x) for n, m, x in calls if not isinstance(m, RESHAPES)), None)
    if first is None or not isinstance(first[1], (nn.Conv2d, nn.Linear)):
        kind = type(first[1]).__name__ if first else "no module"
        raise ValueError(f"the first layer of the model ({first[0] if first else '-'}: {kind}) is not a Conv2d or "
                         "Linear, so a constant input shift cannot be compensated in its bias; input invariance "
                         "needs a model whose first operation on the input is affine")
    name, layer, _ = first
    shift = torch.as_tensor(shift, dtype=images.dtype, device=images.device)
    constant = torch.zeros_like(images[:1]) + shift
    seen = {n: x for n, _, x in _leaf_calls(model, torch.cat([constant, torch.zeros_like(constant)]))}[name]
    with torch.no_grad():
        offset = layer(seen[:1]) - layer(seen[1:])  # W shift, as the layer sees a constant image
    out = copy.deepcopy(model).eval()
    _set_module(out, name, Compensated(copy.deepcopy(layer), offset).eval())
    with torch.no_grad():
        want, got = model(images), out(images + shift)
    gap = float((got - want).abs().max())
    if not gap <= rtol * max(1.0, float(want.abs().max())):
        raise ValueError(f"the shift could not be compensated in layer {name!r}: outputs differ by {gap:.3g} (an "
                         "operation before it, such as a normalisation inside the model, is not a pure reshape)")
    return out


def softplus_copy(model: nn.Module, beta: float) -> nn.Module:
    """A copy of `model` with every ``nn.ReLU`` module replaced by ``Softplus(beta)`` (-> ReLU as beta grows)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    out = copy.deepcopy(model).eval()
    relus = [n for n, m in out.named_modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError("the model has no nn.ReLU modules to smooth (functional relu calls in forward cannot be "
                         "replaced); the softplus copy needs ReLU modules")
    for name in relus:
        _set_module(out, name, nn.Softplus(beta=beta))
    return out
