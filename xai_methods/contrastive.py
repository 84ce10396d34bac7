"""Contrastive methods: "why the target, and not the contrast class?"

- `contrastive_gradcam` (Prabhushankar et al. 2020): Grad-CAM of the loss between the
  network's output and the contrast class, one backward pass.
- `cem_pp`, `cem_pn` (Dhurandhar et al. 2018, the Contrastive Explanation Method):
  pertinent positives (the least of the input that alone keeps the target) and
  pertinent negatives (the least addition that makes the contrast class win), by
  projected FISTA on the paper's elastic-net objective with a bisection over `c`.
- `cdeepex` (Feghahati et al. 2020): the nearest point of a generative model's latent
  space that the classifier gives to the contrast class while staying ambiguous between
  the two; the map is the difference of the two decoded images.

The contrast class comes as ``contrast=`` (B,); ``None`` means the best-scoring class
other than the target (the runner-up of the prediction). `cem_pp` asks only "what is
enough for the target?" and takes no contrast (its hinge is against every other class,
as in the paper).

CEM works in the data range: inputs are normalised images, and a model with a
``preprocess`` attribute (``mean``, ``std``, as every `zoo` model has) maps them back to
pixels in [0, 1], where 0 is "absent" (the paper's convention for MNIST); without it the
inputs are taken as pixels in [0, 1] already. Optimisation outcomes (the perturbed
inputs, decoded images, success flags) go to an optional ``report`` callable, as for the
optimisation-based perturbation methods.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as C
from ._core import batched, contrasts, forward_logits, grad_rows, progress_bar, reduce_channels, seeded_rng, targets
from ._registry import MethodFn, register
from .cam import Reshape, _gradcam_weights, gradient_cam
from .gradient import one_pass


# --------------------------------------------------------------------------- contrastive Grad-CAM


CONTRAST_LOSSES = ("cross_entropy", "pair")


@register("contrastive_gradcam", category="contrastive", cost=one_pass, checks={"loss": C.one_of(*CONTRAST_LOSSES)})
def contrastive_gradcam(
    model: nn.Module,
    images: Tensor,
    target: Any,
    *,
    layer: nn.Module,
    contrast: Any,
    loss: str = "cross_entropy",
    relu: bool = True,
    upsample: bool = True,
    reshape: Reshape | None = None,
) -> Tensor:
    """Contrastive Grad-CAM (Prabhushankar et al. 2020): Grad-CAM of the loss towards the contrast class.

    The loss J is back-propagated to the layer's activation A in one pass and,
    as in Grad-CAM, the channel weights are the spatial means of dJ/dA; map =
    ReLU(sum_k w_k A_k). `loss="cross_entropy"` (the paper): J = cross-entropy
    of the logits with the contrast as label, dJ/dz = softmax(z) - onehot(contrast),
    so the map shows what the network saw that argues against the contrast
    (the target enters only through the prediction). `loss="pair"`: the
    cross-entropy of the softmax over the target and contrast logits alone,
    dJ/dz = q_t (onehot(target) - onehot(contrast)): evidence for the target
    over the contrast whichever class the network predicts.
    """
    def score(logits: Tensor, t: Tensor) -> Tensor:
        c = contrasts(logits, contrast, t)
        if loss == "pair":
            logits = torch.stack([logits.gather(1, t[:, None])[:, 0], logits.gather(1, c[:, None])[:, 0]], 1)
            c = torch.ones_like(c)
        return F.cross_entropy(logits, c, reduction="none")

    return gradient_cam(
        model, images, target, layer, _gradcam_weights, relu=relu, upsample=upsample, reshape=reshape, score=score
    )


# --------------------------------------------------------------------------- data range


class PixelSpace(NamedTuple):
    """Normalised input = (pixel - mean) / std, per channel; pixels live in [0, 1]."""

    mean: Tensor  # (1, C, 1, 1)
    std: Tensor

    @classmethod
    def of(cls, model: nn.Module, images: Tensor) -> PixelSpace:
        c = images.shape[1]
        pre = getattr(model, "preprocess", None)
        mean, std = (getattr(pre, "mean", None), getattr(pre, "std", None)) if pre is not None else (None, None)
        if mean is None or std is None:
            mean, std = (0.0,) * c, (1.0,) * c
        if len(mean) != c or len(std) != c:
            raise ValueError(
                f"model.preprocess has {len(mean)} channel means for images with {c} channels; "
                "fix the model's preprocess or pass images with matching channels"
            )
        as_tensor = lambda v: torch.tensor(v, dtype=images.dtype, device=images.device).view(1, c, 1, 1)  # noqa: E731
        return cls(as_tensor(mean), as_tensor(std))

    def pixels(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean

    def inputs(self, p: Tensor) -> Tensor:
        return (p - self.mean) / self.std


# --------------------------------------------------------------------------- CEM


def _margin(logits: Tensor, cls: Tensor) -> Tensor:
    """z_cls - max_{i != cls} z_i (B,): > 0 when cls wins."""
    own = logits.gather(1, cls[:, None])[:, 0]
    other = logits.scatter(1, cls[:, None], float("-inf")).amax(1)
    return own - other


def _cem_cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    return (params["c_steps"] * params["steps"] + 1, params["c_steps"] * params["steps"])


def cem(
    model: nn.Module, images: Tensor, target: Any, contrast: Any, *, pertinent: str, kappa: float, beta: float,
    c_init: float, c_steps: int, steps: int, lr: float, gamma: float, autoencoder: Callable[[Tensor], Tensor] | None,
    reduce: str | None, report: Callable[[dict], Any] | None, internal_batch: int, progress: bool,
) -> Tensor:
    """Pertinent positive ("pp") or negative ("pn") of every image, batched; see `cem_pp`."""
    if gamma > 0 and autoencoder is None:
        autoencoder = model.generative.reconstruct  # there, see _check_gamma
    b = images.shape[0]
    space = PixelSpace.of(model, images)
    logits = forward_logits(model, images, internal_batch)
    with torch.inference_mode(False):
        x = images.detach().clone()
        t = targets(logits, target, b, x.device).clone()
        goal = t if pertinent == "pp" else contrasts(logits.clone(), contrast, t).clone()
        p = space.pixels(x).clamp(0.0, 1.0)
        upper = p if pertinent == "pp" else 1.0 - p  # 0 <= delta <= upper

    def model_input(delta: Tensor, i: Tensor) -> Tensor:
        return space.inputs(delta if pertinent == "pp" else p[i] + delta)

    def terms(delta: Tensor, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(hinge, margin of the goal class, gamma * autoencoder error) per image."""
        inputs = model_input(delta, i)
        margin = _margin(model(inputs), goal[i])
        hinge = (kappa - margin).clamp_min(0.0)  # max(max_{j != goal} z_j - z_goal, -kappa) + kappa
        manifold = gamma * (autoencoder(inputs) - inputs).pow(2).flatten(1).sum(1) if gamma > 0 else torch.zeros_like(hinge)
        return hinge, margin, manifold

    def smooth(delta: Tensor, i: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """c * hinge + ||delta||_2^2 + gamma * AE error (the L1 term is the proximal step), margin, AE error."""
        hinge, margin, ae = terms(delta, i)
        return c[i] * hinge + delta.pow(2).flatten(1).sum(1) + ae, margin, ae

    ticks = iter(progress_bar(range(c_steps * steps), progress, total=c_steps * steps, desc=f"cem_{pertinent}"))
    best, best_cost, upper_c, c_now = _c_search(smooth, upper, x, c_init=c_init, c_steps=c_steps, beta=beta, lr=lr,
                                                steps=steps, chunk=internal_batch, tick=lambda: next(ticks, None))
    rows = torch.arange(b, device=x.device)
    success = best_cost.isfinite()
    if report is not None:
        with torch.inference_mode():
            perturbed = model_input(best, rows)
            out_logits = forward_logits(model, perturbed, internal_batch)
        report({
            "delta": best, "perturbed": perturbed, "success": success, "logits": out_logits,
            "class": goal, "c": upper_c.where(success, c_now),
        })
    return reduce_channels(best, reduce)


def _c_search(smooth: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]], upper: Tensor, x: Tensor, *,
              c_init: float, c_steps: int, beta: float, lr: float, steps: int, chunk: int,
              tick: Callable[[], Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CEM's search for the weight c of the hinge, per image: `c_steps` rounds of `_fista`, each followed by
    a bisection (a success makes c smaller, so the perturbation sparser; a failure larger, tenfold until one
    succeeds). Returns the best perturbation, its cost (inf: none found), the smallest successful c and the
    last c tried."""
    lower_c = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    upper_c = torch.full_like(lower_c, float("inf"))
    c_now = torch.full_like(lower_c, float(c_init))
    best = torch.zeros_like(x)
    best_cost = torch.full_like(lower_c, float("inf"))
    with torch.inference_mode(False):
        for _ in range(c_steps):
            found = _fista(lambda leaf, i, c=c_now: smooth(leaf, i, c), upper, beta=beta, lr=lr, steps=steps,
                           chunk=chunk, best=best, best_cost=best_cost, tick=tick)
            upper_c = torch.where(found, torch.minimum(upper_c, c_now), upper_c)
            lower_c = torch.where(found, lower_c, torch.maximum(lower_c, c_now))
            c_now = torch.where(upper_c.isfinite(), (lower_c + upper_c) / 2, c_now * 10)
    return best, best_cost, upper_c, c_now


def _fista(
    smooth: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]], upper: Tensor, *, beta: float, lr: float,
    steps: int, chunk: int, best: Tensor, best_cost: Tensor, tick: Callable[[], Any],
) -> Tensor:
    """One round of CEM's projected FISTA at a fixed c, from delta = 0 in the box [0, upper].

    `smooth(delta, rows)` gives the smooth part of the loss, the goal class's margin and the
    autoencoder term per row. Keeps in `best` / `best_cost` (updated in place) each row's
    feasible iterate (margin > 0) of least elastic-net cost; returns which rows found one.
    """
    rows = torch.arange(upper.shape[0], device=upper.device)
    delta = torch.zeros_like(upper)
    y = delta.clone()
    found = torch.zeros(len(rows), dtype=torch.bool, device=upper.device)
    for k in range(steps):
        tick()
        rate = lr * (1 - k / steps) ** 0.5  # the paper's polynomial decay
        grad, (_, margins, manifold) = grad_rows(smooth, y, rows, chunk)
        # y is in the box (projected); keep it if the class wins at the least cost so far
        cost = beta * y.abs().flatten(1).sum(1) + y.pow(2).flatten(1).sum(1) + manifold
        better = (margins > 0) & (cost < best_cost)
        best[better], best_cost[better] = y[better], cost[better]
        found |= margins > 0
        new = (y - rate * grad - rate * beta).clamp_min(0.0).minimum(upper)  # shrinkage, then projection
        y = (new + k / (k + 3) * (new - delta)).clamp_min(0.0).minimum(upper)
        delta = new
    return found


def _check_gamma(name: str, value: Any, ctx: C.Context) -> None:
    C.number(0.0)(name, value, ctx)
    has_generative = ctx.model is None or getattr(ctx.model, "generative", None) is not None
    if value > 0 and ctx.params.get("autoencoder") is None and not has_generative:
        raise ValueError(
            "gamma > 0 needs an autoencoder: pass autoencoder= (normalised images -> reconstructions) "
            "or use a model with a .generative attribute (zoo's shapes-cnn has one)"
        )


CEM_CHECKS: dict[str, C.Check] = {
    "kappa": C.number(0.0), "beta": C.number(0.0), "c_init": C.number(0.0, low_open=True),
    "c_steps": C.positive_int, "lr": C.number(0.0, low_open=True), "gamma": _check_gamma,
    "autoencoder": C.callable_or_none,
}


def _cem_variant(name: str, pertinent: str, doc: str) -> MethodFn:
    """Define and register `cem_pp` or `cem_pn` (the registry reads the parameters from the signature,
    so it is written once here; the pertinent positive's signature drops `contrast`, see `cem_pp`)."""

    def method(
        model: nn.Module,
        images: Tensor,
        target: Any,
        *,
        contrast: Any = None,
        kappa: float = 0.1,
        beta: float = 0.1,
        c_init: float = 10.0,
        c_steps: int = 5,
        steps: int = 200,
        lr: float = 0.01,
        gamma: float = 0.0,
        autoencoder: Callable[[Tensor], Tensor] | None = None,
        reduce: str | None = "sum",
        report: Callable[[dict], Any] | None = None,
        internal_batch: int = 32,
        progress: bool = False,
    ) -> Tensor:
        return cem(
            model, images, target, contrast, pertinent=pertinent, kappa=kappa, beta=beta, c_init=c_init,
            c_steps=c_steps, steps=steps, lr=lr, gamma=gamma, autoencoder=autoencoder, reduce=reduce,
            report=report, internal_batch=internal_batch, progress=progress,
        )

    if pertinent == "pp":
        signature = inspect.signature(method)
        method.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p for p in signature.parameters.values() if p.name != "contrast"]
        )
    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    return register(name, category="contrastive", cost=_cem_cost, checks=CEM_CHECKS)(method)


