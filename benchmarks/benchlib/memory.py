"""Peak memory of a method in a fresh process (the internal_batch bound)."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import xai_methods as xm
from .planning import QUICK_CAPS
from .report import build_workload
from .timing import PassCounter

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- memory


MEMORY_CASES = {  # method -> (images, workload params); the bound is internal_batch inputs per model call
    "integrated_gradients": (4, {"steps": 32}),
    "smoothgrad": (4, {"samples": 16}),
    "scorecam": (1, {}),
}


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_probe(spec_json: str) -> dict[str, Any]:
    """In a fresh process: largest batch the model saw and the growth of peak RSS during one call.

    spec_json: {"method", "params", "images", "size", "threads"}. Peak RSS growth is VmHWM
    after the call (its mark reset just before) minus VmRSS before; where /proc cannot be
    used, the growth of ru_maxrss (which misses peaks below the process's earlier peak).
    """
    job = json.loads(spec_json)
    name, params, images, size = job["method"], job["params"], job["images"], job["size"]
    torch.set_num_threads(job["threads"])
    model, x, t, _ = build_workload(images, size)
    with torch.inference_mode():
        model(x[:1])  # libraries loaded and allocator primed before the baseline is read
    rss_before = _status_kb("VmRSS")
    use_hwm = rss_before is not None and _reset_peak_rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with PassCounter(model) as counter:
        xm.attribute(name, model, x, target=t, **params)
    if use_hwm:
        growth_kb, how = _status_kb("VmHWM") - rss_before, "VmHWM - VmRSS"
    else:
        growth_kb, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before, "ru_maxrss delta"
    return {"max_batch": counter.max_batch, "rss_growth_mb": growth_kb / 1024, "rss_how": how, "images": images}


def run_memory(
    size: int, threads: int, quick: bool, log: Callable[[str], None], methods: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    rows = []
    values = (4, 16) if quick else (8, 32)
    for name, (images, params) in MEMORY_CASES.items():
        if methods is not None and name not in methods:
            continue
        if name not in xm.available():
            rows.append({"method": name, "skipped": "not registered yet"})
            continue
        if "internal_batch" not in xm.spec(name).defaults:
            rows.append({"method": name, "skipped": "takes no internal_batch"})
            continue
        params = {k: v for k, v in params.items() if k in xm.spec(name).defaults}
        if quick:
            images = min(images, 2)
            params = {k: min(v, QUICK_CAPS.get(k, v)) for k, v in params.items()}
        for ib in values:
            log(f"  memory: {name} internal_batch={ib} on {images} image(s)")
            job = {"method": name, "params": {**params, "internal_batch": ib}, "images": images, "size": size}
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_methods.py"), "--memory-probe", json.dumps({**job, "threads": threads})]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            row: dict[str, Any] = {"method": name, "internal_batch": ib, "params": params, "images": images}
            if proc.returncode:
                row["skipped"] = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            else:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append(row)
    return rows


