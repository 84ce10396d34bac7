"""A study on object storage: an `s3://` store through s3fs, against an S3-compatible endpoint that the test
starts on 127.0.0.1 (moto's server), written, resumed and scored as a local one is, and shared by two runs at
once through leases (conditional writes), as a local store is through flock (issue 34)."""
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
s3fs = pytest.importorskip("s3fs")

from flows.cli import main  # noqa: E402


BUCKETS = itertools.count()


@pytest.fixture
def bucket(monkeypatch):
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request lines
    # S3 applies a conditional write atomically; moto checks, then writes, in the thread of each request: one
    # lock around its writes makes it the S3 the leases are written against.
    from moto.s3.responses import S3Response

    atomic, put = threading.Lock(), S3Response.put_object

    def put_object(self, *args, **kwargs):
        with atomic:
            return put(self, *args, **kwargs)

    monkeypatch.setattr(S3Response, "put_object", put_object)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for key, value in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                           AWS_ENDPOINT_URL=url).items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"atlas-{next(BUCKETS)}"  # moto keeps its buckets for the process: one of its own for each test
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}).mkdir(name)
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.mark.slow
def test_a_study_on_object_storage_is_written_resumed_and_scored_like_a_local_one(bucket, prefect_api, tmp_path, capsys):
    import storage

    argv = ["study", "--samples", "16", "--block-size", "8", "--methods", "saliency", "--device", "cpu",
            "--figure", "none"]
    remote, local = f"{bucket}/s.zarr", str(tmp_path / "s.zarr")
    assert main([*argv, "--store", remote]) == 0
    assert main([*argv, "--store", local]) == 0
    assert main([*argv, "--store", remote]) == 0 and "is complete" in capsys.readouterr().out  # nothing recomputed
    assert main(["evaluate", remote, "--metrics", "pointing_game", "--no-baselines", "--plot", "none"]) == 0
    assert main(["status", remote, "--verify"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["saliency", "2/2"] for line in out.splitlines()), out
    assert "every one matches its checksum" in out
    a, b = storage.open_dataset(remote), storage.open_dataset(local)
    np.testing.assert_array_equal(a.attribution.values, b.attribution.values)  # the same maps, bit for bit
    assert a.scored.values.all() and list(a.xai_method.values) == ["saliency"]


# --------------------------------------------------------------------------- leases: claims on S3


def test_a_lease_is_held_by_one_run_renewed_released_and_listed(bucket, monkeypatch):
    import storage
    from storage import claims

    monkeypatch.setattr(claims, "LEASE_SECONDS", 1.5)  # renewed every half second
    store = f"{bucket}/leased.zarr"
    with storage.claim(store, "maps-saliency-0") as mine:
        assert mine
        with storage.claim(store, "maps-saliency-0", wait=False) as theirs:
            assert not theirs  # held: another try gets False at once
        time.sleep(3.5)  # more than twice its life: only renewals keep it
        held = storage.holders(store)
        assert [(c["unit"], c["pid"]) for c in held] == [("maps-saliency-0", os.getpid())]
        with storage.claim(store, "maps-saliency-0", wait=False) as theirs:
            assert not theirs
    assert storage.holders(store) == []
    with storage.claim(store, "maps-saliency-0", wait=False) as again:
        assert again  # released: free at once


def test_an_expired_lease_is_taken_over_by_exactly_one_of_many_runs(bucket, monkeypatch):
    """A lease whose holder died (not renewed past its life) goes to one of the runs that want it, never two."""
    import s3fs as s3
    from storage import claims

    fs, root = claims._object_store(f"{bucket}/dead.zarr")
    assert isinstance(fs, s3.S3FileSystem)
    path = f"{root}.claims/attack.lease"
    fs.pipe_file(path, json.dumps({"host": "gone", "pid": 1, "since": 0, "expires": time.time() - 1}).encode())
    takers = [claims.Lease(fs, path) for _ in range(8)]
    barrier = threading.Barrier(len(takers))
    results: list[bool] = []

    def take(lease: claims.Lease) -> None:
        barrier.wait()
        results.append(lease.take())

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [False] * 7 + [True]
    assert json.loads(fs.cat_file(path))["pid"] == os.getpid()  # the winner's, and no other run's, lease
    fresh = claims.Lease(fs, path)
    assert not fresh.take()  # the taken-over lease is live: nobody else takes it


HOLDER = textwrap.dedent("""
    import sys, time, storage
    with storage.claim(sys.argv[1], "retrain-saliency-0.5-0"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_killed_runs_lease_is_taken_over_once_it_expires(bucket):
    """SIGKILL leaves the lease behind (nothing releases it on S3): listed until it expires, then taken over."""
    import storage

    store = f"{bucket}/killed.zarr"
    env = dict(os.environ, SALIENCY_ATLAS_LEASE_SECONDS="3")
    owner = subprocess.Popen([sys.executable, "-c", HOLDER, store], stdout=subprocess.PIPE, text=True, env=env)
    assert owner.stdout.readline().strip() == "held"
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert [c["pid"] for c in storage.holders(store)] == [owner.pid]  # not yet expired
    with storage.claim(store, "retrain-saliency-0.5-0", wait=False) as mine:
        assert not mine
    with storage.claim(store, "retrain-saliency-0.5-0") as mine:  # waits out the dead run's lease
        assert mine and [c["pid"] for c in storage.holders(store)] == [os.getpid()]


@pytest.mark.slow
def test_two_runs_on_one_object_store_study_compute_each_block_once(bucket, prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    store = f"{bucket}/shared.zarr"
    argv = [sys.executable, "-m", "flows.cli", "study", "--samples", "32", "--block-size", "8", "--methods",
            "saliency,gradcam", "--device", "cpu", "--figure", "none"]
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONWARNINGS="ignore")
    runs = [subprocess.Popen([*argv, "--store", store], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [e[-2000:] for _, e in outs]
    computed = [int(re.search(r"attribution blocks: (\d+) computed by this run", o).group(1)) for o, _ in outs]
    assert sum(computed) == 4 * 2, (computed, [o for o, _ in outs])  # 4 blocks x 2 methods, each once
    import storage

    local = str(tmp_path / "local.zarr")
    assert main(["study", "--samples", "32", "--block-size", "8", "--methods", "saliency,gradcam", "--device", "cpu",
                 "--figure", "none", "--store", local]) == 0
    a, b = storage.open_dataset(store), storage.open_dataset(local)
    np.testing.assert_array_equal(a.attribution.values, b.attribution.values)
    assert storage.holders(store) == []
