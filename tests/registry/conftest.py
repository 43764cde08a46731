"""Registry fixtures: a real SQLite MLflow store per test, tiny trunks and real heads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

SMALL = {"input_size": [3, 32, 32], "crop_pct": 1.0}


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty MLflow database with its schema in place.

    Creating the schema runs every alembic migration (seconds); copying the result into
    each test's workspace gives every test its own real store without paying that again.
    """
    from mlflow import MlflowClient

    from registry.store.tracking import quiet_libraries

    quiet_libraries()
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()
    return path


@pytest.fixture
def workspace(tmp_path, migrated_db, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(migrated_db, ws / "mlflow.db")
    return ws


@pytest.fixture
def client(workspace):
    from registry.store.tracking import connect

    return connect(workspace)


@pytest.fixture(scope="session")
def trunk_a():
    from trunk.model import Trunk

    return Trunk("test_resnet", data_config=SMALL)


@pytest.fixture(scope="session")
def trunk_b():
    """Same architecture, other weights: another trunk_id."""
    from trunk.model import Trunk

    return Trunk("test_resnet", seed=1, data_config=SMALL)


def head_config(name: str, data_root: str, *, gate: dict | None = None, owner: str = "team-vision") -> dict:
    return {
        "name": name,
        "owner": owner,
        "data": {"root": data_root},
        "attach": {"tap": "pooled"},
        "module": {"_target_": "heads.modules.LinearHead", "dropout": 0.0},
        "train": {"epochs": 3},
        "gate": gate or {"min_val_accuracy": 0.5},
        "description": f"{name} classifier",
    }


@pytest.fixture
def make_result(tmp_path):
    """Build a real HeadResult: a seeded LinearHead on the trunk's pooled tap, plausible figures."""
    from heads.modules import LinearHead
    from heads.result import HeadResult
    from heads.spec import validate

    def make(trunk, name: str = "colour", *, classes=("red", "green", "blue"), val_accuracy: float = 0.9,
             gate: dict | None = None, seed: int = 0, slices: dict | None = None, data_sha: str = "d" * 16):
        spec = validate(head_config(name, str(tmp_path / "data" / name), gate=gate),
                        source=f"conf/heads/{name}.yaml", expected_name=name)
        in_features = trunk.tap("pooled").channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = LinearHead(in_features=in_features, num_classes=len(classes)).eval()
        n_params = sum(p.numel() for p in module.parameters())
        k = len(classes)
        confusion = [[8 if i == j else 1 for j in range(k)] for i in range(k)]
        return HeadResult(
            spec=spec, module=module, classes=list(classes), in_features=in_features,
            trunk_id=trunk.trunk_id, data_sha=data_sha,
            metrics={"val_accuracy": val_accuracy, "val_macro_f1": val_accuracy - 0.02, "params": float(n_params),
                     "added_gflops": 2 * in_features * k / 1e9, "added_ms_per_image": 0.004},
            per_class_recall={c: round(0.8 + 0.05 * i, 3) for i, c in enumerate(classes)},
            slice_accuracy=slices or {},
            confusion=confusion,
        )

    return make
