"""A real ``mlflow server`` for tests: on 127.0.0.1, in its own process group, killed as a group.

The one implementation is :mod:`benchmarks.server`; here its failures fail the test.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import server
from benchmarks.server import STARTUP_S, ServerError, free_port, stop_group

__all__ = ["free_port", "mlflow_server", "stop_group", "wait_healthy"]


def wait_healthy(url: str, proc: subprocess.Popen, log, *, path: str = "/health", what: str = "mlflow server",
                 timeout_s: float = STARTUP_S) -> None:
    """Return once ``url + path`` answers 200; fail the test if the server exits or never does."""
    try:
        server.wait_healthy(url, proc, log, path=path, what=what, timeout_s=timeout_s)
    except ServerError as e:
        pytest.fail(str(e))


@contextlib.contextmanager
def mlflow_server(root: Path, migrated_db: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Serve a copy of ``migrated_db`` (schema already migrated: a faster start) from ``root``; yield its URL.

    Args:
        root: the server's folder: its database, artifacts and ``server.log``.
        migrated_db: an MLflow database with its schema in place.
        env: the server's environment (None: this process's).
    """
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(migrated_db, root / "mlflow.db")
    try:
        with server.serve_store(root, env=env) as url:
            yield url
    except ServerError as e:
        pytest.fail(str(e))