cem_pp = _cem_variant("cem_pp", "pp", """CEM pertinent positive (Dhurandhar et al. 2018): the least of the input that alone keeps the target class.

    In pixels p in [0, 1] (see the module docstring), delta with
    0 <= delta <= p minimises c * max(max_{i != t} z_i(delta) - z_t(delta), -kappa)
    + beta ||delta||_1 + ||delta||_2^2 + gamma ||AE(delta) - delta||_2^2, the
    model seeing delta alone (everything else absent = black). Projected FISTA
    (`steps` iterations, step `lr` with the paper's square-root decay, the L1
    term by soft-thresholding), `c_steps` rounds of bisection on c from
    `c_init` (success: c shrinks; failure: c grows tenfold until a success
    brackets it). The answer is the feasible iterate (target wins) of least
    elastic-net cost; none found: zeros and success False. `autoencoder`
    (normalised images -> reconstructions; default the model's
    ``generative.reconstruct`` when `gamma` > 0) keeps delta on the data
    manifold. Map: delta summed over channels (`reduce`; None keeps delta).
    `report` gets {"delta", "perturbed" (the model input of delta alone),
    "success", "logits" (of it), "class" (the target), "c" (the least c that
    succeeded)}. No `contrast`: what is enough for the target is
    contrasted with every other class, as in the paper.
    """)

