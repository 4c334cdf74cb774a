"""The process environment the flows need, set before Prefect is imported (below the flows and the face)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def prefect_env() -> None:
    """Offline Prefect defaults, set before Prefect is imported: no analytics or telemetry, the
    ephemeral local API unless PREFECT_API_URL is set, and a writable PREFECT_HOME (a fresh temp
    folder when ~/.prefect cannot be written, e.g. a read-only home in CI)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
    os.environ.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")
    # the ephemeral API server needs longer than Prefect's 20 s default on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if "PREFECT_HOME" not in os.environ:
        home = Path.home() / ".prefect"
        try:
            home.mkdir(parents=True, exist_ok=True)
            probe = home / f".tailforge-write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError:
            os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="tailforge-prefect-")
