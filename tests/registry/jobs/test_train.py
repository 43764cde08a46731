"""registry.jobs.train and .classify: the jobs behind the tools, on a real SQLite store, tiny trunk, generated shapes."""

from __future__ import annotations

import math

import pytest
import yaml

from heads.spec import load_head_spec
from registry.jobs.train import JobError, resolve_trunk, train_head_job
from registry.jobs.train_trunk import adopt_trunk, train_trunk_job
from registry.store.releases import get_release
from registry.store.trunks import register_trunk
from registry.store.workspace import Workspace
from tests.conftest import SMALL
from trunk.model import Trunk
from demo.shapes import generate_shapes

JOB = {"batch_size": 32, "num_workers": 0, "device": "cpu", "progress": False}
TRAIN = {"epochs": 1, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.0, "augment_ops": None, "seed": 0,
         "device": "cpu", "num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_images=80, n_holdout=0, size=32, seed=0)


def spec_for(tmp_path, shapes, attr: str, **gate):
    path = tmp_path / "heads" / f"{attr}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": attr, "owner": "tests", "data": {"manifest": str(shapes.manifests[attr])},
        "module": {"_target_": "heads.modules.LinearHead"}, "train": {"epochs": 5}, "gate": gate,
    }))
    return load_head_spec(path)


def test_no_production_yet_says_what_to_do(client):
    with pytest.raises(JobError, match="no production release yet: register a trunk first"):
        resolve_trunk(client, "production")
    with pytest.raises(JobError, match="'production' or a version number"):
        resolve_trunk(client, "latest")


def test_trunk_training_registers_adopts_and_reuses_the_same_recipe(client, workspace, shapes, tmp_path):
    ws = Workspace.at(workspace)
    specs = [spec_for(tmp_path, shapes, "shape")]
    base = Trunk("test_resnet", data_config=SMALL)
    first = train_trunk_job(client, base, specs, workspace=ws, **TRAIN)
    assert first.status == "production" and first.trunk.trunk_id != base.trunk_id
    assert get_release(client).trunk_version == first.version
    again = train_trunk_job(client, base, specs, workspace=ws, **TRAIN)
    assert again.version == first.version and again.status.startswith("reused")
    assert again.trunk.trunk_id == first.trunk.trunk_id


def test_head_job_promotes_then_refuses_a_head_on_another_trunk(client, workspace, shapes, tmp_path):
    ws = Workspace.at(workspace)
    v1 = register_trunk(client, Trunk("test_resnet", data_config=SMALL, seed=1))
    assert adopt_trunk(client, v1)[0] == "production"
    job = train_head_job(client, spec_for(tmp_path, shapes, "colour"), workspace=ws, **JOB)
    assert job.gate.passed and job.release is not None and job.release.heads == {"colour": job.version}
    assert job.extract_summary["new_rows"] == 80
    # its cost is measured inside the production bank: just itself here (the figure is a timing:
    # its floor-at-zero median is checked on controlled times in tests/heads/training/test_cost.py)
    assert job.result.metrics["bank_heads"] == 1 and math.isfinite(job.result.metrics["added_ms_per_image"])
    assert "added_ms_per_image_alone" in job.result.metrics
    shape = train_head_job(client, spec_for(tmp_path, shapes, "shape"), workspace=ws, **JOB)
    assert shape.result.metrics["bank_heads"] == 2  # timed beside the production colour head
    job_heads = {"colour": job.version, "shape": shape.version}

    # production now has a head on v1, so a new trunk becomes the candidate, not production
    v2 = register_trunk(client, Trunk("test_resnet", data_config=SMALL, seed=2))
    assert adopt_trunk(client, v2) == ("candidate", None)
    assert get_release(client).trunk_version == v1

    # a head trained on the candidate is registered but refused from production's release
    other = train_head_job(client, spec_for(tmp_path, shapes, "count"), workspace=ws, trunk_version=v2, **JOB)
    assert other.release is None
    assert "was trained on trunk_id" in other.refused and f"retrain it on trunk v{v1}" in other.refused
    assert get_release(client).heads == job_heads


