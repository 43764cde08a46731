"""A real ``mlflow server`` for the registry benchmarks and tests: on 127.0.0.1, in its own process group, stopped as one.

A migrated SQLite database is made first (a faster start), the server runs with one worker
by default, and the whole process group is killed at the end. ``tests/mlflow_server.py``
wraps the same functions for the tests (benchmarks do not import tests).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

STARTUP_S = 120


class ServerError(RuntimeError):
    """The server did not start; the message holds the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    """This environment without MLflow's settings, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


def _migrate(db: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{db}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()


def wait_healthy(url: str, proc: subprocess.Popen, log, *, path: str = "/health", what: str = "mlflow server",
                 timeout_s: float = STARTUP_S) -> None:
    """Return once ``url + path`` answers 200; :class:`ServerError` with the log's end if the server exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise ServerError(f"{what} at {url} exited with {proc.returncode}:\n"
                              f"{log.read().decode(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise ServerError(f"{what} at {url} not answering {path} after {timeout_s}s")


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
def serve_store(root: str | Path, *, workers: int = 1, env: dict[str, str] | None = None) -> Iterator[str]:
    """Serve ``root/mlflow.db`` (artifacts in ``root/artifacts``, log ``root/server.log``); yield its URL.

    MLflow's job execution (a job runner and seven huey consumers, each a process importing
    MLflow) is switched off: the registry never submits a job, and those eight processes took
    the cores from the server's own start (11.4 s against 9-11 s here) and from the work beside
    it, and took seconds more to stop.

    Args:
        env: the server's environment (None: this process's).
    """
    root = Path(root)
    env = {**(os.environ if env is None else env), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w+b") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(int(workers))],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root, env=env)
        try:
            wait_healthy(url, proc, log)
            yield url
        finally:
            stop_group(proc)


@contextlib.contextmanager
def mlflow_server(root: str | Path, *, workers: int = 1) -> Iterator[str]:
    """Serve a fresh store from ``root`` (database, artifacts, ``server.log``); yield its URL."""
    from registry.store.tracking import quiet_libraries

    quiet_libraries()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _migrate(root / "mlflow.db")
    with serve_store(root, workers=workers, env=server_env()) as url:
        yield url
