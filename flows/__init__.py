"""Prefect flows of Saliency Atlas and the ``saliency-atlas`` command line."""
import os

# Defaults for Prefect's temporary local server (used when no PREFECT_API_URL is set);
# a user's own settings win. Its telemetry heartbeat can hit a locked SQLite database at
# start-up and print a spurious traceback, and on two busy cores it can take longer to
# start than Prefect's default timeout of 20 s.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
