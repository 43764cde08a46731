"""A real ``mlflow server`` for the registry benchmarks: on 127.0.0.1, in its own process group, stopped as one.

The benchmarks' own copy of what ``tests/mlflow_server.py`` does for the tests (benchmarks
do not import tests): a migrated SQLite database is made first (a faster start), the server
runs with one worker, and the whole process group is killed at the end.
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


def _stop(proc: subprocess.Popen) -> None:
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
def mlflow_server(root: str | Path, *, workers: int = 1) -> Iterator[str]:
    """Serve a fresh store from ``root`` (database, artifacts, ``server.log``); yield its URL."""
    from registry.store.tracking import quiet_libraries

    quiet_libraries()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _migrate(root / "mlflow.db")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w+b") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(int(workers))],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root, env=server_env())
        try:
            deadline = time.monotonic() + STARTUP_S
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise ServerError(f"mlflow server at {url} did not start (exit {proc.poll()}):\n"
                                      f"{log.read().decode(errors='replace')[-2000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.3)
            yield url
        finally:
            _stop(proc)
