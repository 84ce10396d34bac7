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
lapses (about 90 s). Each file records who holds it (host, pid, since) for `holders`.

On S3 (``s3://`` through s3fs), where nothing is released when a process dies, a claim is a lease:
an object ``<store>.claims/<unit>.lease`` created only if absent (a conditional write, If-None-Match),
renewed by its holder every `LEASE_SECONDS`/3 (If-Match its own ETag, so a lease taken over is never
renewed by its old holder) and deleted on release. A lease not renewed for `LEASE_SECONDS` belongs to
a run that died: the next run takes it over with a conditional write on the expired object's ETag, so
exactly one run wins it. Expiry is read from the holder's clock (hosts are assumed NTP-synchronised,
seconds apart, against a minute). Stores at other fsspec URLs (gs://, memory://...) are not claimed:
run one writer at a time there.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

# an object-store claim not renewed for this long is taken over: its run died (tests shorten it)
LEASE_SECONDS = float(os.environ.get("SALIENCY_ATLAS_LEASE_SECONDS", "60"))
POLL_SECONDS = 0.5  # how often a run waiting for an object-store claim asks again

log = logging.getLogger(__name__)


def claims_dir(store: str) -> Path | None:
    """The folder of a local `store`'s claims (None for an fsspec URL)."""
    return None if "://" in store else Path(str(store).rstrip("/") + ".claims")


def claim(store: str, unit: str, wait: bool = True) -> contextlib.AbstractContextManager[bool]:
    """Hold the claim on `unit` of `store` inside the block, which gets True. While another run holds
    it: wait for it, or with `wait` False get False at once (and hold nothing)."""
    folder = claims_dir(store)
    if folder is not None:
        return _locked(folder, unit, wait)
    fs, root = _object_store(store)
    return _leased(fs, f"{root}.claims/{unit}.lease", wait) if fs is not None else contextlib.nullcontext(True)


def _holder(**more: Any) -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), **more}).encode()


@contextlib.contextmanager
def _locked(folder: Path, unit: str, wait: bool) -> Iterator[bool]:
    """A claim on a local disk: an exclusive flock on `folder/unit.lock`."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{unit}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, _holder())
        yield True
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def _object_store(store: str) -> tuple[Any, str]:
    """(the s3fs file system, the store's bucket/key) of an s3:// store; (None, its path) at other URLs."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(store)
    return (fs if "s3" in fs.protocol else None), root.rstrip("/")


class Lease:
    """One claim on S3 (see the module's text): `take` it, `renew` it from a thread, `release` it."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)
        self.etag: str | None = None
        self.lost = False

    def _put(self, **condition: str) -> bool:
        """Write this run's lease under `condition`; False when the condition fails (another run's lease)."""
        body = _holder(expires=time.time() + LEASE_SECONDS)
        try:
            self.etag = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]
            return True
        except FileExistsError:  # If-None-Match: a lease is there
            return False
        except OSError as e:  # If-Match: the lease changed hands, or went, since its ETag was read
            if e.errno in (errno.EINVAL, errno.ENOENT):
                return False
            raise

    def take(self) -> bool:
        """One try: create the lease, or take over an expired one (ETag first, then the body it dates)."""
        if self._put(IfNoneMatch="*"):
            return True
        try:
            etag = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
            held = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:  # released meanwhile: the next try creates it
            return False
        return held.get("expires", 0) < time.time() and self._put(IfMatch=etag)

    def renew(self, stop: threading.Event) -> None:
        """Until `stop`: rewrite the lease every third of its life, only while it is still this run's."""
        while not stop.wait(LEASE_SECONDS / 3):
            try:
                if not self._put(IfMatch=self.etag or ""):
                    self.lost = True
                    log.warning("the claim %s was taken over by another run: this run did not renew it for %.0f s; "
                                "its unit may be computed twice (to the same values)", self.path, LEASE_SECONDS)
                    return
            except OSError as e:  # the endpoint did not answer: try again, well before the lease runs out
                log.warning("could not renew the claim %s (%s); trying again", self.path, e)

    def release(self) -> None:
        if not self.lost:
            with contextlib.suppress(FileNotFoundError):
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


@contextlib.contextmanager
def _leased(fs: Any, path: str, wait: bool) -> Iterator[bool]:
    """A claim on S3: a `Lease`, renewed while the block runs and released after it."""
    lease = Lease(fs, path)
    while not lease.take():
        if not wait:
            yield False
            return
        time.sleep(POLL_SECONDS)
    stop = threading.Event()
    renewer = threading.Thread(target=lease.renew, args=(stop,), name=f"lease {path}", daemon=True)
    renewer.start()
    try:
        yield True
    finally:
        stop.set()
        renewer.join()
        lease.release()


def holders(store: str) -> list[dict[str, Any]]:
    """The claims held right now: unit, host, pid and since (epoch seconds)."""
    if "://" in store:
        return _lease_holders(store)
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


def _lease_holders(store: str) -> list[dict[str, Any]]:
    """The unexpired leases of an S3 store (none at other URLs)."""
    fs, root = _object_store(store)
    if fs is None:
        return []
    fs.invalidate_cache(f"{root}.claims")
    held = []
    for path in sorted(fs.glob(f"{root}.claims/*.lease")):
        with contextlib.suppress(FileNotFoundError):
            lease = json.loads(fs.cat_file(path))
            if lease.get("expires", 0) > time.time():
                held.append({"unit": path.rsplit("/", 1)[1].removesuffix(".lease"), **lease})
    return held
