"""A study on object storage: an `s3://` store through s3fs, against an S3-compatible endpoint that the test
starts on 127.0.0.1 (moto's server), written, resumed and scored as a local one is (issue 34)."""
import logging

import numpy as np
import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
s3fs = pytest.importorskip("s3fs")

from flows.cli import main  # noqa: E402


@pytest.fixture
def bucket(monkeypatch):
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request lines
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for key, value in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                           AWS_ENDPOINT_URL=url).items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}).mkdir("atlas")
    yield "s3://atlas"
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
