"""End to end: a study from an image folder (written here) x 6 methods on the built-in model, against the
bare compute of the same attributions measured in the same run, with the split of the study's time.

    .venv/bin/python benchmarks/bench_e2e.py [--images 2000] [--block-size 250] [--rounds 2]
                                             [--scale-out] [--default-malloc] [--out FILE]

The folder holds the built-in test images as 128x128 PNGs in class sub-folders (the model reads them at
64x64). Rounds alternate bare and study (fresh store each), so that the machine's drift hits both alike.
Bare: the images decoded once beforehand, then per block normalisation, prediction and `attribute_many`
of the six methods, in memory. The study: the whole `study` flow on the folder (checking the files,
Prefect tasks, decoding, Zarr writes), split into the dataset check, per stage the loading, compute and
writing inside the tasks (they overlap: a unit loads and writes while another computes), and Prefect's
time outside the tasks. Each study round starts like a fresh command-line run: the folder is checked
again (no dataset cached from the round before), and glibc's malloc retains freed memory as the command
line sets it (`tasks.study.memory.retain_freed_memory`; --default-malloc leaves it as it is, for bare and study
alike). With --scale-out, the same study also on a local Dask cluster of 2 processes and
on an existing cluster started with `dask scheduler` / `dask worker` (2 single-threaded workers).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import xai_methods as xm  # noqa: E402
import zoo  # noqa: E402
from benchlib.report import publish  # noqa: E402
from tasks.study.memory import retain_freed_memory  # noqa: E402

METHODS = ["saliency", "input_x_gradient", "gradcam", "gradcam_pp", "guided_backprop", "occlusion"]
PARAMS = {"occlusion": {"window": 16, "stride": 16}}


def write_folder(root: Path, n: int) -> None:
    """`n` built-in test images as 128x128 PNGs under root/<class>/."""
    data = zoo.load_dataset("shapes", limit=n)
    batch = data.load(0, n)
    for i, (img, label) in enumerate(zip(batch.images, batch.labels)):
        folder = root / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (img.transpose(1, 2, 0) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).resize((128, 128), Image.BILINEAR).save(folder / f"{i:05d}.png")


def bare(folder: Path, block: int) -> dict[str, float]:
    """Check and decode every image (as the study does, in decode threads), then the compute of the study's
    attributions on them."""
    model = zoo.load_model("shapes-cnn")
    t0 = time.perf_counter()
    data = zoo.FolderDataset(folder, size=model.preprocess.size)
    batch = data.load(0, len(data))
    decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, len(data), block):
        images = model.preprocess(torch.from_numpy(batch.images[start:start + block]))
        with torch.inference_mode():
            target = model(images).argmax(1)
        xm.attribute_many(METHODS, model, images, target=target, params=PARAMS)
    return {"decode": decode, "compute": time.perf_counter() - t0}


def run_study(folder: Path, store: str, block: int, **where) -> dict[str, float]:
    """The study as a fresh command-line run makes it: the folder checked (no dataset cached from before)."""
    from flows.study import study
    from tasks.loading import _load_dataset

    _load_dataset.cache_clear()
    t0 = time.perf_counter()
    s = study(dataset=str(folder), model="shapes-cnn", methods=METHODS, params=PARAMS, samples=None,
              block_size=block, store=store, device="cpu", figure=None, **where)
    total = time.perf_counter() - t0
    sec = s["seconds"]
    return {"total": total, "blocks": sec["blocks"], "outside_tasks": sec["blocks"] - sec["in_tasks"],
            "flow_body": sec["flow"], "flow_ends": total - sec["flow"], "outside_blocks": sec["flow"] - sec["blocks"],
            **{f"{k}.{part}": v for k in ("ingest", "attribute") for part, v in sec[k].items()}}


def existing_cluster(tmp: str) -> tuple[str, list[subprocess.Popen]]:
    """`dask scheduler` and two `dask worker`s (1 thread each) on this machine; their address and processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [subprocess.Popen([bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, cwd=tmp, stderr=subprocess.DEVNULL)]
    time.sleep(3)
    procs += [subprocess.Popen([bin_dir / "dask", "worker", address, "--nthreads", "1", "--no-dashboard",
                                "--preload", "tasks", "--name", str(i)], env=env, cwd=tmp, stderr=subprocess.DEVNULL)
              for i in range(2)]
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
    return address, procs


def table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scale-out", action="store_true", help="also 2 Dask processes, and an existing cluster")
    ap.add_argument("--out", default=None, help="append the markdown tables to this file")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc as it is (the command line retains freed memory; tasks.study.memory)")
    args = ap.parse_args()
    if not args.default_malloc:  # as the command line does, before any thread starts
        retain_freed_memory()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from prefect.testing.utilities import prefect_test_harness

    load = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="bench-e2e-")
    folder = Path(tmp, "images")
    write_folder(folder, args.images)
    bares, studies, scale = [], [], {}
    with prefect_test_harness(server_startup_timeout=120):
        run_study(folder, os.path.join(tmp, "warm.zarr"), args.block_size)  # API up, imports, caches warm
        for r in range(args.rounds):
            bares.append(bare(folder, args.block_size))
            studies.append(run_study(folder, os.path.join(tmp, f"s{r}.zarr"), args.block_size))
            print(f"round {r}: bare {bares[-1]}, study {studies[-1]}", flush=True)
        if args.scale_out:
            scale["dask LocalCluster, 2 processes"] = run_study(folder, os.path.join(tmp, "d2.zarr"),
                                                                args.block_size, workers=2)["total"]
            address, procs = existing_cluster(tmp)
            try:
                scale["existing cluster (dask scheduler + 2 dask workers)"] = run_study(
                    folder, os.path.join(tmp, "ex.zarr"), args.block_size, dask_address=address)["total"]
            finally:
                for p in procs[::-1]:
                    p.terminate()
    med = {k: statistics.median(s[k] for s in studies) for k in studies[0]}
    compute = statistics.median(b["compute"] for b in bares)
    decode = statistics.median(b["decode"] for b in bares)
    work = args.images * len(METHODS)
    rows = [
        ("bare compute (prediction + the six methods, decoded inputs in memory)", f"{compute:.1f} s"),
        ("bare checking and decoding of the folder (decode threads)", f"{decode:.1f} s"),
        ("study, whole flow", f"{med['total']:.1f} s = {work / med['total']:.0f} images x methods / s"),
        ("study over bare compute", f"{med['total'] / compute:.2f}x (target <= 1.2x)"),
        ("study over bare compute + bare decoding", f"{med['total'] / (compute + decode):.2f}x"),
        ("study, the flow's body (without Prefect's start and end of the flow run)",
         f"{med['flow_body']:.1f} s = {med['flow_body'] / compute:.2f}x the bare compute"),
        ("Prefect's start and end of the flow run (the end waits for its heartbeat thread's 1 s sleep)",
         f"{med['flow_ends']:.1f} s"),
        ("in the body, outside the blocks: checking the folder's files (decodes each, keeps the pixels), the store, "
         "the summary", f"{med['outside_blocks']:.1f} s"),
        *((f"{stage}: {part} (inside tasks)", f"{med[f'{stage}.{part}']:.1f} s")
          for stage in ("ingest", "attribute") for part in ("load", "compute", "write")),
        ("Prefect outside the tasks (blocks stage wall - time inside tasks)", f"{med['outside_tasks']:.1f} s"),
    ]
    lines = [f"\n## End to end: a folder of {args.images} images x {len(METHODS)} methods\n",
             f"`python benchmarks/bench_e2e.py --images {args.images} --block-size {args.block_size} --rounds "
             f"{args.rounds}{' --scale-out' if args.scale_out else ''}{' --default-malloc' if args.default_malloc else ''}`"
             f" (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')}) on {platform.processor() or platform.machine()}"
             f" ({os.cpu_count()} cores), torch {torch.__version__}, load average at start {load:.2f}; medians of "
             f"{args.rounds} alternating rounds. Methods: {', '.join(METHODS)} (occlusion window 16, stride 16).\n",
             *table(rows)]
    if scale:
        one = med["total"]
        lines += ["", "| where the block tasks run | seconds | over one process |", "|---|---|---|",
                  f"| one process (default) | {one:.1f} | 1.00x |",
                  *(f"| {k} | {v:.1f} | {v / one:.2f}x |" for k, v in scale.items())]
    publish("\n".join(lines) + "\n", args.out)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