cem_pn = _cem_variant("cem_pn", "pn", """CEM pertinent negative (Dhurandhar et al. 2018): the least addition to the input that makes the contrast class win.

    In pixels p in [0, 1], delta >= 0 with p + delta <= 1 minimises
    c * max(max_{i != q} z_i(p + delta) - z_q(p + delta), -kappa)
    + beta ||delta||_1 + ||delta||_2^2 + gamma ||AE(p + delta) - (p + delta)||_2^2,
    q the contrast class. The paper's PN asks for any class but the target;
    here the contrast is named (default: the runner-up), so the answer says
    what is missing for that class. Solver, bisection, `report` and map as
    `cem_pp`; "perturbed" is the model input of p + delta and "class" the contrast.
    """)


# --------------------------------------------------------------------------- CDeepEx


def _cdeepex_cost(params: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    return (params["steps"] + 2, params["steps"])


def _check_generator(name: str, value: Any, ctx: C.Context) -> None:
    C.callable_or_none(name, value, ctx)
    if value is None and ctx.model is not None and getattr(ctx.model, "generative", None) is None:
        raise ValueError(
            "cdeepex needs a generative model of the data: pass generator= (latent (N, dim) -> normalised "
            "images) and encoder= or latent_dim=, or use a model with a .generative attribute "
            "(zoo's shapes-cnn carries the shapes VAE)"
        )
    if value is not None and ctx.params.get("encoder") is None and ctx.params.get("latent_dim") is None:
        raise ValueError("cdeepex inverts the generator by optimisation without an encoder: pass latent_dim=")


@register("cdeepex", category="contrastive", cost=_cdeepex_cost, checks={
    "encoder": C.callable_or_none, "latent_dim": C.optional(C.positive_int), "lr": C.number(0.0, low_open=True),
    "margin": C.number(0.0, low_open=True), "penalty": C.number(0.0, low_open=True),
    "inversion_steps": C.positive_int, "generator": _check_generator,
})
def cdeepex(
    model: nn.Module, images: Tensor, target: Any, *, contrast: Any,
    generator: Callable[[Tensor], Tensor] | None = None, encoder: Callable[[Tensor], Tensor] | None = None,
    latent_dim: int | None = None, steps: int = 300, lr: float = 0.05, margin: float = 0.5, penalty: float = 10.0,
    inversion_steps: int = 300, seed: int | None = 0, reduce: str | None = "abs_sum",
    report: Callable[[dict], Any] | None = None, internal_batch: int = 32, progress: bool = False,
) -> Tensor:
    """CDeepEx (Feghahati et al. 2020): the nearest latent point the model gives to the contrast, ambiguously.

    A generative model G (latent z -> normalised image; default the model's
    ``generative``, which zoo's shapes-cnn carries) explains in its own terms:
    z0 = the latent code of the image (`encoder`, else inversion: Adam on
    ||G(z) - x||^2 from `seed`-drawn N(0, 1) starts, `inversion_steps`
    steps), then Adam (`lr`, `steps`) on z from z0 minimises
    ||z - z0||^2 + w * (relu(margin - d)^2 + relu(d - 2 margin)^2
    + relu(max_{i not in t, q} z_i - z_q + margin)^2), d = z_q - z_t the
    logit lead of the contrast q over the target t on G(z), the weight w
    growing from `penalty` tenfold over the run: the decoded point is the
    contrast class, barely (its lead over the target in [margin, 2 margin]),
    the other classes out of the way. The distance is the plain squared
    norm (not a per-dimension mean): Adam moves every coordinate at a similar
    pace, so only a pull as strong as the penalty keeps the coordinates the
    classifier does not care about at z0. The answer is the iterate nearest z0
    whose decoded image the model gives to the contrast. Map: the difference
    G(z0) - G(z*) reduced over channels (`reduce`, default "abs_sum"; None
    keeps the signed difference): what would have to change, in the
    generator's terms, to turn the target into the contrast. `report` gets
    {"decoded" G(z0), "contrast_image" G(z*), "latent" z0, "contrast_latent"
    z*, "success" (a contrast point was found), "distance" ||z* - z0||,
    "logits" (of G(z*)), "decoded_logits" (of G(z0): is the generator's
    version of the image still the target?), "reconstruction_error" (mean
    squared, G(z0) vs x)}.
    """
    if generator is None:  # the model's own (checked: it has one)
        g = model.generative
        generator, encoder, latent_dim = g.decode, encoder or g.encode, latent_dim or g.latent_dim
    b = images.shape[0]
    logits = forward_logits(model, images, internal_batch)
    with torch.inference_mode(False):
        x = images.detach().clone()
        t = targets(logits, target, b, x.device).clone()
        q = contrasts(logits.clone(), contrast, t).clone()
        z0 = _latent_codes(x, encoder, generator, latent_dim, inversion_steps, lr, seed, internal_batch)
        objective = _contrast_objective(model, generator, z0, t, q, margin=margin, penalty=penalty, steps=steps)
        best, best_distance = _latent_search(objective, z0, steps=steps, lr=lr, chunk=internal_batch,
                                             progress=progress)
        with torch.no_grad():
            decoded = torch.cat([generator(z0[part]) for part in batched(b, internal_batch)])
            contrast_image = torch.cat([generator(best[part]) for part in batched(b, internal_batch)])
    if report is not None:
        success = best_distance.isfinite()
        report({
            "decoded": decoded, "contrast_image": contrast_image, "latent": z0, "contrast_latent": best,
            "success": success, "distance": (best - z0).norm(dim=1).where(success, best_distance),
            "logits": forward_logits(model, contrast_image, internal_batch),
            "decoded_logits": forward_logits(model, decoded, internal_batch),
            "reconstruction_error": (decoded - x).pow(2).flatten(1).mean(1)})
    return reduce_channels(decoded - contrast_image, reduce)


def _latent_codes(x: Tensor, encoder: Callable[[Tensor], Tensor] | None, generator: Callable[[Tensor], Tensor],
                  latent_dim: int | None, inversion_steps: int, lr: float, seed: int | None, chunk: int) -> Tensor:
    """The latent code z0 of each image: the encoder's, else the generator inverted (`_invert`); (B, dim)."""
    b = x.shape[0]
    if encoder is not None:
        with torch.no_grad():
            z0 = torch.cat([encoder(x[part]) for part in batched(b, chunk)]).detach()
    else:
        z0 = _invert(generator, x, latent_dim, inversion_steps, lr, seed, chunk)
    if z0.dim() != 2 or z0.shape[0] != b:
        raise ValueError(f"the encoder must return latent codes (B, dim), got {tuple(z0.shape)}")
    return z0


def _contrast_objective(model: nn.Module, generator: Callable[[Tensor], Tensor], z0: Tensor, t: Tensor, q: Tensor, *,
                        margin: float, penalty: float, steps: int) -> Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]:
    """CDeepEx's loss of latent codes `z` (rows `i`) at `step`: the squared distance to z0, plus the growing
    penalty on a decoded point that is not the contrast q by a lead over the target t in [margin, 2 margin],
    or where another class comes within `margin` of q; and whether the model gives the point to q."""

    def objective(z: Tensor, i: Tensor, step: int) -> tuple[Tensor, Tensor]:
        out = model(generator(z))
        zt, zq = out.gather(1, t[i, None])[:, 0], out.gather(1, q[i, None])[:, 0]
        lead = zq - zt
        others = out.scatter(1, t[i, None], float("-inf")).scatter(1, q[i, None], float("-inf")).amax(1)
        others = torch.where(others.isfinite(), others - zq + margin, torch.zeros_like(zq))
        violation = (margin - lead).relu() ** 2 + (lead - 2 * margin).relu() ** 2 + others.relu() ** 2
        weight = penalty * 10 ** (step / max(steps - 1, 1))
        loss = (z - z0[i]).pow(2).sum(1) + weight * violation
        return loss, out.argmax(1) == q[i]

    return objective


