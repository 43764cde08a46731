"""The same registry through a real MLflow tracking server (MLFLOW_TRACKING_URI)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from registry.store.heads import head_metrics, load_head_version, register_head
from registry.store.releases import bootstrap_release, get_release, load_release, promote_head
from registry.store.tracking import connect, tracking_uri
from registry.store.trunks import register_trunk

STARTUP_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"mlflow server at {url} not healthy after {STARTUP_S}s")


@pytest.fixture
def server(tmp_path, migrated_db, monkeypatch):
    root = tmp_path / "server"
    root.mkdir()
    shutil.copy(migrated_db, root / "mlflow.db")  # schema already migrated: faster start
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w+b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    try:
        _wait_healthy(url, proc, log)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield {"url": url, "root": root}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow  # a server start plus a dozen round trips: about 30-40 s on 2 busy cores
def test_registry_through_a_tracking_server(server, tmp_path, trunk_a, make_result):
    workspace = tmp_path / "ws"
    assert tracking_uri(workspace) == server["url"]
    client = connect(workspace)
    assert not (workspace / "mlflow.db").exists()  # nothing local: the server holds everything

    tv = register_trunk(client, trunk_a)
    assert register_trunk(client, trunk_a) == tv
    result = make_result(trunk_a, "colour")
    hv = register_head(client, result, trunk_version=tv)
    bootstrap_release(client, tv)
    release = promote_head(client, "colour", hv)

    assert get_release(client) == release and release.heads == {"colour": hv}
    mv = client.get_model_version("head.colour", str(hv))
    assert mv.tags["trunk_id"] == trunk_a.trunk_id and mv.tags["gate"] == "passed"
    assert head_metrics(client, "colour", hv)["val_accuracy"] == pytest.approx(0.9)
    # The server, not the workspace, stores the artifacts.
    assert any(p.name == "head.safetensors" for p in (server["root"] / "artifacts").rglob("*"))

    trunk, heads = load_release(client, release)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trunk(x)["pooled"], trunk_a(x)["pooled"])
        feats = trunk_a(x)["pooled"]
        assert torch.equal(heads["colour"].module(feats), result.module(feats))
    assert load_head_version(client, "colour", hv).classes == ["red", "green", "blue"]
