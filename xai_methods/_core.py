"""Shared machinery for attribution methods.

Everything a method needs besides its own formula lives here, written once:
layer lookup, the model guard, hook scopes, target selection, one
forward+backward pass, channel reduction, upsampling, baselines and batching
of perturbation passes. Only torch is used.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

REDUCE_CHOICES: tuple[str | None, ...] = ("sum", "abs_sum", "max_abs", None)

# Hook dictionaries of nn.Module that `untouched` guards (whatever this torch has).
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


# --------------------------------------------------------------------------- layers


def layer_names(model: nn.Module) -> list[str]:
    """Dotted names of all sub-modules of `model` (the model itself excluded)."""
    return [name for name, _ in model.named_modules() if name]


def _layer_error(model: nn.Module, what: str) -> ValueError:
    return ValueError(f"layer: {what}; valid layer names: {', '.join(layer_names(model))}")


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    """Return the sub-module named by `layer` (dotted name) or `layer` itself if it belongs to `model`."""
    if isinstance(layer, nn.Module):
        if any(m is layer for m in model.modules()):
            return layer
        raise _layer_error(model, f"the given {type(layer).__name__} module is not part of the model")
    if isinstance(layer, str) and layer:
        try:
            return model.get_submodule(layer)
        except AttributeError:
            pass
    raise _layer_error(model, f"{layer!r} is not a module of the model")


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """Dotted name of `layer` inside `model` (first name if the module is shared)."""
    for name, module in model.named_modules():
        if module is layer:
            return name
    raise _layer_error(model, f"the given {type(layer).__name__} module is not part of the model")


# model -> (what the probe depended on, the layer it found): `default_layer`'s last answer per model
_PROBED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def default_layer(model: nn.Module, images: Tensor) -> str:
    """Name of the layer a layer method uses when `layer=None`.

    `model.default_layer` (a dotted name) wins if present. Otherwise one probe
    forward pass on `images[:1]` finds the module that finished last among
    those returning a 4-D tensor with a spatial grid larger than 1x1 (the last
    convolutional stage, e.g. ``layer4`` of a torchvision ResNet). The probe
    runs in eval mode so it does not touch BatchNorm statistics; every module's
    mode is restored afterwards. Its answer is remembered per model while the
    model's modules (names, types, identities) and the image shape stay the same,
    so a batch loop pays one probe, not one per call.
    """
    name = getattr(model, "default_layer", None)
    if isinstance(name, str):
        resolve_layer(model, name)
        return name
    key = (tuple(images.shape[1:]), tuple((n, type(m), id(m)) for n, m in model.named_modules()))
    known = _PROBED.get(model)
    if known is not None and known[0] == key:
        return known[1]
    name = _probe_layer(model, images)
    _PROBED[model] = key, name
    return name


def _probe_layer(model: nn.Module, images: Tensor) -> str:
    """The module of `model` that finished last among those returning a (B, K, h, w) tensor with h, w > 1
    on `images[:1]` (see `default_layer`)."""
    finished: dict[str, int] = {}  # module name -> order in which it (last) finished
    clock = itertools.count()

    def recorder(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.dim() == 4 and min(output.shape[2:]) > 1:
                finished[name] = next(clock)

        return hook

    modes = [(m, m.training) for m in model.modules()]
    with hooks() as handles, torch.no_grad():
        handles += [m.register_forward_hook(recorder(n)) for n, m in model.named_modules() if n]
        try:
            model.eval()
            model(images[:1].detach())
        finally:
            for module, mode in modes:
                module.training = mode
    if not finished:
        raise ValueError(
            "layer: no module of the model outputs a 4-D (B, K, h, w) tensor with h, w > 1; "
            f"pass layer= explicitly; valid layer names: {', '.join(layer_names(model))}"
        )
    return max(finished, key=finished.__getitem__)


# --------------------------------------------------------------------------- guards


@contextlib.contextmanager
def hooks(*handles: RemovableHandle) -> Iterator[list[RemovableHandle]]:
    """Hook scope: yields a list; every handle in it is removed on exit, even on error."""
    scope = list(handles)
    try:
        yield scope
    finally:
        for handle in scope:
            handle.remove()


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[nn.Module]:
    """Run a method on `model` and leave it exactly as found.

    Inside: every parameter has ``requires_grad=False`` (backward computes only
    the gradients a method asks for, never weight gradients) and every
    ``inplace`` flag (``nn.ReLU`` etc.) is ``False`` so hooks see unmodified
    tensors. The train/eval mode is *not* changed. On exit, also on error, each
    module's ``training`` flag, each parameter's ``requires_grad``, each
    ``inplace`` flag are restored and any hook added to any module is removed.
    """
    modules = list(model.modules())
    modes = [m.training for m in modules]
    params = list(model.parameters())
    grad_flags = [p.requires_grad for p in params]
    inplace = [(m, m.inplace) for m in modules if isinstance(getattr(m, "inplace", None), bool)]
    hook_keys = [(m, attr, set(getattr(m, attr))) for m in modules for attr in _HOOK_DICTS if hasattr(m, attr)]
    try:
        for p in params:
            p.requires_grad_(False)
        for m, _ in inplace:
            m.inplace = False
        yield model
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
        for m, flag in inplace:
            m.inplace = flag
        for m, attr, keys in hook_keys:
            hook_dict = getattr(m, attr)
            for key in set(hook_dict) - keys:
                del hook_dict[key]


# --------------------------------------------------------------------------- targets


def _as_class_tensor(value: Any, name: str, batch: int, device: torch.device) -> Tensor:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a LongTensor of shape ({batch},), got a bool")
    if isinstance(value, numbers.Integral):
        return torch.full((batch,), int(value), dtype=torch.long, device=device)
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be an int or a LongTensor of shape ({batch},), got {type(value).__name__}") from err
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one class per image), got {tuple(t.shape)}")
    # A copy: the caller's tensor may be an inference tensor (made under
    # torch.inference_mode()), which autograd refuses to record.
    return t.to(device=device, dtype=torch.long).clone()


def targets(
    logits: Tensor | None,
    target: int | Sequence[int] | Tensor | None,
    batch: int,
    device: torch.device,
    name: str = "target",
) -> Tensor:
    """Class indices (B,) as a LongTensor on `device`.

    int -> repeated; sequence / tensor of shape (B,) -> validated; None -> the
    top-1 prediction of `logits`. When `logits` is given, classes are checked
    against its number of columns. With ``logits=None`` only type and shape
    are checked (early validation before any forward pass).
    """
    if target is None:
        if logits is None:
            raise ValueError(f"{name}=None needs the model output to pick the top-1 class")
        return logits.detach().argmax(1).to(device)
    t = _as_class_tensor(target, name, batch, device)
    if logits is not None:
        classes = logits.shape[1]
        bad = (t < 0) | (t >= classes)
        if bool(bad.any()):
            shown = t[bad].tolist()[:5]
            raise ValueError(
                f"{name} out of range: got {shown}; the model has {classes} classes, valid values are 0..{classes - 1}"
            )
    return t


def contrasts(logits: Tensor, contrast: Any, target: Tensor) -> Tensor:
    """Contrast (foil) classes (B,): as given, or None -> the best-scoring class other than the
    target (the runner-up when the target is the prediction). Refuses a contrast equal to the target."""
    if contrast is None:
        return logits.detach().scatter(1, target[:, None], float("-inf")).argmax(1)
    c = targets(logits, contrast, logits.shape[0], logits.device, name="contrast")
    same = (c == target).nonzero()[:, 0].tolist()
    if same:
        raise ValueError(
            f"contrast equals the target for images {same[:5]}: a contrastive method explains 'why target, "
            "not contrast'; pass another contrast class, or contrast=None for the runner-up"
        )
    return c


def class_score(logits: Tensor, target: Tensor) -> Tensor:
    """Score (B,) of the target class: the logit, not the softmax."""
    if logits.dim() != 2:
        raise ValueError(f"model output must be logits of shape (B, classes), got {tuple(logits.shape)}")
    return logits.gather(1, target[:, None]).squeeze(1)


# --------------------------------------------------------------------------- one pass


class Capture:
    """The output of a layer's last call in a forward pass (see `layer_output`)."""

    def __init__(self) -> None:
        self.outputs: list[Tensor] = []

    @property
    def output(self) -> Tensor:
        if not self.outputs:
            raise ValueError("layer: the given layer did not run in the model's forward pass")
        return self.outputs[-1]


