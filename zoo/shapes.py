"""The built-in ``shapes`` dataset: procedurally generated images with exact masks.

Each image shows ONE class-defining object (circle, square, triangle or cross) at a
random position, size, colour and rotation, over a textured noisy background, plus
1-3 distractor objects of kinds that are not classes (hollow ring, thin bar, dot
cluster).  Distractors keep a margin from the class object, so the ground-truth mask
(the pixels where the class object is drawn, no anti-aliasing) is exact.

Geometry lives in continuous coordinates measured in units of the image's short
side, so any size renders the same scene.  Sample ``i`` of split ``s`` comes from
``np.random.default_rng([seed, SPLIT_CODES[s], i])``: samples are independent of
each other, can be generated alone, in any order, and a dataset can grow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import Batch, Preprocess

GENERATOR_VERSION = 1
CLASSES: list[str] = ["circle", "square", "triangle", "cross"]
PREPROCESS = Preprocess(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # shapes-cnn's and the VAE's
DISTRACTOR_KINDS: tuple[str, ...] = ("ring", "bar", "dots")
SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}

# Class objects have the same area pi * r**2 for every class (so size is no cue);
# r is drawn from this range (units of the short side).
RADIUS_RANGE = (0.11, 0.20)
# Half-size of the square, circumradius of the triangle, half-arm-length of the
# cross, relative to r, chosen so that each shape's area equals pi * r**2.
SQUARE_HALF = np.sqrt(np.pi) / 2                 # (2h)^2 = pi r^2
TRIANGLE_R = np.sqrt(4 * np.pi / (3 * np.sqrt(3)))  # 3*sqrt(3)/4 R^2 = pi r^2
CROSS_HALF = np.sqrt(9 * np.pi / 20)            # arms 2L x 2L/3: area 20/9 L^2 = pi r^2
CROSS_WIDTH = 1 / 3                              # half arm width / half arm length

CLASS_MARGIN = 0.04     # min gap between bounding circles of class object and distractors
DISTRACTOR_GAP = 0.01   # min gap between two distractors
NOISE_STD = 0.03        # per-pixel Gaussian noise, whole image


def class_area(label: int, r: float) -> float:
    """Analytic area of class ``label`` with size parameter ``r`` (same units as r**2)."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in 0..{len(CLASSES) - 1}, got {label}")
    return float(np.pi * r * r)  # by construction of the constants above


def _bounding_radius(label: int, r: float) -> float:
    """Radius of a circle around the centre that contains the class object."""
    return r * [1.0, SQUARE_HALF * np.sqrt(2), TRIANGLE_R,
                CROSS_HALF * np.sqrt(1 + CROSS_WIDTH**2)][label]


