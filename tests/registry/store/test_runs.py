"""The door's run, alias and look-up helpers, on a real SQLite MLflow store."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from registry.store.heads import find_head_version_by_tags, head_model_versions, register_head
from registry.store.runs import MAX_PARAM_CHARS, tracked_run
from registry.store.tracking import ArtifactError, RegistryError, all_pages, download_artifact, run_metrics
from registry.store.trunks import (
    TRUNK_MODEL,
    clear_trunk_alias,
    register_trunk,
    set_trunk_alias,
    trunk_alias_versions,
    trunk_metrics,
    trunk_versions,
)


def test_tracked_run_logs_into_its_experiment_and_finishes(client, tmp_path):
    (tmp_path / "a.md").write_text("# a\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b.txt").write_text("b\n")
    with tracked_run(client, "reports", run_name="report-x", tags={"alias": "production"}) as run:
        assert client.get_run(run.run_id).info.status == "RUNNING"  # open while the work goes on
        run.log(params={"tolerance": 0.01, "long": "x" * (MAX_PARAM_CHARS + 5)}, metrics={"heads": 3})
        run.log_file(tmp_path / "a.md")
        run.log_folder(tmp_path / "dir")
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "report-x"
    assert client.get_experiment(got.info.experiment_id).name == "reports"
    assert got.data.tags["alias"] == "production"
    assert got.data.params["tolerance"] == "0.01"
    assert len(got.data.params["long"]) == MAX_PARAM_CHARS
    assert run_metrics(client, run.run_id) == {"heads": 3.0}
    assert sorted(f.path for f in client.list_artifacts(run.run_id)) == ["a.md", "b.txt"]


def test_tracked_run_that_raises_ends_failed_and_reraises(client):
    with pytest.raises(KeyboardInterrupt):
        with tracked_run(client, "cascades", run_name="cascade-x") as run:
            raise KeyboardInterrupt
    assert client.get_run(run.run_id).info.status == "FAILED"


def test_tracked_run_needs_a_platform_experiment(client):
    with pytest.raises(RegistryError, match="has no experiment 'nope'"):
        with tracked_run(client, "nope", run_name="x"):
            pass


def test_download_artifact_names_what_mlflow_says(client, tmp_path):
    with tracked_run(client, "reports", run_name="x") as run:
        pass
    with pytest.raises(ArtifactError) as e:
        download_artifact(client, run.run_id, "config/missing.yaml", tmp_path)
    assert "\n" not in str(e.value) and str(e.value)


COST = ("params", "gflops_per_image", "ms_per_image", "ms_per_image_spread")  # every trunk version's own cost


def test_trunk_aliases_set_read_and_clear_only_when_they_point_there(client, trunk_a, trunk_b, caplog):
    assert trunk_alias_versions(client) == {}  # no registered model trunk yet
    assert clear_trunk_alias(client, "candidate", 1) is False
    assert "could not clear trunk alias 'candidate'" in caplog.text  # refused, logged, not raised
    a = register_trunk(client, trunk_a, metrics={"train_loss": 0.5})
    b = register_trunk(client, trunk_b)
    set_trunk_alias(client, "candidate", b)
    assert trunk_alias_versions(client) == {"candidate": b}
    assert int(client.get_model_version_by_alias(TRUNK_MODEL, "candidate").version) == b
    assert clear_trunk_alias(client, "candidate", a) is False  # points elsewhere: left alone
    assert trunk_alias_versions(client) == {"candidate": b}
    assert clear_trunk_alias(client, "candidate", b) is True
    assert trunk_alias_versions(client) == {}
    figures = trunk_metrics(client, a)
    assert figures["train_loss"] == 0.5 and set(figures) == {"train_loss", *COST}
    assert sorted(int(mv.version) for mv in trunk_versions(client)) == [a, b]


def test_head_lookups(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    one = register_head(client, make_result(trunk_a, "colour", data_sha="1" * 16), trunk_version=tv)
    two = register_head(client, make_result(trunk_a, "colour", data_sha="2" * 16), trunk_version=tv)
    register_head(client, make_result(trunk_a, "shape"), trunk_version=tv)
    tags = {"trunk_id": trunk_a.trunk_id, "data_sha": "2" * 16}
    assert find_head_version_by_tags(client, "colour", tags) == two
    assert find_head_version_by_tags(client, "colour", {"trunk_id": trunk_a.trunk_id}) == one  # the lowest
    assert find_head_version_by_tags(client, "colour", {"data_sha": "3" * 16}) is None
    found = head_model_versions(client)
    assert {n: [int(mv.version) for mv in v] for n, v in found.items()} == {"colour": [one, two], "shape": [1]}


def test_all_pages_follows_page_tokens(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    for i in range(3):
        register_head(client, make_result(trunk_a, f"h{i}"), trunk_version=tv)

    def one_a_page(filter_string, page_token=None):
        return client.search_registered_models(filter_string, max_results=1, page_token=page_token)

    names = [m.name for m in all_pages(one_a_page, "name LIKE 'head.%'")]
    assert sorted(names) == ["head.h0", "head.h1", "head.h2"]


def test_alias_refusal_logs_at_warning(client, caplog):
    caplog.set_level(logging.WARNING, logger="registry.store.trunks")
    clear_trunk_alias(client, "candidate", 7)
    assert [r.levelname for r in caplog.records if r.name == "registry.store.trunks"] == ["WARNING"]


def test_tracked_run_carries_mlflows_source_and_user_tags_under_its_own(client):
    with tracked_run(client, "reports", run_name="x", tags={"mlflow.source.type": "JOB", "alias": "a"}) as run:
        pass
    tags = client.get_run(run.run_id).data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"]
    assert tags["mlflow.source.type"] == "JOB" and tags["alias"] == "a"  # the caller's tags win


def test_epoch_logger_logs_each_row_at_its_epoch_and_remembers_the_curves(client):
    with tracked_run(client, "heads", run_name="x") as run:
        on_epoch = run.epoch_logger({"val_accuracy": "epoch_val_accuracy"})
        for epoch in (1, 2, 3):
            on_epoch({"epoch": epoch, "train_loss": 1.0 / epoch, "val_accuracy": 0.5 + epoch / 10, "note": "x",
                      "flag": True})
        assert run.curves == {"train_loss", "epoch_val_accuracy"}
    history = client.get_metric_history(run.run_id, "epoch_val_accuracy")
    assert [(p.step, p.value) for p in sorted(history, key=lambda p: p.step)] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert set(client.get_run(run.run_id).data.metrics) == {"train_loss", "epoch_val_accuracy"}


def test_log_dataset_records_a_run_input_with_its_digest_source_and_context(client, tmp_path):
    with tracked_run(client, "heads", run_name="x") as run:
        run.log_dataset("colour.train", "ab" * 8, tmp_path / "colour.csv", context="training",
                        profile={"num_rows": 12})
    (found,) = client.get_run(run.run_id).inputs.dataset_inputs
    assert (found.dataset.name, found.dataset.digest) == ("colour.train", "ab" * 8)
    assert json.loads(found.dataset.source) == {"uri": str(tmp_path / "colour.csv")}
    assert json.loads(found.dataset.profile) == {"num_rows": 12}
    assert [(t.key, t.value) for t in found.tags] == [("mlflow.data.context", "training")]


def _monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def test_system_metrics_never_outlive_their_run(client):
    before = _monitor_threads()
    with pytest.raises(ValueError):
        with tracked_run(client, "trunks", run_name="x", system_metrics=True) as run:
            raise ValueError("stop")
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert _monitor_threads() == before  # stopped (or never started: no psutil)


def test_system_metrics_are_recorded_when_psutil_is_there(client, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with tracked_run(client, "trunks", run_name="x", system_metrics=True) as run:
        assert len(_monitor_threads()) == 1
        time.sleep(1.0)
    assert _monitor_threads() == []
    assert any(k.startswith("system/cpu") for k in client.get_run(run.run_id).data.metrics)
