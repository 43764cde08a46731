"""The same registry through a real MLflow tracking server (MLFLOW_TRACKING_URI)."""

from __future__ import annotations

import pytest
import torch

from registry.store.heads import head_metrics, load_head_version, register_head
from registry.store.releases import bootstrap_release, get_release, load_release, promote_head
from registry.store.tracking import connect, tracking_uri
from registry.store.trunks import register_trunk
from tests.mlflow_server import mlflow_server

@pytest.fixture
def server(tmp_path, migrated_db, monkeypatch):
    root = tmp_path / "server"
    with mlflow_server(root, migrated_db) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield {"url": url, "root": root}


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
