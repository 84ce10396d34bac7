"""Shared fixtures. Prefect runs against a throw-away API (prefect_test_harness) whose
home and result storage live in a temporary folder, never in the user's ~/.prefect."""
import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="saliency-atlas-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_HOME, "storage")
os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # no telemetry from the test server

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API for tests that run flows (~8 s to start, once per session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
