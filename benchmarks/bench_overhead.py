"""A method's own cost, without the model's: the method run on a near-free model.

With a model that costs almost nothing (mean colour -> linear head), what remains of a
method's time is its own work: masks, perturbed inputs, segmentation, surrogate fits,
bookkeeping. Divided by its passes it is the overhead per pass, to compare with the
cost of one forward of a real model (ResNet-18 at 224x224: about 20-30 ms per image on
two cores), so ours / floor ~ 1 + overhead per pass / forward. Unlike the side-by-side
timings of bench_methods.py this hardly depends on the machine's load.

    .venv/bin/python benchmarks/bench_overhead.py [--methods rise,lime,occlusion] [--size 224]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import xai_methods as xm  # noqa: E402

# The workloads of docs/performance.md (issue 4).
PARAMS = {
    "rise": {"masks": 4000, "internal_batch": 64},
    "lime": {"samples": 1000, "internal_batch": 64},
    "occlusion": {"window": 32, "stride": 16, "baseline": 0.0, "internal_batch": 64},
}


class NearFree(nn.Module):
    """Logits from the mean colour: a forward pass costs one mean over the image."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.fc = nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="rise,lime,occlusion")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="the minimum over this many calls is reported")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = NearFree().eval()
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(args.batch, 3, 14, 14, generator=g)
    images = nn.functional.interpolate(coarse, size=(args.size, args.size), mode="bicubic", align_corners=False)
    print("| method | params | passes/image | own time ms/image | overhead ms/pass |")
    print("|---|---|---|---|---|")
    for name in args.methods.split(","):
        params = PARAMS.get(name, {})
        passes = sum(xm.spec(name).passes((args.size, args.size), **params))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            xm.attribute(name, model, images, **params)
            times.append((time.perf_counter() - start) / args.batch)
        own = min(times)
        shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
        print(f"| {name} | {shown} | {passes} | {own * 1000:.0f} | {own / passes * 1000:.3g} |")


if __name__ == "__main__":
    main()
