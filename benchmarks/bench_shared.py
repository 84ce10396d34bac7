"""Shared passes: the eight one-pass methods of a study from one forward and one backward pass.

The eight are saliency, input_x_gradient, cam, gradcam, gradcam_pp, hirescam, layercam and
xgradcam. Each round times, alternately (the order flips every round):

* SHARED: ``xai_methods.attribute_many(EIGHT, ...)``: what a study now does per block;
* SINGLES: the eight ``xai_methods.attribute`` calls one after another: what a study did before;
* PEERS: the same eight as users of the peers compute them. Captum's Saliency and InputXGradient,
  and pytorch-grad-cam's GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM and XGradCAM. CAM has no
  installed peer; its row is our own single call.
* FLOOR: one forward and one backward pass to the input, with the parameters frozen.

The table gives medians in ms per image and the ratios. The target is SHARED at most 1.3x FLOOR.

    .venv/bin/python benchmarks/bench_shared.py --out docs/performance-shared.md
    .venv/bin/python benchmarks/bench_shared.py --quick
    python3 benchmarks/bench_shared.py --device cuda --models resnet50 --batch 32   # a GPU: the card is named
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

import xai_methods as xm  # noqa: E402
from benchlib.peers import PEERS, Setup  # noqa: E402
from benchlib.report import build_workload, check_device, machine_info  # noqa: E402
from benchlib.timing import frozen_params, quiet, timed  # noqa: E402

EIGHT = ["saliency", "input_x_gradient", "cam", "gradcam", "gradcam_pp", "hirescam", "layercam", "xgradcam"]
PEER_OF = {"saliency": "captum Saliency", "input_x_gradient": "captum InputXGradient", "gradcam": "grad-cam GradCAM",
           "gradcam_pp": "grad-cam GradCAMPlusPlus", "hirescam": "grad-cam HiResCAM", "layercam": "grad-cam LayerCAM",
           "xgradcam": "grad-cam XGradCAM"}
LAYERS = {"resnet18": "layer4", "resnet50": "layer4", "shapes-cnn": None}
BATCHES = {"resnet18": 8, "resnet50": 8, "shapes-cnn": 64}  # images per call, unless --batch (--quick: 4 at 224)


def contestants(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor, layer: str | None) -> dict:
    """name -> a call that computes the eight (or the floor) on the batch."""
    module = xm._core.resolve_layer(model, layer or xm._core.default_layer(model, images))
    setup = Setup(model=model, layer=module, params={}, batch=len(images), size=tuple(images.shape[-2:]))
    peers = {m: quiet(dict(PEERS[m])[label](setup)) for m, label in PEER_OF.items()}

    def shared() -> None:
        xm.attribute_many(EIGHT, model, images, target=target, layer=module)

    def singles() -> None:
        for m in EIGHT:
            xm.attribute(m, model, images, target=target, **({"layer": module} if xm.spec(m).needs_layer else {}))

    def peer_eight() -> None:
        for m in EIGHT:
            if m in peers:
                peers[m](images, target)
            else:  # no installed peer computes CAM: ours stands in
                xm.attribute(m, model, images, target=target, layer=module)

    def floor() -> None:
        with frozen_params(model), torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)

    return {"shared": shared, "singles": singles, "peers": peer_eight, "floor": floor}


def run(model_name: str, batch: int, size: int, rounds: int, device: str) -> dict[str, float]:
    model, images, target, _ = build_workload(batch, size, model_name=model_name, device=device)
    calls = contestants(model, images, target, LAYERS[model_name])
    for call in calls.values():  # warm-up
        call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        for name in (list(calls) if r % 2 == 0 else list(reversed(calls))):
            times[name].append(timed(calls[name]) * 1000 / batch)
    return {k: statistics.median(v) for k, v in times.items()}


def table(results: dict[str, dict[str, float]], workloads: dict[str, str]) -> list[str]:
    rows = ["| workload | shared ms/img | singles ms/img | peers ms/img | floor ms/img | shared/floor | "
            "singles/shared | peers/shared | target (shared <= 1.3x floor) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {workloads[name]} | {r['shared']:.1f} | {r['singles']:.1f} | {r['peers']:.1f} | {r['floor']:.1f} "
                    f"| {r['shared'] / r['floor']:.2f}x | {r['singles'] / r['shared']:.2f}x | {r['peers'] / r['shared']:.2f}x "
                    f"| {'met' if r['shared'] <= 1.3 * r['floor'] else '**not met**'} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 rounds, batch 4 at 224x224")
    ap.add_argument("--models", default="resnet18,shapes-cnn", help=f"comma-separated, of {', '.join(LAYERS)}")
    ap.add_argument("--batch", type=int, default=None, help="images per call (default per model: " +
                    ", ".join(f"{k} {v}" for k, v in BATCHES.items()) + ")")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--out", default=None, help="write the markdown table here (default: print it)")
    args = ap.parse_args()
    models = args.models.split(",")
    if unknown := [m for m in models if m not in LAYERS]:
        ap.error(f"--models: unknown {unknown}; known: {', '.join(LAYERS)}")
    check_device(ap, args.device)
    torch.set_num_threads(2)
    rounds = 2 if args.quick else args.rounds
    t0, load = time.time(), os.getloadavg()
    results, workloads = {}, {}
    for m in models:
        size = 64 if m == "shapes-cnn" else 224
        batch = args.batch or (4 if args.quick and size == 224 else BATCHES[m])
        results[m] = run(m, batch, size, rounds, args.device)
        where = "CPU" if args.device == "cpu" else f"{torch.cuda.get_device_name(args.device)} (channels_last)"
        workloads[m] = f"{m} {size}x{size}, batch {batch}, {where}"
    info = machine_info()
    command = " ".join(["benchmarks/bench_shared.py", *sys.argv[1:]])
    text = ["# Shared passes: the eight one-pass methods together", "", "Generated by", "",
            f"```\n.venv/bin/python {command}\n```", "",
            f"- Machine: {info.get('cpu')}, {info.get('cores')} cores"
            + (f", GPU {info['gpu']}" if info["gpu"] != "none" else "") + f", torch {torch.__version__} with 2 threads.",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {rounds} rounds after a "
            f"warm-up, medians; the run took {time.time() - t0:.0f} s; load average at start {load[0]:.2f}.",
            "- The eight: " + ", ".join(EIGHT) + ". Peers: " + ", ".join(PEER_OF.values())
            + "; CAM has no installed peer (ours stands in for it in the peers' column).", "",
            *table(results, workloads), ""]
    out = "\n".join(text)
    if args.out:
        Path(args.out).write_text(out)
    print(out)


if __name__ == "__main__":
    main()
