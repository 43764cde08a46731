"""A real ``mlflow server`` for tests: on 127.0.0.1, in its own process group, killed as a group."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log, *, path: str = "/health", what: str = "mlflow server",
                 timeout_s: float = STARTUP_S) -> None:
    """Return once ``url + path`` answers 200; fail the test if the server exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{what} at {url} not answering {path} after {timeout_s}s")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server's process group, SIGKILL what outlives it (workers included)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):  # workers that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)


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
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w+b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root, env=env)
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        stop_group(proc)
        log.close()
