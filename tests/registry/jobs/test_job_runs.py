"""Job runs that tell the truth: opened before the work, curves per epoch, datasets, source tags,
cost on trunk versions, and a job that fails mid-way leaves a FAILED run and no version.
Real SQLite store, tiny trunk, generated shapes."""

from __future__ import annotations

import pytest
import yaml

from heads.spec import load_head_spec
from registry.jobs import train as train_mod
from registry.jobs import train_trunk as train_trunk_mod
from registry.jobs.train import train_head_job
from registry.jobs.train_trunk import TRAINING_SET, adopt_trunk, train_trunk_job, trunk_training_set
from registry.store.heads import model_name
from registry.store.tracking import experiment_id
from registry.store.trunks import COST_TAGS, TRUNK_MODEL, register_trunk
from registry.store.workspace import Workspace
from tests.conftest import SMALL
from trunk.model import Trunk
from demo.shapes import generate_shapes

JOB = {"batch_size": 32, "num_workers": 0, "device": "cpu", "progress": False}
TRAIN = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.0, "augment_ops": None, "seed": 0,
         "device": "cpu", "num_workers": 0, "progress": False}
SOURCE_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_images=60, n_holdout=0, size=32, seed=0)


def spec_for(tmp_path, shapes, attr: str, epochs: int = 4):
    path = tmp_path / "heads" / f"{attr}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": attr, "owner": "tests", "data": {"manifest": str(shapes.manifests[attr])},
        "module": {"_target_": "heads.modules.LinearHead"}, "train": {"epochs": epochs, "patience": 0},
        "gate": {},
    }))
    return load_head_spec(path)


def runs_of(client, experiment: str):
    return client.search_runs([experiment_id(client, experiment)])


def test_a_head_jobs_run_spans_its_training_with_curves_datasets_and_source_tags(client, workspace, shapes,
                                                                                 tmp_path):
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL, seed=1)))
    job = train_head_job(client, spec_for(tmp_path, shapes, "colour"), workspace=Workspace.at(workspace), **JOB)
    mv = client.get_model_version(model_name("colour"), str(job.version))
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "colour"
    epochs = int(job.result.metrics["epochs_run"])
    assert epochs == 4
    curves = {key: client.get_metric_history(run.info.run_id, key)
              for key in ("train_loss", "val_loss", "epoch_val_accuracy")}
    for key, points in curves.items():
        assert sorted(p.step for p in points) == list(range(1, epochs + 1)), key
    accuracy = sorted(curves["epoch_val_accuracy"], key=lambda p: p.step)
    assert [p.value for p in accuracy] == pytest.approx([row["val_accuracy"] for row in job.result.history])
    # live: every epoch was logged after the run started and before the version existed,
    # and the run ended after it
    stamps = sorted(p.timestamp for points in curves.values() for p in points)
    assert run.info.start_time <= stamps[0] and stamps[-1] <= mv.creation_timestamp <= run.info.end_time
    assert stamps[0] < stamps[-1]  # one batch per epoch, not one at the end
    # the version's own figure is not shadowed by the last epoch's
    assert run.data.metrics["val_accuracy"] == pytest.approx(job.result.metrics["val_accuracy"])
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"colour.train", "colour.val"}
    for name, context in (("colour.train", "training"), ("colour.val", "validation")):
        assert inputs[name].dataset.digest == mv.tags["data_sha"] == job.result.data_sha
        assert {t.key: t.value for t in inputs[name].tags}["mlflow.data.context"] == context
        assert str(shapes.manifests["colour"].name) in inputs[name].dataset.source
    assert all(run.data.tags.get(k) for k in SOURCE_TAGS)
    assert run.data.tags["data_sha"] == mv.tags["data_sha"] and run.data.tags["gate"] == mv.tags["gate"]


def test_a_head_job_that_fails_mid_way_leaves_a_failed_run_and_no_version(client, workspace, shapes, tmp_path,
                                                                          monkeypatch):
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL, seed=1)))

    def broken(*args, **kwargs):
        raise RuntimeError("timing went away")

    monkeypatch.setattr(train_mod, "measure_in_release", broken)  # after training, before registering
    with pytest.raises(RuntimeError, match="timing went away"):
        train_head_job(client, spec_for(tmp_path, shapes, "shape", epochs=2), workspace=Workspace.at(workspace),
                       **JOB)
    (run,) = runs_of(client, "heads")
    assert run.info.status == "FAILED" and run.info.run_name == "shape"
    assert len(client.get_metric_history(run.info.run_id, "epoch_val_accuracy")) == 2  # it did train
    assert client.search_model_versions(f"name='{model_name('shape')}'") == []


def test_a_trunk_jobs_run_spans_training_and_its_version_records_its_cost(client, workspace, shapes, tmp_path):
    specs = [spec_for(tmp_path, shapes, "shape")]
    job = train_trunk_job(client, Trunk("test_resnet", data_config=SMALL), specs, workspace=Workspace.at(workspace),
                          **TRAIN)
    mv = client.get_model_version(TRUNK_MODEL, str(job.version))
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == f"trunk-{job.trunk.trunk_id}"
    assert all(mv.tags.get(k) for k in COST_TAGS)
    assert mv.tags["cost_device"] == "cpu" and int(mv.tags["cost_batch_size"]) >= 1
    assert float(mv.tags["params"]) == run.data.metrics["params"] == sum(p.numel() for p in job.trunk.parameters())
    assert run.data.metrics["gflops_per_image"] > 0 and run.data.metrics["ms_per_image"] > 0
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(p.step for p in losses) == [1, 2]
    assert run.data.metrics["train_loss"] == pytest.approx(job.metrics["train_loss"])  # the final figure
    assert sorted(p.step for p in client.get_metric_history(run.info.run_id, "val_accuracy_shape")) == [1, 2]
    assert run.info.start_time <= min(p.timestamp for p in losses) <= mv.creation_timestamp <= run.info.end_time
    (training,) = run.inputs.dataset_inputs
    assert training.dataset.name == TRAINING_SET
    assert training.dataset.digest == trunk_training_set(specs).fingerprint
    assert all(run.data.tags.get(k) for k in SOURCE_TAGS)


def test_a_trunk_job_that_fails_mid_way_leaves_a_failed_run_and_no_version(client, workspace, shapes, tmp_path,
                                                                           monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("record unreadable")

    monkeypatch.setattr(train_trunk_mod, "inherited_seen", broken)  # after training, before registering
    with pytest.raises(RuntimeError, match="record unreadable"):
        train_trunk_job(client, Trunk("test_resnet", data_config=SMALL), [spec_for(tmp_path, shapes, "shape")],
                        workspace=Workspace.at(workspace), **TRAIN)
    (run,) = runs_of(client, "trunks")
    assert run.info.status == "FAILED" and run.info.run_name == "trunk-training"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    assert client.search_model_versions(f"name='{TRUNK_MODEL}'") == []
