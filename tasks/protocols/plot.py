"""Figures of the reliability protocols, drawn from their stores (so a finished store can be redrawn)."""
from __future__ import annotations

import numpy as np

import storage

from ..drawing.figure import plt, save
from .common import nanmean


def _show(ax: object, m: np.ndarray, title: str = "", top: float | None = None) -> None:
    """A heatmap: diverging around 0 for a signed map, from 0 otherwise; `top` shares a scale between maps."""
    if top is None:
        top = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
    signed = np.nanmin(m) < -1e-3 * (top or 1.0)
    ax.imshow(m, cmap="bwr" if signed else "jet", vmin=-top if signed else 0, vmax=top or 1.0)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def plot_sanity(path: str, out: str) -> str:
    """Adebayo et al.'s layout: per method, the maps of the first image as layers are randomised
    (cascading), then mean similarity against the layers randomised, one curve per method."""
    ds = storage.ResultStore(path, mode="r").dataset()
    methods, layers = ds.xai_method.values.tolist(), ds.layer.values.tolist()
    cols = len(layers) + 1
    fig = plt.figure(figsize=(max(8.0, 1.05 * cols), 1.15 * len(methods) + 6.5))
    grid = fig.add_gridspec(len(methods) + 2, cols, height_ratios=[1.0] * len(methods) + [2.6, 2.6])
    for i, m in enumerate(methods):
        ax = fig.add_subplot(grid[i, 0])
        _show(ax, ds.original.sel(xai_method=m).isel(sample=0).values, "original" if i == 0 else "")
        ax.set_ylabel(m, fontsize=7)
        for j, layer in enumerate(layers):
            ex = ds.example.sel(xai_method=m, randomization="cascading", layer=layer).isel(shown=0).values
            _show(fig.add_subplot(grid[i, j + 1]), ex, layer if i == 0 else "")
    half = cols // 2
    for col, kind in enumerate(("cascading", "independent")):
        for row, measure in enumerate(("spearman_abs", "ssim")):
            ax = fig.add_subplot(grid[len(methods) + row, col * half:(col + 1) * half if col == 0 else cols])
            for m in methods:
                sim = ds.similarity.sel(xai_method=m, randomization=kind, measure=measure).values  # (layer, sample)
                mean, _ = nanmean(sim, axis=1)
                ax.plot(range(cols), [1.0, *mean], marker="o", ms=3, label=m)
            ax.set_xticks(range(cols), ["original", *layers], rotation=60, fontsize=6)
            ax.set_ylim(-0.2, 1.05)
            ax.set_title(f"{kind} randomisation: {measure}", fontsize=8)
            ax.axhline(0, color="grey", lw=0.5)
    fig.axes[-1].legend(fontsize=6)
    fig.suptitle("Model-parameter randomisation: similarity of each map to the original (mean over images)")
    fig.tight_layout()
    return save(fig, out)


def plot_invariance(path: str, out: str) -> str:
    """Per method: the map of the first images on the model and on the shift-compensated copy, and the change."""
    store = storage.ResultStore(path, mode="r")
    ds, tolerance = store.dataset(), store.identity["tolerance"]
    methods, shown = ds.xai_method.values.tolist(), ds.shown.size
    fig, axes = plt.subplots(len(methods), 2 * shown + 1, figsize=(2 * shown + 3, 1.3 * len(methods) + 0.6),
                             squeeze=False)
    for i, m in enumerate(methods):
        change = float(ds.l1_change.sel(xai_method=m).sum() / ds.l1_norm.sel(xai_method=m).sum())
        for j in range(shown):
            pair = ds.example.sel(xai_method=m).isel(shown=j).values  # (variant, y, x): one colour scale
            top = float(np.nanmax(np.abs(pair))) if np.isfinite(pair).any() else 1.0
            for v, variant in enumerate(("original", "shifted")):
                _show(axes[i, 2 * j + v], pair[v], f"{variant} #{j}" if i == 0 else "", top)
        axes[i, 0].set_ylabel(m, fontsize=7)
        ok = change <= tolerance
        axes[i, -1].axis("off")
        axes[i, -1].text(0.5, 0.5, f"{'invariant' if ok else 'changes'}\nrelative L1 {change:.2g}", ha="center",
                         va="center", fontsize=8, color="white", transform=axes[i, -1].transAxes,
                         bbox=dict(boxstyle="round", facecolor="tab:green" if ok else "tab:red"))
    fig.suptitle("Input invariance: maps of the model on x and of its compensated copy on x + shift")
    fig.tight_layout()
    return save(fig, out)


