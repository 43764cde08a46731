"""Tracking URI, client and experiments: SQLite in the workspace, artifacts beside it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from registry.store.tracking import ARTIFACTS_DIR, EXPERIMENTS, RegistryError, connect, experiment_id, tracking_uri


def test_default_uri_is_sqlite_in_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path / "ws") == f"sqlite:///{(tmp_path / 'ws').resolve()}/mlflow.db"


def test_environment_uri_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5999"


def test_connect_creates_experiments_with_artifacts_beside_db(client, workspace):
    for name in EXPERIMENTS:
        exp = client.get_experiment_by_name(name)
        assert exp is not None, name
        assert Path(urlparse(exp.artifact_location).path) == workspace.resolve() / ARTIFACTS_DIR / name
        assert experiment_id(client, name) == exp.experiment_id
    run = client.create_run(experiment_id(client, "heads"))
    note = workspace / "note.txt"
    note.write_text("hello")
    client.log_artifact(run.info.run_id, str(note))
    stored = workspace / ARTIFACTS_DIR / "heads" / run.info.run_id / "artifacts" / "note.txt"
    assert stored.read_text() == "hello"


def test_connect_is_idempotent_and_does_not_leak_uri(client, workspace, tmp_path):
    ids = {n: experiment_id(client, n) for n in EXPERIMENTS}
    again = connect(workspace)
    assert {n: experiment_id(again, n) for n in EXPERIMENTS} == ids
    # MLflow exports its global URI to the environment; the next workspace must still get its own store.
    assert tracking_uri(tmp_path / "other") == f"sqlite:///{(tmp_path / 'other').resolve()}/mlflow.db"


def test_experiment_id_of_missing_experiment_names_it(client):
    with pytest.raises(RegistryError, match="no experiment 'nope'"):
        experiment_id(client, "nope")


def test_fresh_workspace_is_created_quietly(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = tmp_path / "fresh" / "ws"
    client = connect(ws)
    assert (ws / "mlflow.db").is_file()
    assert experiment_id(client, "trunks")
    err = capfd.readouterr().err
    assert "Creating initial MLflow database tables" not in err
    assert "alembic" not in err.lower()
