"""Speed of `xai_methods` side by side with the peers and with the floor.

Workload: torchvision ResNet-18 (``weights=None``, seeded, eval), 224x224
inputs, batch 8, CPU, ``torch.set_num_threads(2)``; ``--model resnet50 --device
cuda`` for the GPU (channels_last, as a study there). For every registered
method (``xai_methods.available()``) the script times

* OURS: ``xai_methods.attribute(name, model, images, target=..., **params)``;
* each PEER with the same parameters (Captum, pytorch-grad-cam), as users run
  it (pytorch-grad-cam computes weight gradients and post-processes in numpy:
  that is part of the peer);
* the FLOOR: the model passes the method cannot avoid, taken from
  ``xai_methods.spec(name).passes(size, **params)`` = (F forward, B backward
  passes per image). A backward pass needs its own forward, so the floor is
  ``(F - B) x one forward under inference_mode`` + ``B x one forward+backward
  to the input only`` (parameters ``requires_grad=False``,
  ``torch.autograd.grad(score.sum(), x)``), all batched like the method:
  ``images x passes`` inputs in chunks of the method's ``internal_batch`` (of
  the batch size when it has none). The floor times up to ``--floor-chunks``
  full chunks per round and extrapolates to the full count of chunks.

OURS, the peers and the floor alternate within every round (the order flips
between rounds) so drifting machine load hits all of them alike; the table
reports the median over rounds in ms per image. Expensive methods are timed on
fewer images and rounds so the whole run fits ``--budget`` seconds per method
(chunked multi-pass methods cost the same per image whatever the batch size);
the table says how many images x rounds each row used.

Run from the repository root::

    .venv/bin/python benchmarks/bench_methods.py --plan           # what would run, estimated duration
    .venv/bin/python benchmarks/bench_methods.py --out docs/performance.md
    .venv/bin/python benchmarks/bench_methods.py --quick --methods saliency,gradcam,occlusion
    python3 benchmarks/bench_methods.py --model resnet50 --device cuda --batch 32 --no-memory
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's ScoreCAM/AblationCAM print progress bars

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import xai_methods as xm  # noqa: E402
from benchlib.memory import MEMORY_CASES, memory_probe, run_memory  # noqa: E402
from benchlib.peers import NO_PEER_NOTE, PEERS, PeerCall, Setup, segments_of  # noqa: E402
from benchlib.planning import (  # noqa: E402
    CASE_PARAMS, BudgetPlan, Calibration, Row, calibrate, method_params, target_kind, warmup_images,
)
from benchlib.report import (  # noqa: E402
    build_workload, check_device, fmt_ms, fmt_params, machine_info, render_markdown,
)
from benchlib.timing import Floor, ModelGuard, PassCounter, floor_parts, lime_surrogate_fit, quiet, timed  # noqa: E402,F401
from xai_methods._core import default_layer, resolve_layer  # noqa: E402

# Every registered method gets a row (the baseline maps need no benchmark: they cost no model pass).
KNOWN_METHODS = [n for n in xm.available() if xm.spec(n).category != "baseline"]


def bench_method(name: str, model: nn.Module, *args: Any, **kwargs: Any) -> tuple[Row, float]:
    """Time one method (see `_bench_method`); afterwards the model is restored and any leak is noted."""
    guard = ModelGuard(model)
    try:
        row, planned = _bench_method(name, model, *args, **kwargs)
    finally:
        changed = guard.restore()
    if changed:
        row.notes.append("a call changed the model (restored before the next method): " + ", ".join(changed))
    return row, planned


def _bench_method(
    name: str,
    model: nn.Module,
    images: Tensor,
    target: Tensor,
    contrast: Tensor,
    *,
    repeats: int,
    budget_s: float,
    quick: bool,
    calib: Calibration,
    floor_chunks: int,
    classes: int,
    max_method_s: float = math.inf,
    plan_only: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Row, float]:
    """Time one method; returns its row and the estimated seconds (the plan)."""
    row = Row(method=name)
    if name not in xm.available():
        row.skipped = "not registered yet"
        return row, 0.0
    s = xm.spec(name)
    row.params = method_params(name, quick, row.notes)
    size = tuple(images.shape[-2:])
    try:
        row.passes = s.passes(size, **row.params)
    except Exception as err:  # noqa: BLE001 - a broken cost function is reported, not fatal
        row.skipped = f"cost function failed: {type(err).__name__}: {err}"
        return row, 0.0
    row.kind = target_kind(name, row.passes)
    peers = PEERS.get(name, [])
    if not peers:
        row.notes.append(NO_PEER_NOTE.get(name, "no installed peer"))
    ib = row.params.get("internal_batch", s.defaults.get("internal_batch"))
    plan = BudgetPlan(calib, row.passes, ib if isinstance(ib, int) else None, 1 + len(peers), floor_chunks)
    row.images, row.rounds = plan.choose(images.shape[0], repeats, budget_s, multi=row.kind != "single")
    planned = plan.seconds(row.images, row.rounds)
    est_image = calib.per_image(row.passes, plan.chunk(row.images))
    if planned > max_method_s:
        row.skipped = (
            f"too expensive for this run: {row.passes[0]} forward + {row.passes[1]} backward passes per image "
            f"with {fmt_params(row.params)}, est. {planned:.0f} s > --max-method-s {max_method_s:.0f}"
        )
        return row, 0.0
    if plan_only:
        return row, planned

    x, t, c = images[: row.images], target[: row.images], contrast[: row.images]
    layer_name = default_layer(model, x)  # the layer ours picks with layer=None; the peers get it too
    layer = resolve_layer(model, layer_name)
    call_kwargs: dict[str, Any] = dict(row.params)
    if s.needs_layer:
        call_kwargs["layer"] = layer_name  # given explicitly, like the peers; layer=None adds one probe forward

    def ours(xx: Tensor = x, tt: Tensor = t, cc: Tensor = c) -> Tensor:
        kw = dict(call_kwargs)
        if s.needs_contrast:
            kw["contrast"] = cc
        return xm.attribute(name, model, xx, target=tt, **kw)

    resolved = {**s.defaults, **row.params}
    for key, value in CASE_PARAMS.get(name, {}).items():  # peers get the workload value even if ours lacks it
        resolved.setdefault(key, value)
    setup = Setup(model=model, layer=layer, params=resolved, batch=row.images, size=size)
    peer_calls: list[tuple[str, PeerCall | None, str]] = []
    for label, factory in peers:
        try:
            peer_calls.append((label, quiet(factory(setup)), ""))
        except Exception as err:  # noqa: BLE001
            peer_calls.append((label, None, _failure(err)))

    f, b = row.passes
    chunk = plan.chunk(row.images)
    extra = None
    if row.kind == "lime":
        extra = lime_surrogate_fit(row.images, int(resolved.get("samples", 1000)), segments_of(resolved))
        row.notes.append(f"floor includes a batched weighted ridge fit ({segments_of(resolved)} superpixels)")
    floor = Floor(model, size, (f - b) * row.images, b * row.images, chunk, classes, floor_chunks, extra)
    if floor.extrapolated:
        row.notes.append(f"floor: {floor_chunks} chunks of {chunk} timed per round, extrapolated")

    # Warm-up (ours counted by the forward hook), then alternating rounds.
    n_warm = warmup_images(est_image, row.images)
    log(f"  {name}: {row.images} image(s) x {row.rounds} round(s), warm-up on {n_warm}, est. {planned:.0f} s")
    if n_warm == 0:
        row.notes.append("no warm-up (one call is long)")
    elif n_warm < row.images:
        row.notes.append(f"warm-up on {n_warm} image")
    try:
        with PassCounter(model) as counter:
            if n_warm:
                ours(x[:n_warm], t[:n_warm], c[:n_warm])
                seen = n_warm
            else:
                first = timed(ours)
                seen = row.images
        row.observed = (counter.images / seen, counter.grad_images / seen)
    except Exception as err:  # noqa: BLE001
        row.skipped = f"ours fails: {_failure(err)}"
        return row, planned
    ours_times: list[float] = [] if n_warm else [first]

    live: list[tuple[str, PeerCall, list[float]]] = []
    failed: dict[str, str] = {label: why for label, fn, why in peer_calls if fn is None}
    for label, fn, _ in peer_calls:
        if fn is None:
            continue
        try:
            if n_warm:
                fn(x[:n_warm], t[:n_warm])
            live.append((label, fn, []))
        except Exception as err:  # noqa: BLE001
            failed[label] = _failure(err)
    if n_warm:
        floor()
    floor_times: list[float] = []

    start_round = 0 if n_warm else 1  # without warm-up, the hooked first call of ours is round 0's ours
    for r in range(row.rounds):
        jobs: list[tuple[str, Callable[[], Any], list[float]]] = []
        if r >= start_round or not ours_times:
            jobs.append(("ours", ours, ours_times))
        jobs += [(label, (lambda fn=fn: fn(x, t)), times) for label, fn, times in live]
        jobs.append(("floor", floor, floor_times))
        if r % 2:
            jobs.reverse()
        for label, job, times in jobs:
            if label == "floor":
                times.append(floor())
                continue
            if label != "ours" and label in failed:
                continue
            try:
                times.append(timed(job))
            except Exception as err:  # noqa: BLE001
                if label == "ours":
                    row.skipped = f"ours fails: {_failure(err)}"
                    return row, planned
                failed[label] = _failure(err)

    per_image = 1000.0 / row.images
    row.ours_ms = statistics.median(ours_times) * per_image
    row.floor_ms = statistics.median(floor_times) * per_image
    for label, _ in peers:
        times = next((tm for lb, _, tm in live if lb == label), [])
        if label in failed:
            row.peers.append((label, None, failed[label]))
        else:
            row.peers.append((label, statistics.median(times) * per_image, ""))
    if row.observed is not None and (round(row.observed[0], 3), round(row.observed[1], 3)) != tuple(
        map(float, row.passes)
    ):
        row.notes.append(
            "passes seen by a forward hook on the model: "
            f"{row.observed[0]:g} fwd ({row.observed[1]:g} with grad) per image, declared {row.passes}"
        )
    return row, planned


def _failure(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> str:
    start_time = time.perf_counter()
    load = os.getloadavg()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.quick else 8)
    repeats = args.repeats or (2 if args.quick else 5)
    budget = args.budget or (20.0 if args.quick else 60.0)
    if args.model == "shapes-cnn":
        args.size = 64
    model, images, target, contrast = build_workload(batch, args.size, model_name=args.model, device=args.device)
    classes = len(model.classes) if args.model == "shapes-cnn" else 1000
    names = args.methods.split(",") if args.methods else sorted(set(xm.available()) | set(KNOWN_METHODS))
    unknown = [n for n in names if n not in xm.available() and n not in KNOWN_METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; registered: {', '.join(xm.available())}")
    order = {c: i for i, c in enumerate(("gradient", "cam", "perturbation", "contrastive"))}

    def sort_key(n: str) -> tuple[int, int, str]:
        if n not in xm.available():
            return (9, 0, n)
        s = xm.spec(n)
        return (order.get(s.category, 8), 0, n)

    names = sorted(names, key=sort_key)
    log(f"load average {load[0]:.2f}; calibrating ...")
    calib = calibrate(model, (args.size, args.size), batch, classes)
    log(f"one forward {calib.fwd_s * 1000:.1f} ms/img, one forward+backward {calib.bwd_s * 1000:.1f} ms/img")

    common = dict(
        repeats=repeats,
        budget_s=budget,
        quick=args.quick,
        calib=calib,
        floor_chunks=args.floor_chunks,
        classes=classes,
        max_method_s=args.max_method_s,
        log=log,
    )
    rows: list[Row] = []
    total_est = 0.0
    for name in names:
        if args.plan:
            row, est = bench_method(name, model, images, target, contrast, plan_only=True, **common)
            total_est += est
            if row.skipped:
                log(f"  {name:24s} skipped: {row.skipped}")
            else:
                log(
                    f"  {name:24s} passes {row.passes}, {row.images} image(s) x {row.rounds} round(s), "
                    f"{len(PEERS.get(name, []))} peer(s): est. {est:.0f} s"
                )
            continue
        log(f"{name} ...")
        try:
            row, _ = bench_method(name, model, images, target, contrast, **common)
        except Exception as err:  # noqa: BLE001 - one broken method must not lose the whole table
            traceback.print_exc()
            row = Row(method=name, skipped=f"benchmark error: {_failure(err)}")
        rows.append(row)
        if row.ours_ms is not None:
            log(f"  ours {fmt_ms(row.ours_ms)} ms/img, floor {fmt_ms(row.floor_ms)}, peers {row.peers}")
    if args.plan:
        mem_est = 0.0
        if not args.no_memory:
            for name, (n_img, params) in MEMORY_CASES.items():
                if name in xm.available():
                    params = {k: v for k, v in params.items() if k in xm.spec(name).defaults}
                    p = xm.spec(name).passes((args.size, args.size), **params)
                    mem_est += 2 * (calib.per_image(p, 8) * n_img + 5)
        log(
            f"estimated duration: {total_est / 60:.1f} min for the methods + {mem_est / 60:.1f} min memory "
            f"(calibrated on this machine at load {load[0]:.2f}; unregistered methods count 0)"
        )
        return ""

    on_cpu = args.device == "cpu"  # the memory section reads the process's RSS
    memory = run_memory(args.size, args.threads, args.quick, log, names) if on_cpu and not args.no_memory else []
    command = " ".join(
        [".venv/bin/python", str(Path(sys.argv[0]).resolve().relative_to(ROOT)) if sys.argv else "bench_methods.py"]
        + [shlex.quote(a) for a in sys.argv[1:]]
    )
    described = ("the built-in shapes-cnn on built-in test images (cdeepex with its shapes VAE)"
                 if args.model == "shapes-cnn" else f"torchvision {args.model} (weights=None, seed 0, eval)")
    where = "CPU" if on_cpu else f"{args.device} ({torch.cuda.get_device_name(args.device)}, channels_last)"
    workload = (
        f"{described}, {args.size}x{args.size}, batch {batch}, {where}, "
        f"torch.set_num_threads({args.threads}), target = top-1 class, contrast = top-2 class, "
        f"layer methods on `{default_layer(model, images)}` "
        f"(passed explicitly, as to the peers), up to {repeats} rounds after one warm-up, "
        f"budget {budget:.0f} s per method"
        + (" -- **--quick: smoke run with reduced sample counts, not a measurement**" if args.quick else "")
        + "."
    )
    return render_markdown(
        rows,
        memory,
        command=command,
        info=machine_info(),
        load=load,
        date=date,
        workload=workload,
        calib=calib,
        duration_s=time.perf_counter() - start_time,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", help="comma-separated method names (default: all registered and all known)")
    p.add_argument("--repeats", type=int, help="timed rounds per method (default 5; --quick 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 2, 2 rounds, capped sample counts")
    p.add_argument("--out", help="write the markdown table here (e.g. docs/performance.md); always printed")
    p.add_argument("--batch", type=int, help="images per call (default 8; --quick 2)")
    p.add_argument("--size", type=int, default=224, help="image side (default 224; 64 with shapes-cnn)")
    p.add_argument("--model", choices=("resnet18", "resnet50", "shapes-cnn"), default="resnet18",
                   help="the workload's model (default resnet18; shapes-cnn for methods that need its generator)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N; the memory section runs on a CPU only")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--budget", type=float, help="seconds per method; expensive methods use fewer images/rounds (default 75)"
    )
    p.add_argument(
        "--max-method-s",
        type=float,
        default=900.0,
        help="skip (with a note) a method whose cheapest measurement is estimated longer (default 900)",
    )
    p.add_argument("--floor-chunks", type=int, default=2, help="full chunks of the floor timed per round (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory-bound section")
    p.add_argument("--plan", action="store_true", help="print the plan and the estimated duration; run nothing")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_device(p, args.device)
    for key in ("repeats", "batch", "threads", "floor_chunks"):
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return 0
    text = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    if text:
        print(text)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

