"""Claims: one writer per block, however many runs share a store.

Two runs may name the same store at once (two command lines, or a scheduled audit that starts
while yesterday's still runs). Each unit of work (creating or growing the store, ingesting a
block, one method's block, one metric's block) is claimed with an exclusive ``flock`` on its own
file in ``<store>.claims/`` beside the store. A run waits for a claim another run holds, then
re-reads the flag and skips the unit if the other run finished it, so no block is computed twice
and no two writers touch one chunk. A study first passes over the units another run is
computing (`wait=False`) and comes back to them at the end of each stage, so two runs share
the work instead of one trailing the other.

A claim never outlives its owner: the kernel releases a ``flock`` when the process that holds it
exits or is killed (SIGKILL included), so there is no stale claim to expire. On NFS, Linux maps
``flock`` to the server's byte-range locks, which the server drops when the client's lease
lapses (about 90 s). Each file records who holds it (host, pid, since) for `holders`. Stores
at fsspec URLs (s3://...) are not claimed: run one writer at a time there.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator


def claims_dir(store: str) -> Path | None:
    """The folder of `store`'s claims (None for an fsspec URL, which is not claimed)."""
    return None if "://" in store else Path(str(store).rstrip("/") + ".claims")


@contextlib.contextmanager
def claim(store: str, unit: str, wait: bool = True) -> Iterator[bool]:
    """Hold the claim on `unit` of `store` inside the block, which gets True. While another run holds
    it: wait for it, or with `wait` False get False at once (and hold nothing)."""
    folder = claims_dir(store)
    if folder is None:
        yield True
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{unit}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode())
        yield True
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def holders(store: str) -> list[dict[str, Any]]:
    """The claims held right now: unit, host, pid and since (epoch seconds)."""
    folder = claims_dir(store)
    if folder is None or not folder.is_dir():
        return []
    held = []
    for path in sorted(folder.glob("*.lock")):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append({"unit": path.stem, **json.loads(path.read_text() or "{}")})
        finally:
            os.close(fd)
    return held
