"""DeepLIFT (Shrikumar, Greenside & Kundaje 2017): Rescale and RevealCancel rules.

One forward pass on the paired batch ``[x; x0]`` (2B rows: the images, then
their baselines) and one backward pass of the images' target logits give the
multipliers m of every input element; the map is ``(x - x0) * m``. Within the
pass a `torch.overrides.TorchFunctionMode` sees every torch call the model
makes, module or functional, so:

* every call of an elementwise nonlinearity (``nn.ReLU`` and its functional
  forms, sigmoid, tanh, GELU, ELU, ... see `_ELEMENTWISE`) is replaced by an
  autograd function whose forward value is unchanged and whose backward uses
  the DeepLIFT multiplier dy/dx = (f(x) - f(x0)) / (x - x0) of that call,
  computed from the paired rows, in float64 for smooth functions (where
  |x - x0| is at most the dtype's machine epsilon, 1.2e-7 for float32, the
  local gradient at x is used, as in Captum; the original uses the gradient
  at x0 below its NEAR_ZERO_THRESHOLD of 1e-7).
  A module that runs several times per forward (torchvision ResNet's
  ``BasicBlock.relu``) simply gets one rule per call; functional and in-place
  calls (``F.relu(x, inplace=True)``, ``x.relu_()``) are covered as well;
* max pooling gets the rule of `_MaxRule` (below), which keeps
  summation-to-delta exact also when the winner of a window differs between
  x and x0 and when windows overlap (ResNet's 3x3/2 stem pool);
* everything else keeps its gradient. Affine operations (convolutions,
  linear layers, eval-mode BatchNorm, additions such as ResNet's functional
  ``out += identity``, average pooling, reshapes) have their gradient as
  their exact multiplier, so for a network built of affine maps, elementwise
  nonlinearities and max pooling, ``sum(map) = S(x) - S(x0)`` holds to
  rounding (see `deeplift_delta`). Other nonlinear operations (LayerNorm,
  softmax attention, products of two activations, ops inside TorchScript
  code) pass their gradient, as in Captum, and summation-to-delta is then
  only approximate.

RevealCancel needs, at every nonlinearity input z, its positive and negative
parts dz+ (sum of the positive terms that make up dz) and dz- (the negative
ones). The reference implementation (kundajelab/deeplift) propagates them as
a (pos, neg) pair per tensor: a Dense/Conv layer splits its terms
w_ji * dx_i by the sign of each term, using the full difference dx_i of its
input; BatchNorm, pooling, additions, concatenation and reshapes carry the
pair through; a nonlinearity passes on (dy+, dy-). Here the pair is carried
as one extra tensor per activation, A = dz+ - dz- (so dz+ = (dz + A) / 2,
dz- = (dz - A) / 2), computed next to the forward pass by the same mode:
``conv(|dx|, |W|)`` for convolutions and linear layers, ``A * |scale|`` for
BatchNorm, ``A_a + A_b`` for sums, the op itself applied to A for
non-negative structural ops (`_same`), ``dy+ - dy-`` after a nonlinearity,
and |dy| (one atomic term) after max pooling (the reference leaves max
pooling's pair empty, assuming a conv follows) or after any op without a
rule. Autograd back-propagates through A as well; that reproduces the
reference's pos/neg multipliers exactly (on an MLP the test suite checks
this against a direct transcription of the reference's layer rules). Where
dz+ or dz- is about zero its multiplier falls back to the Rescale one (the
reference divides by a pseudocount instead; the term contributes nothing
either way). Captum implements only the Rescale rule. RevealCancel keeps
summation-to-delta exact by construction: dy+ + dy- = dy for any split.

The batch halves never mix (eval mode is required: BatchNorm with batch
statistics would couple x and x0), and only the images' logits are
back-propagated, so the gradient reaching the input's first half is the
multiplier of each image w.r.t. its own baseline.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._checks import Context
from ._core import class_score, completeness_gap, reduce_channels, resolve_baseline, targets, untouched
from ._registry import MethodFn, _check_params, register, spec
from .gradient import BLUR_SIGMA

RULES = ("rescale", "reveal_cancel")

_ABS = "_deeplift_abs"  # tensor attribute holding A = dz+ - dz- (RevealCancel only)


def _near_zero(dtype: torch.dtype) -> float:
    """|x - x0| at or below this counts as no difference (machine epsilon: 1.2e-7 for float32)."""
    return torch.finfo(dtype).eps


def _wide(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Precision in which multipliers of smooth nonlinearities are computed (float64 where the device has it)."""
    return dtype if device.type == "mps" else torch.promote_types(dtype, torch.float64)


