"""The metrics' agreement as a picture: Kendall's tau between every two metrics' orderings of the methods, the
metrics ordered so that those that agree sit together (average-linkage clustering of 1 - tau), each labelled
with its reliability (Krippendorff's alpha). Drawn from the meta-evaluation `tasks.meta.rank` returns."""
from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .figure import save  # noqa: E402


def tau_matrix(r: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """(metrics, their tau matrix): 1 on the diagonal, NaN where a pair has none."""
    metrics = list(r["ranking"])
    tau = np.eye(len(metrics))
    for pair, a in r["agreement"].items():
        i, j = (metrics.index(k) for k in pair.split("|"))
        tau[i, j] = tau[j, i] = np.nan if a["tau"] is None else a["tau"]
    return metrics, tau


def clustered(tau: np.ndarray) -> list[int]:
    """An order of the metrics that puts those that agree side by side (average linkage on 1 - tau)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if len(tau) < 3:
        return list(range(len(tau)))
    distance = 1 - np.nan_to_num(tau, nan=0.0)
    np.fill_diagonal(distance, 0)
    return [int(i) for i in leaves_list(linkage(squareform(distance, checks=False), method="average"))]


def plot_agreement(r: dict[str, Any], out: str) -> str | None:
    """The agreement heatmap of `r` at `out` (PNG); None with fewer than two metrics."""
    metrics, tau = tau_matrix(r)
    if len(metrics) < 2:
        return None
    order = clustered(tau)
    tau = tau[np.ix_(order, order)]
    labels = []
    for k in (metrics[i] for i in order):
        alpha = r["reliability"][k]["alpha"]
        labels.append(f"{k} (alpha {alpha:.2f})" if alpha is not None else k)
    side = 1.2 + 0.62 * len(metrics)
    fig, ax = plt.subplots(figsize=(side + 2.2, side))
    im = ax.imshow(tau, cmap="RdBu_r", vmin=-1, vmax=1)
    for (i, j), value in np.ndenumerate(tau):
        if i != j and np.isfinite(value):
            ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(value) > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).set_label("Kendall's tau of the methods' orderings", fontsize=7)
    ax.set_title("Do the metrics agree? (metrics that agree sit together; alpha: each metric's reliability)",
                 fontsize=8)
    fig.tight_layout()
    return save(fig, out)


def trust_markdown(r: dict[str, Any], figure: str | None) -> str:
    """The Prefect artifact of how far to trust a study's scores: the lines `evaluate` prints, a link to
    `saliency-atlas rank`, and the agreement figure inline when there is one."""
    from tasks import meta

    from .artifacts import figure_markdown

    lines = meta.trust(r)
    text = f"### {lines[0][0].upper()}{lines[0][1:]}\n\n" + "".join(f"- {line.strip()}\n" for line in lines[1:])
    return text + ("\n" + figure_markdown(figure, "Do the metrics agree?") if figure else "")
