"""Modified backward passes: replace the gradient rule of chosen module types.

`backward_rules` is a context manager (hook scope) that, for every module of
the given types, registers a forward hook replacing the module's output by
the output of `_RuleFunction`: the same values forward, but a backward that
calls ``rule(x, y, grad_y) -> grad_x`` instead of the module's own gradient.
Because the hook fires on every call, a module that runs several times per
forward pass (torchvision ResNet's ``relu``) gets the rule on each call.
All hooks are removed on exit, also on error.

Only modules can be hooked: a functional call (``torch.relu(x)``,
``F.relu(x)`` inside ``forward``) keeps its ordinary gradient. The scope
reports how many hooked calls ran, so a method can warn when none did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._core import hooks

# rule(module input x, module output y, gradient w.r.t. y) -> gradient w.r.t. x
Rule = Callable[[Tensor, Tensor, Tensor], Tensor]


def deconvnet_rule(x: Tensor, y: Tensor, grad: Tensor) -> Tensor:
    """DeconvNet ReLU (Zeiler & Fergus 2014): ReLU of the incoming gradient, ignoring the forward mask."""
    return grad.clamp_min(0)


def guided_rule(x: Tensor, y: Tensor, grad: Tensor) -> Tensor:
    """Guided backprop ReLU (Springenberg et al. 2015): grad * (x > 0) * (grad > 0)."""
    return grad.clamp_min(0).masked_fill_(~(x > 0), 0)  # one new tensor; the mask is the forward ReLU's


class _RuleFunction(torch.autograd.Function):
    """Identity on the module's output forward; `rule` backward, to the module's input."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, rule: Rule) -> Tensor:  # type: ignore[override]
        ctx.rule = rule
        ctx.save_for_backward(x, y)
        return y.view_as(y)  # no copy: a view that autograd gives this function as its grad_fn

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        return ctx.rule(x, y, grad), None, None


class RuleScope:
    """What `backward_rules` yields: the number of hooked module calls so far."""

    def __init__(self) -> None:
        self.calls = 0


@contextlib.contextmanager
def backward_rules(model: nn.Module, rules: Mapping[type[nn.Module], Rule]) -> Iterator[RuleScope]:
    """Within the scope, every module of `model` that is an instance of a key
    of `rules` back-propagates with that rule (its forward values unchanged).

    Use inside `untouched(model)` (in-place flags off). With an in-place ReLU
    the saved input already holds ReLU(x); ``ReLU(x) > 0`` iff ``x > 0``, so
    the two rules above stay right even then.
    """
    scope = RuleScope()
    kinds = tuple(rules)

    def make_hook(rule: Rule) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
                return None
            scope.calls += 1
            if not torch.is_grad_enabled():
                return None
            return _RuleFunction.apply(inputs[0], output.detach(), rule)

        return hook

    with hooks() as handles:
        for module in model.modules():
            for kind in kinds:
                if isinstance(module, kind):
                    handles.append(module.register_forward_hook(make_hook(rules[kind])))
                    break
        yield scope