@contextlib.contextmanager
def layer_output(layer: nn.Module | None) -> Iterator[Capture]:
    """Scope that captures `layer`'s output (nothing is hooked for layer=None). Downstream
    modules get a copy, so a later in-place op (ResNet's ``out += identity``) cannot rewrite
    the capture. The hook is removed on exit, also on error."""
    captured = Capture()

    def capture(module: nn.Module, inputs: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise ValueError(f"layer: {type(module).__name__} returns {type(output).__name__}, not a tensor")
        captured.outputs[:] = [output]
        return output.clone()

    with hooks() as handles:
        if layer is not None:
            handles.append(layer.register_forward_hook(capture))
        yield captured


class Backprop(NamedTuple):
    """Result of `backprop`: all tensors detached."""

    logits: Tensor  # (B, classes)
    target: Tensor  # (B,) resolved class indices
    inputs: Tensor  # (B, C, H, W) the input that was fed
    grad: Tensor  # d score / d input, or d score / d activation when a layer was given
    activation: Tensor | None  # the layer output, when a layer was given
    input_grad: Tensor | None = None  # d score / d input as well, when asked for with a layer (`both`)


def _fresh_input(images: Tensor) -> Tensor:
    # clone() also turns an inference-mode tensor into a normal one.
    with torch.inference_mode(False):
        return images.detach().clone().requires_grad_(True)


def backprop(
    model: nn.Module,
    images: Tensor,
    target: Any,
    layer: nn.Module | None = None,
    score: Callable[[Tensor, Tensor], Tensor] = class_score,
    both: bool = False,
) -> Backprop:
    """One forward and one backward pass of the target logit (or of ``score(logits, target)``, (B,)).

    Without `layer` the gradient is taken w.r.t. the input; with `layer` w.r.t.
    that module's output (captured by a forward hook; if the module runs more
    than once in a forward pass, its last call is used). Every image's score
    depends only on that image (in eval mode), so summing the scores gives
    per-image gradients in one backward pass. `both` (with `layer`): the same backward pass also
    yields the gradient w.r.t. the input (`input_grad`), for methods that share the pass.
    Call inside `untouched(model)`.
    """
    with torch.inference_mode(False), torch.enable_grad(), layer_output(layer) as captured:
        x = _fresh_input(images)
        logits = model(x)
        t = targets(logits, target, images.shape[0], images.device)
        total = score(logits, t).sum()
        wrt = [captured.output, x] if layer is not None and both else [captured.output if layer is not None else x]
        grads = torch.autograd.grad(total, wrt)
    return Backprop(
        logits=logits.detach(),
        target=t,
        inputs=x.detach(),
        grad=grads[0].detach(),
        activation=captured.output.detach() if layer is not None else None,
        input_grad=grads[1].detach() if len(grads) == 2 else None,
    )


def forward_logits(model: nn.Module, images: Tensor, internal_batch: int) -> Tensor:
    """Logits of `images` under inference mode, `internal_batch` images per pass."""
    with torch.inference_mode():
        return torch.cat([model(images[chunk]) for chunk in batched(images.shape[0], internal_batch)])


# --------------------------------------------------------------------------- shaping


def reduce_channels(attr: Tensor, reduce: str | None) -> Tensor:
    """(B, C, H, W) -> (B, H, W) by "sum", "abs_sum", "max_abs"; None keeps the channels."""
    if reduce is None:
        return attr
    if reduce == "sum":
        return attr.sum(1)
    if reduce == "abs_sum":
        return attr.abs().sum(1)
    if reduce == "max_abs":
        return attr.abs().amax(1)
    raise ValueError(f"reduce={reduce!r} is not valid; choose one of {REDUCE_CHOICES}")


def upsample_to(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, h, w) maps to (B, *size) (align_corners=False)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


BASELINES = ("zeros", "mean", "blur", "uniform")
BASELINE_CHOICES = "a number (0.0 = the normalisation mean), 'zeros', 'mean', 'blur', 'uniform' or a tensor"


def check_baseline(name: str, value: Any, ctx: Any) -> None:
    """A baseline name of `BASELINES`, a number or a tensor (its shape is checked against the images)."""
    if isinstance(value, str):
        if value not in BASELINES:
            raise ValueError(f"{name}={value!r} is not valid; use {BASELINE_CHOICES}")
    elif isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be {BASELINE_CHOICES}, got {type(value).__name__}")


def default_blur_sigma(size: tuple[int, int]) -> float:
    """The blur of every "blur" baseline and substrate: sigma 10 px at 224 x 224 (Fong & Vedaldi 2017), scaled with min(H, W)."""
    return 10.0 * min(size) / 224.0


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) with standard deviation `sigma` pixels, per channel.

    The kernel is truncated at 3 sigma and the border replicated; sigma <= 0 returns `x`.
    """
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    y = F.pad(x, (0, 0, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    y = F.pad(y, (radius, radius, 0, 0), mode="replicate")
    return F.conv2d(y, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def seeded_rng(seed: int | None) -> torch.Generator:
    """The random policy of every stochastic method: draws come from a CPU generator seeded with
    `seed` and are moved to the images' device, so a seed gives the same maps on every device.
    seed=None seeds it from the operating system (never from torch's global RNG): not reproducible."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def resolve_baseline(x: Tensor, baseline: float | str | Tensor, *, seed: int | None = 0,
                     blur_sigma: float | None = None) -> Tensor:
    """The reference input of `x` (B, C, H, W), as a 4-D tensor broadcastable to it (first dim B or 1).

    A number (0.0 = the normalisation mean, grey) or "zeros" (0.0); "mean": per-image
    per-channel mean; "blur": `gaussian_blur` with `blur_sigma` (None = `default_blur_sigma`);
    "uniform": uniform noise in each image's per-channel [min, max], one pattern (C, H, W) drawn
    with `seeded_rng(seed)` and shared by all images (an image's baseline does not depend on the
    batch); a tensor broadcastable to the images. The same names mean the same in every method.
    """
    check_baseline("baseline", baseline, None)
    if isinstance(baseline, str):
        if baseline == "blur":
            return gaussian_blur(x, default_blur_sigma(x.shape[-2:]) if blur_sigma is None else float(blur_sigma))
        if baseline == "mean":
            return x.mean(dim=(2, 3), keepdim=True)
        if baseline == "uniform":
            lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
            noise = torch.rand(tuple(x.shape[1:]), generator=seeded_rng(seed), dtype=torch.float32)
            return lo + (hi - lo) * noise.to(device=x.device, dtype=x.dtype)
        baseline = 0.0
    ref = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        fits = torch.broadcast_shapes(ref.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"baseline of shape {tuple(ref.shape)} does not broadcast to images {tuple(x.shape)}")
    return ref.reshape((1,) * (4 - ref.dim()) + tuple(ref.shape))


