"""Timing machinery: the timer, the pass counter, the model guard and the floor (the passes a method cannot avoid)."""
from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from xai_methods._core import _HOOK_DICTS

# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> float:
    """Seconds `fn` takes, until the GPU's queued work is done where a GPU is in use."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with warnings silenced (peers warn about inputs that do not require grad, batch loops, ...)."""

    def call(*args: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)

    return call


class PassCounter:
    """Forward hook on the model: images seen, images seen with grad, largest batch (the memory proxy)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.images = self.grad_images = self.max_batch = 0

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        x = inputs[0] if inputs else None
        n = x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else 0
        self.images += n
        self.max_batch = max(self.max_batch, n)
        if isinstance(output, Tensor) and output.requires_grad:
            self.grad_images += n

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


class ModelGuard:
    """Snapshot of the model's hooks, modes and requires_grad; `restore` undoes and reports any change,
    so a call that leaks (a peer's hook left behind) cannot slow down the calls timed after it."""

    def __init__(self, model: nn.Module):
        self.modules = list(model.modules())
        self.hooks = [(m, a, set(getattr(m, a))) for m in self.modules for a in _HOOK_DICTS if hasattr(m, a)]
        self.modes = [m.training for m in self.modules]
        self.params = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> list[str]:
        changed = []
        for m, attr, keys in self.hooks:
            extra = set(getattr(m, attr)) - keys
            for key in extra:
                del getattr(m, attr)[key]
            if extra:
                changed.append(f"{len(extra)} {attr.strip('_')} left")
        if any(m.training != mode for m, mode in zip(self.modules, self.modes)):
            changed.append("train/eval mode changed")
        for m, mode in zip(self.modules, self.modes):
            m.training = mode
        if any(p.requires_grad != flag for p, flag in self.params):
            changed.append("requires_grad changed")
        for p, flag in self.params:
            p.requires_grad_(flag)
        return changed


class frozen_params:
    """Parameters requires_grad=False for the floor's backward passes; restored on exit."""

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)


def floor_parts(fwd_images: int, bwd_images: int, chunk: int) -> list[tuple[str, int, int]]:
    """[(kind "fwd" | "bwd", chunk size, number of such chunks)]: full chunks, then the partial one."""
    parts = []
    for kind, n in (("fwd", fwd_images), ("bwd", bwd_images)):
        full, rest = divmod(max(n, 0), chunk)
        if full:
            parts.append((kind, chunk, full))
        if rest:
            parts.append((kind, rest, 1))
    return parts


class Floor:
    """The passes a method cannot avoid, batched in chunks; one call = one round's estimate in seconds.

    fwd_images inputs run forward-only under inference_mode and bwd_images inputs run
    forward + backward to the input, each in chunks of `chunk`. Per call, up to
    `max_chunks` full chunks of each kind are timed and their mean is multiplied by
    the number of full chunks; a final partial chunk is timed as is. `extra` (the
    LIME surrogate fit) is timed and added.
    """

    def __init__(
        self,
        model: nn.Module,
        size: tuple[int, int],
        fwd_images: int,
        bwd_images: int,
        chunk: int,
        classes: int,
        max_chunks: int,
        extra: Callable[[], Any] | None = None,
        seed: int = 0,
    ):
        self.model, self.max_chunks, self.extra = model, max_chunks, extra
        g = torch.Generator().manual_seed(seed)
        self.parts = floor_parts(fwd_images, bwd_images, chunk)
        self.inputs: dict[int, Tensor] = {}
        self.targets: dict[int, Tensor] = {}
        device = next(model.parameters()).device
        for _, size_b, _ in self.parts:
            if size_b not in self.inputs:
                self.inputs[size_b] = torch.randn(size_b, 3, *size, generator=g).to(device)
                self.targets[size_b] = torch.randint(0, classes, (size_b,), generator=g).to(device)
        self.extrapolated = any(count > max_chunks for _, _, count in self.parts)

    def _fwd(self, b: int) -> None:
        with torch.inference_mode():
            self.model(self.inputs[b])

    def _bwd(self, b: int) -> None:
        x = self.inputs[b].clone().requires_grad_(True)
        score = self.model(x).gather(1, self.targets[b][:, None]).sum()
        torch.autograd.grad(score, x)

    def __call__(self) -> float:
        total = 0.0
        with frozen_params(self.model):
            for kind, b, count in self.parts:
                step = self._fwd if kind == "fwd" else self._bwd
                times = [timed(lambda: step(b)) for _ in range(min(count, self.max_chunks))]
                total += statistics.fmean(times) * count
        if self.extra is not None:
            total += timed(self.extra)
        return total


def lime_surrogate_fit(images: int, samples: int, segments: int, seed: int = 0) -> Callable[[], Any]:
    """The least a LIME surrogate costs: a batched weighted ridge fit of `samples` x `segments` per image."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.rand(images, samples, segments, generator=g) > 0.5).to(torch.float64)
    y = torch.randn(images, samples, 1, generator=g, dtype=torch.float64)

    def fit() -> Tensor:
        design = torch.cat([z, torch.ones_like(z[..., :1])], dim=2)
        distance = 1 - z.mean(2, keepdim=True)  # cosine-like distance to the unperturbed image
        w = torch.exp(-(distance**2) / 0.25**2)
        gram = design.transpose(1, 2) @ (w * design) + 1e-3 * torch.eye(segments + 1, dtype=z.dtype)
        return torch.linalg.solve(gram, design.transpose(1, 2) @ (w * y))

    return fit


