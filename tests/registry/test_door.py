"""The layout rule of registry/: only the MLflow door (registry/store, and registry/serving,
the pyfunc model MLflow itself loads) talks to MLflow.

Jobs (registry/jobs), reports (registry/reports) and tools pass a client along to
:mod:`registry.store` functions and never call a method of it or import from MLflow
beyond the ``MlflowClient`` type for annotations; trunk/ and heads/ never import MLflow at
all. Checked on the source with ``ast``, so a new direct call fails here, not in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Code outside the door: it may hold a client but only hands it on.
OUTSIDE_DOOR = ("registry/jobs", "registry/reports", "tools")
# Libraries that know nothing of MLflow (DESIGN: trunk/ and heads/ never import mlflow).
NO_MLFLOW = ("trunk", "heads")


def _files(folders) -> list[Path]:
    files = sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folders}"
    return files


def _is_mlflow(module: str | None) -> bool:
    return bool(module) and (module == "mlflow" or module.startswith("mlflow."))


def _client_names(tree: ast.AST) -> set[str]:
    """``client`` plus every argument annotated ``MlflowClient`` (whatever it is called)."""
    names = {"client"}
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            if "MlflowClient" in ast.unparse(node.annotation):
                names.add(node.arg)
    return names


def door_violations(source: str, label: str) -> list[str]:
    """Where code outside the door talks to MLflow: ``label:line: what``, one per offence."""
    tree = ast.parse(source)
    clients = _client_names(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{label}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if _is_mlflow(a.name)]
        elif isinstance(node, ast.ImportFrom) and _is_mlflow(node.module):
            names = [a.name for a in node.names]
            if node.module != "mlflow" or names != ["MlflowClient"]:
                found.append(f"{where}: from {node.module} import {', '.join(names)} (only the MlflowClient type)")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in clients:
            found.append(f"{where}: {node.value.id}.{node.attr} (use a registry.store function)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "MlflowClient":
            found.append(f"{where}: MlflowClient(...) (use registry.store.tracking.connect)")
    return found


def mlflow_imports(source: str, label: str) -> list[str]:
    """Every import of MLflow, however spelt (``import mlflow``, ``from mlflow.x import y``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{label}:{node.lineno}: import {a.name}" for a in node.names if _is_mlflow(a.name)]
        elif isinstance(node, ast.ImportFrom) and _is_mlflow(node.module):
            found.append(f"{label}:{node.lineno}: from {node.module} import ...")
    return found


def test_only_the_door_talks_to_mlflow():
    found = [v for p in _files(OUTSIDE_DOOR) for v in door_violations(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


def test_trunk_and_heads_never_import_mlflow():
    found = [v for p in _files(NO_MLFLOW) for v in mlflow_imports(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


@pytest.mark.parametrize("source, expected", [
    ("def f(client):\n    client.get_run('x')\n", "x.py:2: client.get_run (use a registry.store function)"),
    ("def f(c: MlflowClient):\n    return c.search_model_versions\n",
     "x.py:2: c.search_model_versions (use a registry.store function)"),
    ("import mlflow\n", "x.py:1: import mlflow"),
    ("def f():\n    import mlflow.pyfunc\n", "x.py:2: import mlflow.pyfunc"),
    ("from mlflow.exceptions import MlflowException\n",
     "x.py:1: from mlflow.exceptions import MlflowException (only the MlflowClient type)"),
    ("from mlflow import MlflowClient, log_metric\n",
     "x.py:1: from mlflow import MlflowClient, log_metric (only the MlflowClient type)"),
    ("c = MlflowClient('sqlite:///x')\n", "x.py:1: MlflowClient(...) (use registry.store.tracking.connect)"),
])
def test_the_rule_catches_each_way_round_the_door(source, expected):
    assert door_violations(source, "x.py") == [expected]


def test_the_rule_allows_passing_a_client_along():
    source = ("from mlflow import MlflowClient\n"
              "def job(client: MlflowClient, run) -> int:\n"
              "    return register(client, run.run_id, client=client)\n")
    assert door_violations(source, "x.py") == []
    assert mlflow_imports("from mlflow.entities import Metric\n", "y.py") == ["y.py:1: from mlflow.entities import ..."]