def rows(ref: Tensor, index: Tensor | slice) -> Tensor:
    """Rows `index` of a per-image tensor, or the tensor itself when it is shared (first dim 1)."""
    return ref[index] if ref.shape[0] > 1 else ref


def completeness_gap(attribution: Tensor, score: Tensor, reference_score: Tensor) -> Tensor:
    """Relative completeness (summation-to-delta) error per image (B,) of (B, C, H, W) maps:
    (sum(map) - (S(x) - S(x0))) / |S(x) - S(x0)|; not finite where S(x) = S(x0)."""
    delta = score - reference_score
    return (attribution.sum(dim=(1, 2, 3)) - delta) / delta.abs()


def spd_solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """Solve matrix @ X = rhs for batches of symmetric positive definite matrices, by Cholesky.

    Not ``torch.linalg.solve``: its batched LU fails on CPU with more than one thread for
    matrices of about 192 rows and more (oneMKL "DLASWP" error, torch 2.14)."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if bool((info > 0).any()):
        raise ValueError("the matrix to solve is not positive definite")
    return torch.cholesky_solve(rhs, chol)


def grad_rows(
    fn: Callable[[Tensor, Tensor], tuple[Tensor, ...]], values: Tensor, index: Tensor, chunk: int
) -> tuple[Tensor, list[Tensor]]:
    """Gradients of ``fn(leaf, i)[0].sum()`` w.r.t. the rows ``values[i]``, `chunk` rows at a time.

    `fn` returns a loss per row and any further per-row tensors. Returns the gradient (shape of
    `values`, zero outside `index`) and, per output of `fn`, its detached values for `index`.
    Rows must be independent (each loss depends on its own row only).
    """
    grad = torch.zeros_like(values)
    outputs: list[list[Tensor]] = []
    with torch.inference_mode(False), torch.enable_grad():
        for part in batched(index.numel(), chunk):
            i = index[part]
            leaf = values[i].detach().requires_grad_(True)
            out = fn(leaf, i)
            (grad[i],) = torch.autograd.grad(out[0].sum(), leaf)
            outputs.append([o.detach() for o in out])
    return grad, [torch.cat(column) for column in zip(*outputs)]


def batched(n: int, internal_batch: int) -> Iterator[slice]:
    """Slices 0..n in chunks of at most `internal_batch` (memory bound for forward passes)."""
    if isinstance(internal_batch, bool) or not isinstance(internal_batch, numbers.Integral) or internal_batch < 1:
        raise ValueError(f"internal_batch must be a positive int, got {internal_batch!r}")
    for start in range(0, n, internal_batch):
        yield slice(start, min(start + internal_batch, n))


def progress_bar(iterable: Any, enabled: bool, total: int | None = None, desc: str | None = None) -> Any:
    """Wrap `iterable` in a tqdm bar when `enabled` and tqdm is importable; else return it unchanged."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)