def _ratio(num: Tensor, den: Tensor, fallback: Tensor, tol: float | Tensor) -> Tensor:
    """num / den where |den| > tol, else `fallback`."""
    ok = den.abs() > tol
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), fallback)


def _twice(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The same multiplier for both halves of the paired batch."""
    t = t.to(dtype)
    return torch.cat([t, t])


# --------------------------------------------------------------------------- backward rules


def _values_and_slope(z: Tensor, f: Callable[[Tensor], Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """f(z) and the elementwise derivative f'(z), both in `dtype`."""
    with torch.enable_grad():
        zw = z.detach().to(dtype).requires_grad_(True)
        yw = f(zw)
        (slope,) = torch.autograd.grad(yw, zw, torch.ones_like(yw))
    return yw.detach(), slope


class _Rescale(torch.autograd.Function):
    """y = f(z) forward; backward multiplies by (f(x) - f(x0)) / (x - x0), the same for both halves."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: Tensor, f: Callable[[Tensor], Tensor], b: int, wide: torch.dtype
    ) -> Tensor:
        y = f(z.detach())
        zw = z.detach().to(wide)
        yw, slope = _values_and_slope(zw, f, wide)
        m = _ratio(yw[:b] - yw[b:], zw[:b] - zw[b:], slope[:b], _near_zero(z.dtype))
        ctx.m = _twice(m, z.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return grad * ctx.m, None, None, None


class _RevealCancel(torch.autograd.Function):
    """(y, A_y) = (f(z), dy+ - dy-) forward from z and A_z = dz+ - dz-; RevealCancel multipliers backward.

    With P = dz+ and N = dz- (P + N = dz), the paper's
        dy+ = 1/2 (f(x0 + P) - f(x0)) + 1/2 (f(x0 + P + N) - f(x0 + N)),
        dy- = 1/2 (f(x0 + N) - f(x0)) + 1/2 (f(x0 + P + N) - f(x0 + P)),
    m+ = dy+ / P and m- = dy- / N (the Rescale multiplier where P or N is
    about zero: the term then contributes nothing). Backward, the incoming
    multipliers of dy+ and dy- are g_y + g_A and g_y - g_A; times m+ and m-
    they become those of P and N, returned as gradients of dz = P + N and
    A = P - N.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: Tensor, a: Tensor, f: Callable[[Tensor], Tensor], b: int, wide: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        y = f(z.detach())
        zw = z.detach().to(wide)
        yw, slope = _values_and_slope(zw, f, wide)
        z0, fx, f0 = zw[b:], yw[:b], yw[b:]
        dz = zw[:b] - z0
        amount = a.detach()[:b].to(wide)
        pos, neg = (dz + amount) / 2, (dz - amount) / 2
        with torch.no_grad():
            f_pos, f_neg = f(z0 + pos), f(z0 + neg)
        dy_pos = ((f_pos - f0) + (fx - f_neg)) / 2
        dy_neg = ((f_neg - f0) + (fx - f_pos)) / 2
        eps = _near_zero(z.dtype)
        rescale = _ratio(fx - f0, dz, slope[:b], eps)
        tol = eps * (1 + 16 * amount)  # A carries the rounding of every term it sums
        ctx.m_pos = _twice(_ratio(dy_pos, pos, rescale, tol), z.dtype)
        ctx.m_neg = _twice(_ratio(dy_neg, neg, rescale, tol), z.dtype)
        a_y = torch.cat([dy_pos - dy_neg, torch.zeros_like(dy_pos)]).to(z.dtype)
        return y, a_y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_a: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g_pos = (grad_y + grad_a) * ctx.m_pos
        g_neg = (grad_y - grad_a) * ctx.m_neg
        return (g_pos + g_neg) / 2, (g_pos - g_neg) / 2, None, None, None


class _MaxRule(torch.autograd.Function):
    """Max pooling (any selection op) with a rule that keeps summation-to-delta exact.

    Per window with outputs y (image) and y0 (baseline) and top = max(y, y0):
    the rise top - y0 is credited to the window's winner in x, the fall
    y - top (<= 0) to its winner in x0 (Captum's maxpool rule), so the credits
    of a window add up to y - y0. Each input element's multiplier is its
    total credit (summed over all windows it wins, so overlapping windows
    work) divided by its own x - x0, which is never zero where a credit is
    not zero (the plain gradient is used there). The original DeepLIFT uses
    the plain gradient for max pooling, which breaks summation-to-delta
    whenever a window's winner changes between x and x0.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, pool: Callable[[Tensor], Tensor], b: int) -> Tensor:  # type: ignore[override]
        with torch.enable_grad():
            zc = z.detach().clone().requires_grad_(True)
            yc = pool(zc)
        y = yc.detach()
        top = torch.maximum(y[:b], y[b:])
        ctx.graph = (zc, yc)
        ctx.rise, ctx.fall = top - y[b:], y[:b] - top
        ctx.dz = zc.detach()[:b] - zc.detach()[b:]
        ctx.b = b
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        zc, yc = ctx.graph
        g = grad[: ctx.b]
        (credit,) = torch.autograd.grad(yc, zc, torch.cat([g * ctx.rise, g * ctx.fall]), retain_graph=True)
        (plain,) = torch.autograd.grad(yc, zc, torch.cat([g, torch.zeros_like(g)]), retain_graph=True)
        m = _ratio(credit[: ctx.b] + credit[ctx.b :], ctx.dz, plain[: ctx.b], _near_zero(ctx.dz.dtype))
        return torch.cat([m, torch.zeros_like(m)]), None, None


# --------------------------------------------------------------------------- which torch calls get which rule


def _existing(*names: str) -> list[Any]:
    """The callables named "module.attr" that this torch version has."""
    roots = {"torch": torch, "F": F, "Tensor": torch.Tensor}
    found = []
    for name in names:
        root, _, attr = name.partition(".")
        obj = getattr(roots[root], attr, None)
        if obj is not None:
            found.append(obj)
    return found


# Elementwise nonlinearities: call -> out-of-place function taking the same arguments, and
# whether the call itself works in place.
_ELEMENTWISE: dict[Any, tuple[Any, bool]] = {}
for _name in ("relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "softplus",
              "hardtanh", "hardsigmoid", "hardswish", "logsigmoid", "softsign", "sigmoid", "tanh", "threshold"):
    for _fn in _existing(f"F.{_name}"):
        _ELEMENTWISE[_fn] = (_fn, False)
for _name in ("relu", "sigmoid", "tanh", "selu", "celu", "clamp", "clip", "clamp_min", "clamp_max"):
    for _fn in _existing(f"torch.{_name}", f"Tensor.{_name}"):
        _ELEMENTWISE[_fn] = (_fn, False)
    for _fn in _existing(f"torch.{_name}_", f"Tensor.{_name}_"):
        _ELEMENTWISE[_fn] = (getattr(torch, _name), True)
for _name in ("elu", "leaky_relu", "hardtanh", "threshold"):
    for _fn in _existing(f"F.{_name}_"):
        _ELEMENTWISE[_fn] = (getattr(F, _name), True)

# Piecewise-linear ones: (f(x) - f(x0)) / (x - x0) is exact in the model's precision.
_PIECEWISE_LINEAR = set(_existing("F.relu", "torch.relu", "Tensor.relu", "F.relu6", "F.leaky_relu", "F.hardtanh",
                                  "F.threshold", "torch.clamp", "Tensor.clamp", "torch.clip", "Tensor.clip",
                                  "torch.clamp_min", "Tensor.clamp_min", "torch.clamp_max", "Tensor.clamp_max"))

_MAX_POOLS = set(_existing("F.max_pool1d", "F.max_pool2d", "F.max_pool3d",
                           "F.adaptive_max_pool1d", "F.adaptive_max_pool2d", "F.adaptive_max_pool3d"))


@functools.lru_cache(maxsize=None)
def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _bound(fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> inspect.BoundArguments | None:
    sig = _signature(fn)
    if sig is None:
        return None
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound


def _out_of_place(
    fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
    """Arguments of `fn` with ``inplace=False`` and whether ``inplace=True`` was asked."""
    sig = _signature(fn)
    if sig is None or "inplace" not in sig.parameters:
        return args, kwargs, False
    bound = sig.bind(*args, **kwargs)
    inplace = bool(bound.arguments.get("inplace", False))
    bound.arguments["inplace"] = False
    return bound.args, bound.kwargs, inplace


def _depends(value: Any) -> bool:
    """Whether `value` (possibly a list/tuple) holds a tensor computed from the input (it requires grad)."""
    if isinstance(value, Tensor):
        return value.requires_grad
    if isinstance(value, (list, tuple)):
        return any(_depends(v) for v in value)
    return False


class _NoRule(Exception):
    """Raised by an A-rule that does not apply to a call (the output then becomes one atomic term)."""


def _atomise(t: Tensor, b: int) -> Tensor:
    """A = |x - x0| of `t` as one term per element (its gradient flows to the image half with sign(x - x0))."""
    d = t[:b] - t[b:].detach()
    return torch.cat([torch.sign(d.detach()) * d, torch.zeros_like(d)])


class _Pairing(TorchFunctionMode):
    """Within this mode, a forward pass of the paired batch [x; x0] builds the DeepLIFT backward."""

    def __init__(self, batch: int, reveal: bool, wide: torch.dtype) -> None:
        super().__init__()
        self.b = batch
        self.reveal = reveal
        self.wide = wide

    # ---- helpers

    def _paired(self, t: Tensor, what: str) -> None:
        if t.dim() == 0 or t.shape[0] != 2 * self.b:
            raise ValueError(
                f"deeplift pairs each image with its baseline along the batch dimension ({2 * self.b} rows), "
                f"but a {what} call received a tensor of shape {tuple(t.shape)}; models that move or merge "
                "the batch dimension are not supported"
            )

    def abs_of(self, t: Tensor) -> Tensor:
        """A of an input-dependent tensor: the tracked one, or |x - x0| (one atomic term) if none is tracked."""
        a = getattr(t, _ABS, None)
        if isinstance(a, Tensor) and a.shape == t.shape:
            return a
        if t.dim() == 0 or t.shape[0] != 2 * self.b:
            raise _NoRule
        return _atomise(t, self.b)

    def atomise(self, t: Tensor) -> Tensor:
        if t.dim() == 0 or t.shape[0] != 2 * self.b:
            raise _NoRule
        return _atomise(t, self.b)

    # ---- the dispatcher

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in _ELEMENTWISE and torch.is_grad_enabled():
            return self._elementwise(func, args, kwargs)
        if func in _MAX_POOLS and torch.is_grad_enabled():
            return self._max_pool(func, args, kwargs)
        if func is F.batch_norm:
            bound = _bound(F.batch_norm, args, kwargs)
            if bound is not None and (bound.arguments["training"] or bound.arguments["running_mean"] is None):
                raise ValueError(
                    "deeplift needs BatchNorm to use running statistics (batch statistics would mix each image "
                    "with the baselines); this model normalises with batch statistics even in eval mode "
                    "(track_running_stats=False)"
                )
        out = func(*args, **kwargs)
        if self.reveal and torch.is_grad_enabled():
            self._track(func, args, kwargs, out)
        return out

    def _elementwise(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plain, inplace = _ELEMENTWISE[func]
        call_args, call_kwargs, asked = _out_of_place(plain, args, kwargs)
        if not call_args and "input" in call_kwargs:
            call_kwargs = dict(call_kwargs)
            call_args = (call_kwargs.pop("input"),)
        z, rest = call_args[0] if call_args else None, call_args[1:]
        if not isinstance(z, Tensor) or not z.requires_grad or _depends(rest) or _depends(list(call_kwargs.values())):
            return func(*args, **kwargs)  # a constant, or a function of two input-dependent tensors
        self._paired(z, getattr(func, "__name__", str(func)))
        f = functools.partial(_apply, plain, rest, call_kwargs)
        wide = z.dtype if plain in _PIECEWISE_LINEAR else self.wide
        a_y = None
        if self.reveal:
            a_z = self.abs_of(z)
            y, a_y = _RevealCancel.apply(z, a_z, f, self.b, wide)
        else:
            y = _Rescale.apply(z, f, self.b, wide)
        if inplace or asked:
            z.copy_(y)
            y = z
        if a_y is not None:
            setattr(y, _ABS, a_y)
        return y

    def _max_pool(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        z = args[0] if args else kwargs.get("input")
        if not isinstance(z, Tensor) or not z.requires_grad:
            return func(*args, **kwargs)
        self._paired(z, getattr(func, "__name__", "max_pool"))
        rest = args[1:]
        kw = {k: v for k, v in kwargs.items() if k != "input"}
        extra: list[Any] = []  # what the call returns besides the pooled values (indices)
        y = _MaxRule.apply(z, functools.partial(_first, func, rest, kw, extra), self.b)
        if self.reveal:
            setattr(y, _ABS, _atomise(y, self.b))
        return (y, *extra) if extra else y

    def _track(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Attach A to the input-dependent outputs of an ordinary call (RevealCancel)."""
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if not any(isinstance(o, Tensor) and o.requires_grad for o in outs):
            if func is Tensor.__setitem__ and args and isinstance(args[0], Tensor) and args[0].requires_grad:
                outs = [args[0]]  # written in place: its old A no longer holds
            else:
                return
        rule = _ABS_RULES.get(func)
        result = None
        if rule is not None:
            try:
                result = rule(self, func, args, kwargs)
            except _NoRule:
                result = None
        results = list(result) if isinstance(result, (tuple, list)) else [result] * len(outs)
        for o, a in zip(outs, results):
            if not (isinstance(o, Tensor) and o.requires_grad):
                continue
            if not (isinstance(a, Tensor) and a.shape == o.shape):
                try:
                    a = self.atomise(o)
                except _NoRule:
                    a = None
            if a is not None:
                setattr(o, _ABS, a)
            elif hasattr(o, _ABS):
                delattr(o, _ABS)


def _apply(fn: Any, rest: tuple[Any, ...], kwargs: Mapping[str, Any], t: Tensor) -> Tensor:
    return fn(t, *rest, **kwargs)


def _first(fn: Any, rest: tuple[Any, ...], kwargs: Mapping[str, Any], extra: list[Any], t: Tensor) -> Tensor:
    """The pooled values of ``fn(t, ...)``; anything else it returns (indices) goes to `extra`."""
    out = fn(t, *rest, **kwargs)
    if isinstance(out, (tuple, list)):
        extra[:] = list(out[1:])
        return out[0]
    return out


# --------------------------------------------------------------------------- A-rules (RevealCancel)
# rule(mode, func, args, kwargs) -> A of the output (tensor or tuple of tensors); raise _NoRule if it does not apply.


def _swap(mode: _Pairing, value: Any) -> Any:
    """Input-dependent tensors -> their A; other float tensors -> zeros (they carry no difference)."""
    if isinstance(value, Tensor):
        if value.requires_grad:
            return mode.abs_of(value)
        return torch.zeros_like(value) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_swap(mode, v) for v in value)
    return value


