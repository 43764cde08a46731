"""A workspace is one movable folder: a copy or a move never reads or writes the folder it came from."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml

from heads.spec import load_head_spec
from registry.store.heads import load_head_version
from registry.jobs.train import train_head_job
from registry.jobs.train_trunk import adopt_trunk
from registry.store.releases import get_release, load_release
from registry.store.tracking import ARTIFACT_COLUMNS, ARTIFACTS_DIR, RegistryError, adopt_moved_workspace, connect
from registry.store.trunks import register_trunk
from registry.store.workspace import Workspace
from tests.conftest import SMALL
from trunk.model import Trunk
from demo.shapes import generate_shapes

JOB = {"batch_size": 32, "num_workers": 0, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_images=40, n_holdout=0, size=32, seed=0)


def spec_for(tmp_path, shapes, attr: str):
    path = tmp_path / "heads" / f"{attr}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": attr, "owner": "tests", "data": {"manifest": str(shapes.manifests[attr])},
        "module": {"_target_": "heads.modules.LinearHead"}, "train": {"epochs": 2}, "gate": {},
    }))
    return load_head_spec(path)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, size, mtime and (for files) a content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[path.relative_to(root).as_posix()] = (path.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return out


def artifact_uris(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [v for table, column in ARTIFACT_COLUMNS
                for (v,) in con.execute(f"SELECT {column} FROM {table}") if v]
    finally:
        con.close()


@pytest.fixture
def trained(client, workspace, shapes, tmp_path):
    """A workspace with a trunk, a trained and promoted head, and production pointing at it."""
    ws = Workspace.at(workspace)
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL)))
    job = train_head_job(client, spec_for(tmp_path, shapes, "colour"), workspace=ws, **JOB)
    assert job.release is not None and get_release(client).heads == {"colour": job.version}
    return workspace


def test_a_copied_workspace_never_touches_the_original(trained, shapes, tmp_path, caplog):
    original = trained
    before = snapshot(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)

    with caplog.at_level(logging.WARNING, logger="registry.store.tracking"):
        client = connect(copy)
    assert f"workspace {copy.resolve()} was copied or moved from {original.resolve()}" in caplog.text
    uris = artifact_uris(copy / "mlflow.db")
    assert uris and all(str(original.resolve()) not in u for u in uris)
    assert all(u.startswith((copy.resolve() / ARTIFACTS_DIR).as_uri() + "/") for u in uris if "://" in u)

    # Use the copy: train, register and promote another head, read the release back.
    job = train_head_job(client, spec_for(tmp_path, shapes, "shape"), workspace=Workspace.at(copy), **JOB)
    assert get_release(client).heads == {"colour": 1, "shape": job.version}
    run = client.get_run(client.get_model_version("head.shape", str(job.version)).run_id)
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(copy.resolve())

    assert snapshot(original) == before  # byte for byte, mtimes included

    # Reads come from the copy too: with the original gone, everything still loads.
    shutil.rmtree(original)
    trunk, heads = load_release(client, get_release(client))
    assert set(heads) == {"colour", "shape"}
    assert load_head_version(client, "colour", 1).classes


def test_a_moved_workspace_is_adopted_once(trained, tmp_path, caplog):
    moved = tmp_path / "elsewhere" / "ws"
    moved.parent.mkdir()
    os.rename(trained, moved)
    client = connect(moved)
    trunk, heads = load_release(client, get_release(client))
    assert set(heads) == {"colour"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="registry.store.tracking"):
        connect(moved)
    assert "copied or moved" not in caplog.text  # nothing left to adopt
    assert adopt_moved_workspace(moved.resolve(), moved / "mlflow.db") is None


def test_a_store_copied_without_its_artifacts_is_refused(trained, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(trained / "mlflow.db", lone / "mlflow.db")
    with pytest.raises(RegistryError, match=f"^workspace {lone.resolve()}: mlflow.db was copied from "
                                            f"{trained.resolve()} without its mlartifacts/ folder; copy the whole"):
        connect(lone)


def test_an_explicit_store_elsewhere_is_left_alone(trained, tmp_path):
    before = artifact_uris(trained / "mlflow.db")
    connect(tmp_path / "other", uri=f"sqlite:///{trained.resolve() / 'mlflow.db'}")
    assert artifact_uris(trained / "mlflow.db") == before