def _latent_search(
    objective: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]], z0: Tensor, *, steps: int, lr: float,
    chunk: int, progress: bool,
) -> tuple[Tensor, Tensor]:
    """Adam on the latent codes from z0; per row, the evaluated iterate nearest z0 that the model
    gives to the contrast (`objective` returns the loss and whether it does) and its distance
    (inf: none found)."""
    rows = torch.arange(z0.shape[0], device=z0.device)
    z = z0.clone()
    opt = torch.optim.Adam([z], lr=lr)  # z itself needs no grad: its .grad is set by hand
    best = z0.clone()
    best_distance = torch.full((z0.shape[0],), float("inf"), dtype=z.dtype, device=z.device)
    for step in progress_bar(range(steps), progress, total=steps, desc="cdeepex"):
        grad, (_, wins) = grad_rows(lambda leaf, i: objective(leaf, i, step), z, rows, chunk)
        # the iterate just evaluated: keep it if it is the contrast class and nearer z0
        distance = (z - z0).norm(dim=1)
        better = wins & (distance < best_distance)
        best[better], best_distance[better] = z[better], distance[better]
        z.grad = grad
        opt.step()
    return best, best_distance


def _invert(
    generator: Callable[[Tensor], Tensor], x: Tensor, dim: int, steps: int, lr: float, seed: int | None, chunk: int
) -> Tensor:
    """Latent codes z (B, dim) with G(z) ~ x: Adam on the mean squared error from seeded N(0, 1) starts."""
    z = torch.randn(x.shape[0], dim, generator=seeded_rng(seed), dtype=x.dtype).to(x.device)
    for part in batched(x.shape[0], chunk):
        leaf = z[part].clone().requires_grad_(True)
        opt = torch.optim.Adam([leaf], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                # autograd.grad, not backward(): the generator's own parameters get no .grad
                (leaf.grad,) = torch.autograd.grad((generator(leaf) - x[part]).pow(2).mean(), leaf)
                opt.step()
        z[part] = leaf.detach()
    return z
