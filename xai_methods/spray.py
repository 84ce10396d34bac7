"""Spectral relevance analysis (SpRAy; Lapuschkin et al. 2019, "Unmasking Clever Hans predictors").

The maps of one class are compared as shapes, not as magnitudes: each is downsampled (area
mean), flattened and scaled to unit L2 norm. A symmetric k-nearest-neighbour graph joins maps
that look alike; the spectrum of its normalised Laplacian says how many groups there are (a
large gap after the k-th smallest eigenvalue: k nearly disconnected groups, the eigengap) and
its first eigenvectors embed the maps, where k-means finds the groups (Ng, Jordan and Weiss
2002). A class whose images are decided by two strategies (the object, or a watermark that only
some images carry) splits in two.

>>> from xai_methods import spray
>>> found = spray.analyse(maps, neighbours=10, max_clusters=8, seed=0)   # maps: (N, H, W)
>>> found.labels, found.k, found.eigengap

Pure NumPy/SciPy, like the rest of the package; scikit-learn's `SpectralClustering` is the
reference it is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.vq import kmeans2
from scipy import sparse
from scipy.linalg import eigh
from scipy.sparse.linalg import eigsh


@dataclass(frozen=True)
class Clustering:
    """What `analyse` found for one group of maps."""

    labels: np.ndarray  # (N,) cluster of each map: 0 is the largest cluster, then by size
    k: int  # the number of clusters
    eigenvalues: np.ndarray  # the smallest eigenvalues of the graph's normalised Laplacian, ascending
    eigengap: float  # eigenvalues[k] - eigenvalues[k - 1] (NaN when there are too few maps for a graph)
    features: np.ndarray  # (N, F) the downsampled unit-norm maps the graph was built from


def features(maps: np.ndarray, size: int = 16) -> np.ndarray:
    """(N, H, W) maps -> (N, size * size): area means over a size x size grid, scaled to unit L2 norm
    (a map that is zero everywhere stays zero). When `size` does not divide H or W, the last rows or
    columns that do not fill a cell are left out."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {maps.shape}")
    n, h, w = maps.shape
    if not 1 <= size <= min(h, w):
        raise ValueError(f"size must be between 1 and the maps' smaller side {min(h, w)}, got {size}")
    if not np.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinity: leave failed maps out before the analysis")
    fy, fx = h // size, w // size
    small = maps[:, : fy * size, : fx * size].reshape(n, size, fy, size, fx).mean(axis=(2, 4)).reshape(n, size * size)
    norm = np.linalg.norm(small, axis=1, keepdims=True)
    return np.divide(small, norm, out=np.zeros_like(small), where=norm > 0)


SLAB = 1 << 20  # distances in memory at once while the graph is built: 1 M (8 MB), whatever N
DENSE = 512  # graphs up to this many maps take the dense eigensolver (a 2 MB matrix); larger, Lanczos


def affinity(x: np.ndarray, neighbours: int) -> sparse.csr_matrix:
    """The symmetric k-nearest-neighbour graph of the rows of `x` (1: i is among j's nearest or j
    among i's, Euclidean distance; ties broken by index), sparse (N, N) 0/1. Distances are taken
    a slab of rows at a time, the slab about `SLAB` distances (8 MB) whatever N, so the memory in
    flight does not grow with N (the time grows with N squared: every pair is measured)."""
    n = len(x)
    k = min(neighbours, n - 1)
    sq = (x * x).sum(1)
    nearest = np.empty((n, k), np.int64)
    height = max(1, SLAB // max(n, 1))
    for start in range(0, n, height):
        rows = slice(start, min(n, start + height))
        dist = sq[rows, None] + sq[None, :] - 2.0 * x[rows] @ x.T
        dist[np.arange(dist.shape[0]), np.arange(rows.start, rows.stop)] = np.inf
        nearest[rows] = np.argsort(dist, axis=1, kind="stable")[:, :k]
    a = sparse.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), nearest.ravel())), shape=(n, n))
    return a.maximum(a.T).tocsr()


def _spectrum(a: sparse.csr_matrix, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` smallest eigenvalues (ascending) and eigenvectors of I - D^-1/2 A D^-1/2: dense for
    graphs of at most `DENSE` maps, else the largest of D^-1/2 A D^-1/2 by Lanczos iteration (seeded start)."""
    d = sparse.diags(1.0 / np.sqrt(np.asarray(a.sum(1)).ravel()))
    s = d @ a @ d
    n = a.shape[0]
    if n <= DENSE:
        values, vectors = eigh(np.eye(n) - s.toarray(), subset_by_index=[0, count - 1])
    else:
        mu, vectors = eigsh(s, k=count, which="LA", v0=np.ones(n) / np.sqrt(n))
        order = np.argsort(-mu)
        values, vectors = 1.0 - mu[order], vectors[:, order]
    return np.clip(values, 0.0, None), vectors


def _kmeans(x: np.ndarray, k: int, seed: int, restarts: int = 10) -> np.ndarray:
    """The best of `restarts` seeded k-means++ runs (least within-cluster squared distance)."""
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(restarts):
        centres, labels = kmeans2(x, k, minit="++", seed=rng)
        cost = float(((x - centres[labels]) ** 2).sum())
        if cost < best_cost - 1e-12:
            best, best_cost = labels, cost
    return best


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel so that cluster 0 is the largest (ties: the one whose first member comes first)."""
    found = np.unique(labels)
    order = sorted(found, key=lambda c: (-(labels == c).sum(), int(np.flatnonzero(labels == c)[0])))
    out = np.empty_like(labels)
    for new, old in enumerate(order):
        out[labels == old] = new
    return out


def analyse(maps: np.ndarray, *, size: int = 16, neighbours: int = 10, max_clusters: int = 8,
            clusters: int | None = None, seed: int = 0) -> Clustering:
    """Cluster (N, H, W) maps by their shape. `clusters`: a fixed number; None: the eigengap's choice
    among 1..`max_clusters`. Fewer than 3 maps are one cluster (no graph to speak of)."""
    for name, value, low in (("neighbours", neighbours, 1), ("max_clusters", max_clusters, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if clusters is not None and (not isinstance(clusters, (int, np.integer)) or clusters < 1):
        raise ValueError(f"clusters must be an integer >= 1 or None (the eigengap decides), got {clusters!r}")
    x = features(maps, size)
    n = len(x)
    if n < 3:
        return Clustering(np.zeros(n, np.int64), 1 if n else 0, np.zeros(0), float("nan"), x)
    top = min(n - 1, max(max_clusters, clusters or 0))
    values, vectors = _spectrum(affinity(x, neighbours), top + 1)
    gaps = np.diff(values)
    k = int(clusters) if clusters is not None else int(np.argmax(gaps[:max_clusters])) + 1
    k = min(k, n)
    if k == 1:
        labels = np.zeros(n, np.int64)
    else:
        embedding = vectors[:, :k]
        norm = np.linalg.norm(embedding, axis=1, keepdims=True)
        labels = _kmeans(np.divide(embedding, norm, out=np.zeros_like(embedding), where=norm > 0), k, seed)
    return Clustering(_by_size(labels.astype(np.int64)), k, values, float(values[k] - values[k - 1]), x)