def _same(mode: _Pairing, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Ops whose coefficients are all >= 0 (reshapes, sums, means, average pooling, concatenation, ...)."""
    return func(*_swap(mode, args), **{k: _swap(mode, v) for k, v in kwargs.items()})


def _operands(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    first = args[0] if args else kwargs.get("input")
    second = args[1] if len(args) > 1 else kwargs.get("other")
    return first, second


def _abs_or_zero(mode: _Pairing, value: Any) -> Any:
    return mode.abs_of(value) if isinstance(value, Tensor) and value.requires_grad else 0


def _add_sub(mode: _Pairing, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """a + alpha * b and a - alpha * b: A = A_a + |alpha| A_b (constants carry no difference)."""
    a, b = _operands(args, kwargs)
    alpha = abs(kwargs.get("alpha", 1))
    out = _abs_or_zero(mode, a) + alpha * _abs_or_zero(mode, b)
    if not isinstance(out, Tensor):
        raise _NoRule
    return out


def _neg(mode: _Pairing, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return mode.abs_of(_operands(args, kwargs)[0])


def _mul(mode: _Pairing, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """Scaling by a constant c: A * |c|. A product of two input-dependent tensors has no rule."""
    a, b = _operands(args, kwargs)
    if _depends(a) == _depends(b):
        raise _NoRule
    var, const = (a, b) if _depends(a) else (b, a)
    if not isinstance(const, (Tensor, numbers.Number)) or isinstance(const, bool):
        raise _NoRule
    return mode.abs_of(var) * abs(const)


def _div(mode: _Pairing, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    a, b = _operands(args, kwargs)
    if kwargs.get("rounding_mode") is not None or not _depends(a) or _depends(b):
        raise _NoRule
    if not isinstance(b, (Tensor, numbers.Number)) or isinstance(b, bool):
        raise _NoRule
    return mode.abs_of(a) / abs(b)


def _weighted(mode: _Pairing, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """conv*/conv_transpose*/linear: the reference's Dense/Conv rule, terms w_ji * dx_i split by their own sign:
    A = op(|dx|, |W|) (bias dropped), with dx the full difference of the layer's input."""
    rest, kw = list(args), dict(kwargs)
    x = rest.pop(0) if rest else kw.pop("input")
    weight = rest.pop(0) if rest else kw.pop("weight")
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or _depends(weight):
        raise _NoRule
    if rest:
        rest[0] = None  # bias
    kw.pop("bias", None)
    return func(mode.atomise(x), weight.abs(), *rest, **kw)


def _matmul(mode: _Pairing, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    a, b = _operands(args, kwargs)
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or _depends(a) == _depends(b):
        raise _NoRule
    if _depends(a):
        return torch.matmul(mode.atomise(a), b.abs())
    return torch.matmul(a.abs(), mode.atomise(b))


def _batch_norm(mode: _Pairing, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """Eval-mode BatchNorm is x * s + c per channel: A * |s|."""
    bound = _bound(F.batch_norm, args, kwargs)
    if bound is None:
        raise _NoRule
    p = bound.arguments
    x, mean, var, weight = p["input"], p["running_mean"], p["running_var"], p["weight"]
    if mean is None or var is None or p["training"] or _depends([mean, var, weight, p["bias"]]):
        raise _NoRule
    return F.batch_norm(mode.abs_of(x), torch.zeros_like(mean), var, None if weight is None else weight.abs(),
                        None, False, 0.0, p["eps"])


def _pad(mode: _Pairing, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    bound = _bound(F.pad, args, kwargs)
    if bound is None:
        raise _NoRule
    p = bound.arguments
    return F.pad(mode.abs_of(p["input"]), p["pad"], p["mode"], 0.0 if p["mode"] == "constant" else None)


def _interpolate(mode: _Pairing, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    bound = _bound(F.interpolate, args, kwargs)
    if bound is None or bound.arguments["mode"] == "bicubic":  # bicubic weights can be negative
        raise _NoRule
    return _same(mode, func, args, kwargs)


_ABS_RULES: dict[Any, Callable[..., Any]] = {}
for _fn in _existing(
    "Tensor.view", "Tensor.view_as", "Tensor.reshape", "Tensor.reshape_as", "torch.reshape", "Tensor.flatten",
    "torch.flatten", "Tensor.unflatten", "torch.unflatten", "Tensor.permute", "torch.permute", "Tensor.transpose",
    "torch.transpose", "Tensor.contiguous", "Tensor.clone", "torch.clone", "Tensor.squeeze", "torch.squeeze",
    "Tensor.unsqueeze", "torch.unsqueeze", "Tensor.expand", "Tensor.expand_as", "Tensor.__getitem__", "torch.cat",
    "torch.concat", "torch.concatenate", "torch.stack", "torch.split", "Tensor.split", "torch.chunk",
    "Tensor.chunk", "torch.narrow", "Tensor.narrow", "torch.flip", "Tensor.flip", "torch.roll", "Tensor.roll",
    "Tensor.repeat", "torch.tile", "Tensor.tile", "torch.mean", "Tensor.mean", "torch.sum", "Tensor.sum",
    "F.avg_pool1d", "F.avg_pool2d", "F.avg_pool3d", "F.adaptive_avg_pool1d", "F.adaptive_avg_pool2d",
    "F.adaptive_avg_pool3d", "F.dropout", "F.dropout1d", "F.dropout2d", "F.dropout3d", "F.pixel_shuffle",
    "F.pixel_unshuffle", "Tensor.to", "Tensor.float", "Tensor.double", "Tensor.half", "Tensor.type_as",
):
    _ABS_RULES[_fn] = _same
for _fn in _existing("torch.add", "Tensor.add", "Tensor.add_", "Tensor.__add__", "Tensor.__radd__", "Tensor.__iadd__",
                     "torch.sub", "Tensor.sub", "Tensor.sub_", "Tensor.__sub__", "Tensor.__rsub__", "Tensor.__isub__",
                     "torch.subtract", "Tensor.subtract"):
    _ABS_RULES[_fn] = _add_sub
for _fn in _existing("torch.neg", "Tensor.neg", "Tensor.__neg__", "torch.negative"):
    _ABS_RULES[_fn] = _neg
for _fn in _existing("torch.mul", "Tensor.mul", "Tensor.mul_", "Tensor.__mul__", "Tensor.__rmul__", "Tensor.__imul__",
                     "torch.multiply"):
    _ABS_RULES[_fn] = _mul
for _fn in _existing("torch.div", "Tensor.div", "Tensor.div_", "Tensor.__truediv__", "Tensor.__itruediv__",
                     "torch.divide", "torch.true_divide"):
    _ABS_RULES[_fn] = _div
for _fn in _existing("F.linear", "F.conv1d", "F.conv2d", "F.conv3d",
                     "F.conv_transpose1d", "F.conv_transpose2d", "F.conv_transpose3d"):
    _ABS_RULES[_fn] = _weighted
for _fn in _existing("torch.matmul", "Tensor.matmul", "Tensor.__matmul__"):
    _ABS_RULES[_fn] = _matmul
_ABS_RULES[F.batch_norm] = _batch_norm
_ABS_RULES[F.pad] = _pad
_ABS_RULES[F.interpolate] = _interpolate


# --------------------------------------------------------------------------- the method


class DeepLiftResult(NamedTuple):
    """All tensors detached, in the model's dtype."""

    attribution: Tensor  # (B, C, H, W): (x - x0) * multipliers
    target: Tensor  # (B,)
    baseline: Tensor  # (B, C, H, W) the reference x0
    score: Tensor  # (B,) S(x), the target logit of the image
    reference_score: Tensor  # (B,) S(x0), the target logit of the baseline


def deeplift_attribution(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    rule: str = "rescale",
    baseline: float | str | Tensor = "zeros",
    blur_sigma: float | None = None,
) -> DeepLiftResult:
    """DeepLIFT attribution of every input element, with the logits of both halves (see the module doc)."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not valid; choose one of {RULES}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:5]) + (" ..." if len(training) > 5 else "")
        raise ValueError(
            f"deeplift needs the model in eval mode (call model.eval() first): modules in training mode: {shown}; "
            "in training mode BatchNorm would mix each image with the baselines and dropout would differ between them"
        )
    b = images.shape[0]
    with torch.inference_mode(False), torch.enable_grad(), untouched(model):
        x = images.detach().clone()
        ref = resolve_baseline(x, baseline, blur_sigma=blur_sigma).to(dtype=x.dtype).expand_as(x).clone()
        x.requires_grad_(True)
        paired = torch.cat([x, ref])
        reveal = rule == "reveal_cancel"
        if reveal:
            setattr(paired, _ABS, _atomise(paired, b))
        with _Pairing(b, reveal, _wide(x.dtype, x.device)):
            logits = model(paired)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != 2 * b:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"model output must be logits of shape (B, classes), got {shape}")
        t = targets(logits[:b], target, b, x.device)
        score = class_score(logits[:b], t)
        (multipliers,) = torch.autograd.grad(score.sum(), x)
    return DeepLiftResult(
        attribution=((x - ref) * multipliers).detach(),
        target=t,
        baseline=ref,
        score=score.detach(),
        reference_score=class_score(logits[b:], t).detach(),
    )


def _cost(forward: int, backward: int) -> Callable[[Mapping[str, Any], tuple[int, int]], tuple[int, int]]:
    def cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
        return (forward, backward)

    cost.__doc__ = f"Image and baseline run as one batch: {forward} forward, {backward} backward passes per image."
    return cost


def _rule_variant(name: str, rule: str, doc: str) -> MethodFn:
    """Define and register a DeepLIFT rule (the registry reads the parameters from the signature,
    so it is written once here)."""

    def method(
        model: nn.Module,
        images: Tensor,
        target: Any,
        *,
        baseline: float | str | Tensor = "zeros",
        blur_sigma: float | None = None,
        reduce: str | None = "sum",
    ) -> Tensor:
        out = deeplift_attribution(model, images, target, rule=rule, baseline=baseline, blur_sigma=blur_sigma)
        return reduce_channels(out.attribution, reduce)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    return register(name, category="gradient", cost=_cost(2, 2), checks={"blur_sigma": BLUR_SIGMA})(method)


deeplift = _rule_variant("deeplift", "rescale", """DeepLIFT (Shrikumar et al. 2017): (x - x0) times multipliers with (f(x) - f(x0)) / (x - x0) at each nonlinearity.

    Every call of an elementwise nonlinearity (modules reused within a
    forward pass and functional calls included) back-propagates the ratio of
    its output and input differences between the image and the baseline;
    max pooling uses Captum's rule (credits to the winners in x and x0),
    everything else its gradient. For networks of affine maps, elementwise
    nonlinearities and max pooling the map sums to S(x) - S(x0) exactly
    (summation-to-delta, see `deeplift_delta`). One forward pass of image
    and baseline together, one backward pass; the model must be in eval mode.
    baseline x0: "zeros" (default: 0 in normalised space, the dataset mean
    colour), a number, a tensor broadcastable to the images (each image gets
    its own row), "mean" (per-image per-channel mean), "blur" (the shared Gaussian of
    `blur_sigma` pixels, None = 10 * min(H, W) / 224) or "uniform" (seed 0), as
    `_core.resolve_baseline`. reduce: "sum" (default,
    keeps summation-to-delta), "abs_sum", "max_abs" or None for (B, C, H, W).
    """)

deeplift_revealcancel = _rule_variant("deeplift_revealcancel", "reveal_cancel", """DeepLIFT RevealCancel (Shrikumar et al. 2017): DeepLIFT with own multipliers for positive and negative terms.

    At a nonlinearity with input difference dz = dz+ + dz- (the sums of its
    positive and of its negative terms), dy+ = 1/2 (f(x0 + dz+) - f(x0)) +
    1/2 (f(x0 + dz+ + dz-) - f(x0 + dz-)), dy- likewise, and the multipliers
    are dy+ / dz+ and dy- / dz-; dz+ and dz- are propagated alongside the
    forward pass as in the reference implementation (terms of conv/linear
    layers split by sign; see the module doc). Captum has no RevealCancel.
    Summation-to-delta holds as for `deeplift`; about twice its cost.
    Parameters as for `deeplift`.
    """)


def deeplift_delta(model: nn.Module, images: Tensor, target: Any = None, *, method: str = "deeplift",
                   **params: Any) -> Tensor:
    """Relative summation-to-delta error per image (B,), in the model's precision:
    (sum(map) - (S(x) - S(x0))) / |S(x) - S(x0)|, for `method` "deeplift" or
    "deeplift_revealcancel" with `params` (its defaults otherwise). Leaves the
    model untouched."""
    if method not in ("deeplift", "deeplift_revealcancel"):
        raise ValueError(f"method={method!r} is not valid; choose 'deeplift' or 'deeplift_revealcancel'")
    s = spec(method)
    _check_params(s, params, Context(size=tuple(images.shape[-2:]), model=model))
    kwargs = {**s.defaults, **params}
    kwargs.pop("reduce")
    rule = "rescale" if method == "deeplift" else "reveal_cancel"
    out = deeplift_attribution(model, images, target, rule=rule, **kwargs)
    return completeness_gap(out.attribution, out.score, out.reference_score)