def _class_mask(label: int, r: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside the class shape; (u, v) are coordinates in the object's rotated frame."""
    if label == 0:  # circle
        return u * u + v * v <= r * r
    if label == 1:  # square
        h = SQUARE_HALF * r
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if label == 2:  # equilateral triangle = 3 half-planes at distance inradius R/2
        R = TRIANGLE_R * r
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3  # outward normal of edge k
            inside &= u * np.cos(a) + v * np.sin(a) <= R / 2
        return inside
    L = CROSS_HALF * r  # cross: union of a horizontal and a vertical bar
    w = CROSS_WIDTH * L
    au, av = np.abs(u), np.abs(v)
    return ((au <= L) & (av <= w)) | ((au <= w) & (av <= L))


def _distractor_mask(d: dict[str, Any], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if d["kind"] == "ring":
        rho2 = u * u + v * v
        return (rho2 <= d["outer"] ** 2) & (rho2 >= d["inner"] ** 2)
    if d["kind"] == "bar":
        return (np.abs(u) <= d["half_length"]) & (np.abs(v) <= d["half_width"])
    inside = np.zeros(u.shape, dtype=bool)  # dots: offsets are in the rotated frame
    for (ou, ov), rd in zip(d["offsets"], d["dot_radii"]):
        inside |= (u - ou) ** 2 + (v - ov) ** 2 <= rd * rd
    return inside


def _sample_distractor(rng: np.random.Generator, scale: float) -> dict[str, Any]:
    """Size parameters of one distractor (units of the short side), without position."""
    kind = DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))]
    if kind == "ring":
        outer = rng.uniform(0.07, 0.13) * scale
        inner = outer * (1 - rng.uniform(0.25, 0.4))  # clearly hollow
        return {"kind": kind, "outer": outer, "inner": inner, "bound": outer}
    if kind == "bar":
        hl, hw = rng.uniform(0.08, 0.16) * scale, rng.uniform(0.012, 0.022) * scale
        return {"kind": kind, "half_length": hl, "half_width": hw, "bound": float(np.hypot(hl, hw))}
    n = int(rng.integers(3, 6))
    spread = 0.07 * scale
    radii = rng.uniform(0.018, 0.03, size=n) * scale
    ang, dist = rng.uniform(0, 2 * np.pi, size=n), spread * np.sqrt(rng.uniform(0, 1, size=n))
    offsets = np.stack([dist * np.cos(ang), dist * np.sin(ang)], axis=1)
    return {"kind": kind, "offsets": offsets, "dot_radii": radii,
            "bound": float(np.max(np.hypot(offsets[:, 0], offsets[:, 1]) + radii))}


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A colour at RGB distance >= 0.45 from the background (rejection sampling)."""
    for _ in range(100):
        c = rng.uniform(0.05, 0.95, size=3)
        if np.linalg.norm(c - background) >= 0.45:
            return c
    return np.where(background > 0.5, 0.05, 0.95)  # practically unreachable fallback


def _rotated(x: np.ndarray, y: np.ndarray, cx: float, cy: float, angle: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates relative to (cx, cy), rotated by -angle (the object's own frame)."""
    dx, dy = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def _place_distractors(rng: np.random.Generator, extent: tuple[float, float], avoid: tuple[float, float, float],
                       color: np.ndarray, background: np.ndarray) -> list[dict[str, Any]]:
    """One to three distractors, rejection-sampled clear of the class object (centre cx, cy and bounding
    radius) and of each other, shrinking every 10 failed tries."""
    (aw, ah), (cx, cy, bound) = extent, avoid
    distractors: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(1, 4))):
        scale, d = 1.0, None
        for attempt in range(100):
            if attempt % 10 == 0:
                d = _sample_distractor(rng, scale)
                scale *= 0.8
            b = d["bound"]
            dx = rng.uniform(b + 0.01, max(b + 0.01, aw - b - 0.01))
            dy = rng.uniform(b + 0.01, max(b + 0.01, ah - b - 0.01))
            if np.hypot(dx - cx, dy - cy) < bound + b + CLASS_MARGIN:
                continue
            if any(np.hypot(dx - o["center"][0], dy - o["center"][1]) < b + o["bound"] + DISTRACTOR_GAP
                   for o in distractors):
                continue
            d["center"] = (float(dx), float(dy))
            d["angle"] = float(rng.uniform(0, 2 * np.pi))
            # half of them take (almost) the class object's colour, so colour is no cue
            d["color"] = (np.clip(color + rng.uniform(-0.08, 0.08, size=3), 0.05, 0.95)
                          if rng.uniform() < 0.5 else _contrasting_colour(rng, background))
            distractors.append(d)
            break
    return distractors


