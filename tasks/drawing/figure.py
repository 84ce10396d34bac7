"""The study figure: for each chosen sample, the input and one heatmap per method over it
(in the spirit of Figure 1 of the review)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

import storage  # noqa: E402
import xai_methods as xm  # noqa: E402


def _display_image(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalisation of a (C, H, W) model input, for display as (H, W, 3) in [0, 1]."""
    img = image * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
    img = np.clip(img.transpose(1, 2, 0), 0.0, 1.0)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


#: methods whose maps carry a sign by definition (evidence for and against the class): always shown on a
#: diverging colour map centred on 0, even when a map happens to be positive. Contrastive methods also are.
SIGNED = frozenset({"integrated_gradients", "deeplift", "deeplift_revealcancel", "input_x_gradient", "occlusion",
                    "lime", "prediction_difference"})


@dataclass(frozen=True)
class HeatmapStyle:
    """How a map is coloured: a diverging map in [-top, top] for signed maps, else a sequential one in [0, top]."""

    cmap: str
    low: float
    high: float

    @property
    def signed(self) -> bool:
        return self.low < 0


def signed_method(name: str) -> bool:
    """Whether `name`'s maps are signed by definition (see `SIGNED`) or it is contrastive."""
    return name in SIGNED or (name in xm.available() and xm.spec(name).category == "contrastive")


def heatmap_style(name: str, maps: np.ndarray) -> HeatmapStyle:
    """The colours of one map, or of several sharing a scale: diverging (``RdBu_r``, 0 white) for a signed
    method or any negative value, else ``inferno`` from 0. The limit is the 99.5th percentile of |map|, so
    one hot pixel does not wash out the rest; raw values, never min-max scaled."""
    finite = maps[np.isfinite(maps)]
    if finite.size == 0:
        return HeatmapStyle("inferno", 0.0, 1.0)
    top = float(np.percentile(np.abs(finite), 99.5)) or float(np.abs(finite).max()) or 1.0
    if signed_method(name) or finite.min() < -1e-3 * top:
        return HeatmapStyle("RdBu_r", -top, top)
    return HeatmapStyle("inferno", 0.0, top)


def colour_bar(fig: plt.Figure, image: Any, ax: Any, style: HeatmapStyle) -> None:
    """A thin colour bar beside `ax` with the value range (and 0 for a signed map)."""
    ticks = [style.low, 0.0, style.high] if style.signed else [style.low, style.high]
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, ticks=ticks)
    bar.ax.tick_params(labelsize=5, length=1.5, pad=1)
    bar.ax.set_yticklabels([f"{t:.2g}" for t in ticks])


def render(store: str, out: str, samples: Sequence[int] = (0, 1, 2, 3), methods: Sequence[str] | None = None,
           shared_scale: bool = False) -> str:
    """Draw the figure for ``samples`` of the study at ``store`` into ``out`` (PNG/PDF/SVG): the input, then
    each method's map over it with a colour bar of its raw values; `shared_scale`: one scale per method's
    column (maps then compare in magnitude down the column), else each map on its own."""
    ds = storage.open_dataset(store)
    n = ds.sizes["sample"]
    bad = [s for s in samples if not 0 <= s < n]
    if bad:
        raise ValueError(f"--samples {bad} are outside the study's 0..{n - 1}")
    names = list(methods or [str(m) for m in ds.xai_method.values])
    missing = [m for m in names if m not in ds.xai_method.values]
    if missing:
        raise ValueError(f"methods {missing} are not in the store; it has {list(ds.xai_method.values)}")
    classes = [str(c) for c in ds["class"].values]
    contrastive = {m for m in names if m in xm.available() and xm.spec(m).needs_contrast}
    mean, std = ds.attrs["image_mean"], ds.attrs["image_std"]
    sel = ds.isel(sample=list(samples)).sel(xai_method=names).compute()
    columns = {name: sel.attribution.sel(xai_method=name).values.astype(np.float32) for name in names}

    rows, cols = len(samples), 1 + len(names)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.0 * rows), squeeze=False)
    for r in range(rows):
        s = sel.isel(sample=r)
        # Stores of references only have no inputs to show: heatmaps then stand alone.
        img = _display_image(s.image.values, mean, std) if "image" in s else np.full((*s.attribution.shape[-2:], 3), 0.5)
        label, pred, target = (int(s[v]) for v in ("label", "prediction", "target"))
        contrast = int(s["contrast"]) if "contrast" in s else -1
        truth = classes[label] if 0 <= label < len(classes) else "?"
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(f"{s.sample_id.item()}\ntrue {truth}, pred {classes[pred]}", fontsize=7)
        for c, name in enumerate(names, start=1):
            m = columns[name][r]
            style = heatmap_style(name, columns[name] if shared_scale else m)
            ax = axes[r, c]
            ax.imshow(img)
            shown = ax.imshow(m, cmap=style.cmap, vmin=style.low, vmax=style.high, alpha=0.6)
            colour_bar(fig, shown, ax, style)
            if "mask" in s:
                ax.contour(s.mask.values.astype(float), levels=[0.5], colors="white", linewidths=0.6)
            if name in contrastive and 0 <= contrast < len(classes):
                # every row: the contrast differs from sample to sample
                ax.set_title(f"{name}\n{classes[target]} vs {classes[contrast]}", fontsize=7)
            elif r == 0:
                ax.set_title(f"{name}\n(for {classes[target]})" if rows == 1 else name, fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    title, footer = captions(ds, bool(contrastive), shared_scale)
    fig.suptitle(title, fontsize=8)
    fig.text(0.5, 0.003, footer, ha="center", va="bottom", fontsize=6)
    fig.tight_layout(rect=(0, 0.025, 1, 1))
    return save(fig, out)


def captions(ds: Any, contrastive: bool, shared_scale: bool = False) -> tuple[str, str]:
    """What the figure says it shows: the title (the mask legend only when the study has masks) and the
    footer (the model's input: size and normalisation)."""
    has_masks = "mask" in ds and bool(ds["mask"].any())
    title = (f"{ds.attrs.get('model')} on {ds.attrs.get('dataset')}: explained class = prediction"
             + ("; contrastive maps: why target, not contrast" if contrastive else "")
             + ("; white outline = ground-truth object" if has_masks else ""))
    h, w = ds.attrs["image_shape"][1:]
    footer = (f"model input {h}x{w}, normalised with mean {ds.attrs.get('image_mean')} and std "
              f"{ds.attrs.get('image_std')}; colour bars give raw attribution values (red +, blue - on signed maps), "
              + ("one scale per method's column" if shared_scale else "each map on its own scale"))
    return title, footer


def save(fig: plt.Figure, out: str, dpi: int = 130) -> str:
    """Write `fig` to `out` (its folder made if needed), close it, return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


@task(cache_policy=NO_CACHE)
def render_figure(store: str, out: str, samples: Sequence[int] = (0, 1, 2, 3), shared_scale: bool = False) -> str:
    """Prefect task around :func:`render`; returns the figure's path."""
    return render(store, out, samples, shared_scale=shared_scale)
