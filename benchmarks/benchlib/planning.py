"""The workload's parameters, the targets, a row of the table and the budget planner (images x rounds)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

import xai_methods as xm
from .timing import Floor, floor_parts

# Parameters of the workload (from the issues). A key ours does not accept is dropped with a note.
CASE_PARAMS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 32, "internal_batch": 64},
    "smoothgrad": {"samples": 16, "internal_batch": 64},
    "smoothgrad_sq": {"samples": 16, "internal_batch": 64},
    "vargrad": {"samples": 16, "internal_batch": 64},
    "scorecam": {"internal_batch": 64},
    "ablationcam": {"internal_batch": 64},
    "occlusion": {"window": 32, "stride": 16, "baseline": 0.0, "internal_batch": 64},
    "lime": {"samples": 1000, "internal_batch": 64},
    "rise": {"masks": 4000, "internal_batch": 64},
    # Its default (window 4, stride 2) is ~123k forward passes per image at 224x224: far too long to time.
    "prediction_difference": {"window": 16, "stride": 16, "samples": 4, "internal_batch": 64},
}
# --quick caps sample counts (a smoke run, not a measurement).
QUICK_CAPS = {"steps": 8, "samples": 8, "masks": 200}
QUICK_CAPS_BY_METHOD = {"lime": {"samples": 100}}
# Names under which a method may call its superpixel count (used by the LIME peer and the surrogate fit).
SEGMENT_KEYS = ("segments", "superpixels", "n_segments")
DEFAULT_SEGMENTS = 50

TARGETS = {  # kind -> (ratio to the floor, text)
    "single": (1.25, "<= 1.25x floor (its one pass)"),
    "fullgrad": (1.5, "<= 1.5x floor"),
    "multi": (1.1, "<= 1.1x floor (passes x batched fwd(+bwd))"),
    "occlusion": (1.1, "<= 1.1x floor, faster than Captum Occlusion"),
    "rise": (1.1, "<= 1.1x floor (masks x batched fwd)"),
    "lime": (1.1, "<= 1.1x floor (samples x batched fwd + surrogate fit)"),
}


# --------------------------------------------------------------------------- one method


@dataclass
class Row:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    images: int = 0
    rounds: int = 0
    passes: tuple[int, int] | None = None  # declared (forward, backward) per image
    observed: tuple[float, float] | None = None  # seen by a forward hook on the model, per image
    ours_ms: float | None = None
    peers: list[tuple[str, float | None, str]] = field(default_factory=list)  # (label, ms/img, failure)
    floor_ms: float | None = None
    kind: str = "single"
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def best_peer(self) -> tuple[str, float] | None:
        timed = [(label, ms) for label, ms, _ in self.peers if ms is not None]
        return min(timed, key=lambda p: p[1]) if timed else None

    @property
    def met(self) -> bool | None:
        if self.ours_ms is None or self.floor_ms is None:
            return None
        ok = self.ours_ms <= TARGETS[self.kind][0] * self.floor_ms
        best = self.best_peer
        if best is not None:
            ok = ok and self.ours_ms <= best[1]
        return ok


def target_kind(name: str, passes: tuple[int, int]) -> str:
    if name in ("fullgrad", "occlusion", "rise", "lime"):
        return name
    f, b = passes
    return "single" if f <= 1 and b <= 1 else "multi"


def method_params(name: str, quick: bool, notes: list[str]) -> dict[str, Any]:
    """The workload's parameters for `name` that ours accepts (defaults for the rest)."""
    s = xm.spec(name)
    wanted = dict(CASE_PARAMS.get(name, {}))
    if quick:
        caps = {**QUICK_CAPS, **QUICK_CAPS_BY_METHOD.get(name, {})}
        for key, cap in caps.items():
            value = wanted.get(key, s.defaults.get(key))
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                wanted[key] = cap
    params = {k: v for k, v in wanted.items() if k in s.defaults}
    dropped = sorted(set(wanted) - set(params))
    if dropped:
        notes.append(f"ours takes no {', '.join(dropped)}: its default used, the peer got the workload value")
    return params


@dataclass
class Calibration:
    """Seconds per image, measured at the start of the run (used only to plan, never reported as results)."""

    fwd_s: float  # forward under inference_mode, batch = the run's batch
    fwd_big_s: float  # forward under inference_mode, batch 64
    bwd_s: float  # forward+backward to the input, batch = the run's batch

    def fwd(self, chunk: int) -> float:
        return self.fwd_big_s if chunk >= 32 else self.fwd_s

    def per_image(self, passes: tuple[int, int], chunk: int) -> float:
        f, b = passes
        return max(f - b, 0) * self.fwd(chunk) + b * self.bwd_s


def calibrate(model: nn.Module, size: tuple[int, int], batch: int, classes: int) -> Calibration:
    small = Floor(model, size, batch, 0, batch, classes, 1)
    big = Floor(model, size, 64, 0, 64, classes, 1)
    back = Floor(model, size, 0, batch, batch, classes, 1)
    small(), back()  # warm-up
    return Calibration(min(small(), small()) / batch, big() / 64, min(back(), back()) / batch)


def warmup_images(est_image_s: float, images: int) -> int:
    """Warm-up on the full batch when cheap, on one image when not, not at all when even that is long."""
    if est_image_s * images <= 5:
        return images
    return 1 if est_image_s <= 30 else 0


@dataclass
class BudgetPlan:
    """Cost model of one method's measurement, to choose images x rounds within the budget."""

    calib: Calibration
    passes: tuple[int, int]
    internal_batch: int | None  # the method's chunk size; None = the whole batch per pass
    n_calls: int  # ours + peers
    max_chunks: int

    def chunk(self, images: int) -> int:
        return self.internal_batch or images

    def seconds(self, images: int, rounds: int) -> float:
        f, b = self.passes
        per_image = self.calib.per_image(self.passes, self.chunk(images))
        floor = sum(
            min(count, self.max_chunks) * size * (self.calib.fwd(size) if kind == "fwd" else self.calib.bwd_s)
            for kind, size, count in floor_parts((f - b) * images, b * images, self.chunk(images))
        )
        warm = warmup_images(per_image, images)
        warm_cost = self.n_calls * per_image * warm + floor if warm else 0.0
        return rounds * (self.n_calls * per_image * images + floor) + warm_cost

    def choose(self, batch: int, repeats: int, budget_s: float, multi: bool) -> tuple[int, int]:
        """(images, rounds) within `budget_s`: fewer images first (multi-pass methods only), then fewer rounds."""
        image_options = [batch]
        while multi and image_options[-1] > 1:
            image_options.append(image_options[-1] // 2)
        for rounds in sorted({repeats, min(repeats, 3), 1}, reverse=True):
            for images in image_options:
                if self.seconds(images, rounds) <= budget_s:
                    return images, rounds
        return image_options[-1], 1