def plot_manipulation(path: str, out: str) -> str:
    """Per image: the input and the manipulated input, the original, manipulated and target maps, the
    perturbation; then the same maps of the defended (smoothed) explanation under its own attack."""
    ds = storage.ResultStore(path, mode="r").dataset()
    n = min(4, ds.sample.size)
    names = ["original", "manipulated", "target", "defended_original", "defended_manipulated", "defended_target"]
    fig, axes = plt.subplots(n, len(names) + 3, figsize=(2 * (len(names) + 3), 2 * n + 0.5), squeeze=False)
    for i in range(n):
        image, delta = ds.image.isel(sample=i).values, ds.delta.isel(sample=i).values
        for k, (picture, title) in enumerate(((image, "input"), (np.clip(image + delta, 0, 1), "manipulated input"))):
            axes[i, k].imshow(picture.transpose(1, 2, 0))
            axes[i, k].set_xticks([]), axes[i, k].set_yticks([])
            axes[i, k].set_title(title if i == 0 else "", fontsize=7)
        for j, name in enumerate(names):
            _show(axes[i, j + 2], ds.maps.isel(sample=i).sel(map=name).values, name.replace("_", " ") if i == 0 else "")
        _show(axes[i, -1], np.abs(delta).max(0), f"|perturbation|, max {np.abs(delta).max():.2f}")
    sim = ds.target_similarity.mean("sample")
    fig.suptitle("Manipulation: Pearson similarity of the map to the target, " + ", ".join(
        f"{s.replace('_', ' ')} {float(sim.sel(stage=s)):.2f}" for s in ds.stage.values.tolist()), fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def plot_roar(path: str, out: str) -> str:
    """Test accuracy after retraining against the fraction removed: mean and range over seeds, per method."""
    ds = storage.ResultStore(path, mode="r").dataset()
    fig, ax = plt.subplots(figsize=(6, 4))
    fractions = ds.fraction.values
    for m in ds.xai_method.values.tolist():
        acc = ds.accuracy.sel(xai_method=m).values  # (fraction, seed)
        style = dict(color="black", ls="--") if m == "random" else {}
        ax.plot(fractions, np.nanmean(acc, 1), marker="o", label=m, **style)
        ax.fill_between(fractions, np.nanmin(acc, 1), np.nanmax(acc, 1), alpha=0.15, **({"color": "black"} if m == "random" else {}))
    ax.set_xlabel("fraction of pixels removed (top-ranked)")
    ax.set_ylabel("test accuracy after retraining")
    ax.set_title(f"ROAR ({ds.seed.size} seeds: mean and range)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, out)


def plot_resilience(path: str, out: str) -> str:
    """MetaQuantus's picture: per metric, its four criteria in each family (input, model) as bars in [0, 1], and
    its MC score; the metric to believe has every bar high."""
    from .resilience import summary

    found = summary(path)["metrics"]
    criteria, families = ("IAC_NR", "IAC_AR", "IEC_NR", "IEC_AR"), ("input", "model")
    fig, axes = plt.subplots(1, len(found), figsize=(2.4 * len(found) + 1, 2.8), squeeze=False, sharey=True)
    for ax, (metric, r) in zip(axes[0], found.items()):
        for f, family in enumerate(families):
            values = [np.nan if r[family][c] is None else r[family][c] for c in criteria]
            ax.bar(np.arange(4) + 0.4 * f - 0.2, values, width=0.4, label=family, color=("tab:blue", "tab:orange")[f])
        ax.set_xticks(range(4), criteria, rotation=45, fontsize=7)
        ax.set_ylim(0, 1.05)
        mc = "-" if r["MC"] is None else f"{r['MC']:.2f}"
        ax.set_title(f"{metric}\nMC {mc}", fontsize=8)
    axes[0, 0].set_ylabel("criterion (1: best)", fontsize=7)
    axes[0, -1].legend(fontsize=6, title="perturbation", title_fontsize=6)
    fig.suptitle("Resilience (NR: minor perturbations leave the scores) and reactivity (AR: disruptive ones move "
                 "them), per metric", fontsize=8)
    fig.tight_layout()
    return save(fig, out)