def test_failed_gate_is_registered_but_not_released(client, workspace, shapes, tmp_path):
    ws = Workspace.at(workspace)
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL)))
    before = get_release(client)
    job = train_head_job(client, spec_for(tmp_path, shapes, "texture", min_val_accuracy=1.01), workspace=ws, **JOB)
    assert not job.gate.passed and job.release is None and job.version == 1
    assert "[FAIL] val_accuracy" in job.gate.format()
    assert get_release(client).version == before.version


def test_branch_head_trains_releases_and_classifies(client, workspace, shapes, tmp_path):
    import pyarrow.parquet as pq

    from registry.jobs.classify import classify_job

    ws = Workspace.at(workspace)
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL)))
    pooled = train_head_job(client, spec_for(tmp_path, shapes, "colour"), workspace=ws, **JOB)
    path = tmp_path / "heads" / "count.yaml"
    path.write_text(yaml.safe_dump({
        "name": "count", "owner": "tests", "data": {"manifest": str(shapes.manifests["count"])},
        "attach": {"tap": "layer2"}, "module": {"_target_": "heads.branch.BranchHead"},
        "augment": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}], "train": {"epochs": 1},
    }))
    branch = train_head_job(client, load_head_spec(path), workspace=ws, **JOB)
    m = branch.result.metrics
    assert branch.result.tap == "layer2" and branch.release is not None
    assert m["added_gflops"] > pooled.result.metrics["added_gflops"]
    assert m["bank_heads"] == 2 and m["cache_bytes_per_image"] > pooled.result.metrics["cache_bytes_per_image"]

    success = classify_job(client, shapes.root / "images", tmp_path / "out", batch_size=16, num_workers=0,
                           device="cpu", progress=False)
    table = pq.read_table(tmp_path / "out").to_pydict()
    assert success["release"]["heads"] == {"colour": pooled.version, "count": branch.version}
    assert len(table["path"]) == 80 and all(label is not None for label in table["count_label"])


def test_classify_resolves_the_release_once_and_a_restart_keeps_it(client, workspace, shapes, tmp_path):
    import pyarrow.parquet as pq

    from heads.classify.output import SUCCESS_FILE
    from registry.jobs.classify import classify_job

    ws = Workspace.at(workspace)
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL)))
    colour = train_head_job(client, spec_for(tmp_path, shapes, "colour"), workspace=ws, **JOB)
    first = colour.release.version
    run = {"batch_size": 16, "num_workers": 0, "device": "cpu", "progress": False, "rows_per_shard": 30}
    out = tmp_path / "out"
    clean = classify_job(client, shapes.root / "images", out, **run)
    assert clean["release"]["version"] == first and clean["counts"]["shards"] == 3
    # As if killed before its last shard, and production moved on meanwhile.
    (out / "part-00002.parquet").unlink()
    (out / SUCCESS_FILE).unlink()
    shape = train_head_job(client, spec_for(tmp_path, shapes, "shape"), workspace=ws, **JOB)
    assert get_release(client).version == shape.release.version != first

    resumed = classify_job(client, shapes.root / "images", out, **run)
    assert resumed["release"]["version"] == first and resumed["shards_written"] == 1
    table = pq.read_table(out)
    assert "shape_label" not in table.column_names and table.num_rows == 80  # no version mixing

    newer = classify_job(client, shapes.root / "images", tmp_path / "new", **run)
    assert newer["release"]["version"] == shape.release.version
    assert {"colour_label", "shape_label"} <= set(pq.read_table(tmp_path / "new").column_names)
    # Asking for production on the old job's folder would mix versions: refused, one line.
    (out / SUCCESS_FILE).unlink()
    with pytest.raises(ValueError, match=r"_JOB.json: holds another job's output \(field 'release' differs\)"):
        classify_job(client, shapes.root / "images", out, release="production", **run)
    # A release by number, into a new folder.
    pinned = classify_job(client, shapes.root / "images", tmp_path / "pinned", release=first, **run)
    assert pinned["release"]["version"] == first
    with pytest.raises(JobError, match="release 'latest' is neither a version number nor 'production'"):
        classify_job(client, shapes.root / "images", tmp_path / "x", release="latest", **run)