def _rasterise(rng: np.random.Generator, hw: tuple[int, int], background: np.ndarray, waves: list[dict[str, Any]],
               distractors: list[dict[str, Any]], obj: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image (3, H, W) at pixel centres, the class object's mask and the distractors' mask; the pixel
    noise is the last draw, the only one that depends on the size."""
    (H, W), (label, r, cx, cy, angle, color) = hw, obj
    S = min(H, W)
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    x, y = (x + 0.5) / S, (y + 0.5) / S
    image = np.broadcast_to(background[:, None, None], (3, H, W)).copy()
    for w in waves:
        phase = 2 * np.pi * w["freq"] * (x * np.cos(w["dir"]) + y * np.sin(w["dir"])) + w["phase"]
        image += w["amp"][:, None, None] * np.sin(phase)[None]
    distractor_mask = np.zeros((H, W), dtype=bool)
    for d in distractors:
        m = _distractor_mask(d, *_rotated(x, y, *d["center"], d["angle"]))
        image[:, m] = d["color"][:, None]
        distractor_mask |= m
    mask = _class_mask(label, r, *_rotated(x, y, cx, cy, angle))
    image[:, mask] = color[:, None]
    image += rng.normal(0, NOISE_STD, size=(3, H, W))
    return np.clip(image, 0, 1).astype(np.float32), mask, distractor_mask


def render(rng: np.random.Generator, size: tuple[int, int] | int = 64
           ) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """Draw one sample.

    Returns ``(image, mask, label, params)``: image float32 (3, H, W) in [0, 1], mask bool
    (H, W) of the class object, the label, and the sampled parameters (``label``,
    ``shape``, ``center`` and ``r`` in units of the short side, ``angle``, ``color``,
    ``background``, ``distractors`` and the rendered ``distractor_mask``).
    All random draws except the final pixel noise are independent of ``size``.
    """
    H, W = (size, size) if isinstance(size, int) else size
    if H < 1 or W < 1:
        raise ValueError(f"size must be positive, got {(H, W)}")
    S = min(H, W)
    aw, ah = W / S, H / S  # canvas extent in units of the short side

    # --- class object
    label = int(rng.integers(len(CLASSES)))
    r = float(rng.uniform(*RADIUS_RANGE))
    angle = float(rng.uniform(0, 2 * np.pi))
    background = rng.uniform(0.25, 0.75, size=3)
    color = _contrasting_colour(rng, background)
    bound = _bounding_radius(label, r)
    lo = bound + 0.02
    cx = float(rng.uniform(lo, max(lo, aw - lo)))
    cy = float(rng.uniform(lo, max(lo, ah - lo)))

    # --- background texture: a few coloured sinusoidal gratings
    waves = []
    for _ in range(3):
        waves.append({"amp": rng.uniform(-0.06, 0.06, size=3), "freq": rng.uniform(1, 6),
                      "dir": rng.uniform(0, 2 * np.pi), "phase": rng.uniform(0, 2 * np.pi)})

    distractors = _place_distractors(rng, (aw, ah), (cx, cy, bound), color, background)
    image, mask, distractor_mask = _rasterise(rng, (H, W), background, waves, distractors,
                                              (label, r, cx, cy, angle, color))

    params = {"label": label, "shape": CLASSES[label], "center": (cx, cy), "r": r,
              "angle": angle, "color": color, "background": background, "waves": waves,
              "distractors": distractors, "distractor_mask": distractor_mask}
    return image, mask, label, params


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``split``."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


@dataclass
class ShapesDataset:
    """``length`` samples of split ``split``; implements the zoo ``Dataset`` protocol."""

    seed: int = 0
    split: str = "test"
    size: tuple[int, int] = (64, 64)
    length: int = 1000
    name: str = "shapes"
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    has_masks: bool = True
    skipped: list[tuple[str, str]] = field(default_factory=list)
    mask_problems: list[str] = field(default_factory=list)  # the built-in masks are drawn with the shapes

    def __post_init__(self) -> None:
        sample_rng(self.seed, self.split, 0)  # validates seed and split
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {self.length}")

    def __len__(self) -> int:
        return self.length

    def _range(self, start: int, stop: int) -> range:
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
        return range(start, min(stop, self.length))

    def ids(self, start: int, stop: int) -> list[str]:
        return [f"{self.split}/{i:06d}" for i in self._range(start, stop)]

    def load(self, start: int, stop: int) -> Batch:
        """Samples [start, stop) (stop is clipped to len(self))."""
        return self.load_ids(self.ids(start, stop))

    def _index(self, sample_id: str) -> int:
        split, _, number = sample_id.partition("/")
        if split != self.split or not number.isdigit():
            raise ValueError(f"sample id {sample_id!r} is not a sample of the shapes split {self.split!r}")
        return int(number)

    def load_ids(self, ids: list[str]) -> Batch:
        """The samples with these ids (any order, any index: samples are generated on demand)."""
        H, W = self.size
        images = np.empty((len(ids), 3, H, W), np.float32)
        masks = np.empty((len(ids), H, W), bool)
        labels = np.empty(len(ids), np.int64)
        for k, sample_id in enumerate(ids):
            rng = sample_rng(self.seed, self.split, self._index(sample_id))
            images[k], masks[k], labels[k], _ = render(rng, self.size)
        return Batch(images, labels, masks, list(ids))

    def fingerprint(self) -> str:
        key = f"shapes|v{GENERATOR_VERSION}|seed={self.seed}|split={self.split}|size={self.size[0]}x{self.size[1]}"
        return hashlib.sha256(key.encode()).hexdigest()

    def digest(self, ids: list[str]) -> str:
        """sha256 identifying exactly these samples (the generator and the ids)."""
        h = hashlib.sha256(self.fingerprint().encode())
        for sample_id in ids:
            self._index(sample_id)
            h.update(f"\0{sample_id}".encode())
        return h.hexdigest()
