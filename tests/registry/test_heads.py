"""Head versions: DESIGN's tags and metrics by name, artifacts, safe loading."""

from __future__ import annotations

import pytest
import torch

from heads.gate import check_gate
from registry.heads import head_metrics, load_head_version, register_head, safe_key
from registry.tracking import RegistryError
from registry.trunks import register_trunk


def test_register_head_records_design_tags_metrics_and_artifacts(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    result = make_result(trunk_a, "colour", classes=("red", "green/teal", "blue sky"),
                         slices={"night": {"accuracy": 0.8, "n": 30}, "day?": {"accuracy": 0.95, "n": 50}})
    version = register_head(client, result, trunk_version=tv)
    assert version == 1
    mv = client.get_model_version("head.colour", "1")
    assert mv.tags == {"trunk_id": trunk_a.trunk_id, "tap": "pooled", "config_sha": result.spec.config_sha,
                       "data_sha": result.data_sha, "owner": "team-vision", "trunk_version": str(tv),
                       "gate": "passed"}
    run = client.get_run(mv.run_id)
    assert run.info.run_name == "colour"
    assert client.get_experiment(run.info.experiment_id).name == "heads"
    metrics = run.data.metrics
    for name in ("val_accuracy", "val_macro_f1", "params", "added_gflops", "added_ms_per_image"):
        assert metrics[name] == pytest.approx(result.metrics[name]), name
    assert metrics["params"] == sum(p.numel() for p in result.module.parameters())
    assert metrics["recall.red"] == 0.8
    assert metrics["recall.green/teal"] == 0.85
    assert metrics["recall.blue sky"] == 0.9
    assert metrics["slice_accuracy.night"] == 0.8 and metrics["slice_size.night"] == 30
    assert metrics["slice_accuracy.day_"] == 0.95  # '?' is not allowed in MLflow names
    params = run.data.params
    assert params["train.epochs"] == "3"
    assert params["module._target_"] == "heads.modules.LinearHead"
    assert params["gate.min_val_accuracy"] == "0.5"
    assert params["classes"] == "red,green/teal,blue sky"
    files = {f.path for f in client.list_artifacts(mv.run_id)}
    assert {"head", "config", "confusion.png", "gate.txt"} <= files
    assert {f.path for f in client.list_artifacts(mv.run_id, "head")} == {"head/head.json", "head/head.safetensors"}
    assert [f.path for f in client.list_artifacts(mv.run_id, "config")] == ["config/colour.yaml"]
    assert head_metrics(client, "colour", version) == metrics


def test_load_head_version_roundtrip(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    result = make_result(trunk_a, "colour", seed=3)
    version = register_head(client, result, trunk_version=tv)
    loaded = load_head_version(client, "colour", version)
    assert loaded.name == "colour" and loaded.tap == "pooled"
    assert loaded.classes == ["red", "green", "blue"]
    assert loaded.meta["trunk_id"] == trunk_a.trunk_id
    x = torch.randn(4, result.in_features)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), result.module(x))


def test_versions_count_up_per_head(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    assert register_head(client, make_result(trunk_a, "colour"), trunk_version=tv) == 1
    assert register_head(client, make_result(trunk_a, "colour", seed=1), trunk_version=tv) == 2
    assert register_head(client, make_result(trunk_a, "shape"), trunk_version=tv) == 1


def test_failed_gate_is_recorded_with_its_report(client, trunk_a, make_result, tmp_path):
    tv = register_trunk(client, trunk_a)
    result = make_result(trunk_a, "colour", val_accuracy=0.4, gate={"min_val_accuracy": 0.6})
    version = register_head(client, result, trunk_version=tv)
    mv = client.get_model_version("head.colour", str(version))
    assert mv.tags["gate"] == "failed"
    text = (tmp_path / "gate.txt")
    client.download_artifacts(mv.run_id, "gate.txt", str(tmp_path))
    assert "FAILED" in text.read_text() and "[FAIL] val_accuracy" in text.read_text()


def test_explicit_gate_report_is_used(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    result = make_result(trunk_a, "colour", val_accuracy=0.9)
    report = check_gate({"min_val_accuracy": 0.95}, result.metrics, {})
    version = register_head(client, result, trunk_version=tv, gate_report=report)
    assert client.get_model_version("head.colour", str(version)).tags["gate"] == "failed"


def test_head_on_other_trunk_version_is_refused(client, trunk_a, trunk_b, make_result):
    register_trunk(client, trunk_a)
    tv_b = register_trunk(client, trunk_b)
    with pytest.raises(RegistryError, match=f"trained on trunk_id {trunk_a.trunk_id} but trunk v{tv_b}"):
        register_head(client, make_result(trunk_a, "colour"), trunk_version=tv_b)


def test_missing_required_metric_is_refused(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    result = make_result(trunk_a, "colour")
    del result.metrics["added_gflops"]
    with pytest.raises(RegistryError, match="lacks metric\\(s\\) added_gflops"):
        register_head(client, result, trunk_version=tv)


def test_safe_key_keeps_allowed_and_replaces_the_rest():
    assert safe_key("recall.dark blue-2/x") == "recall.dark blue-2/x"
    assert safe_key("recall.c++:é") == "recall.c____"
    assert safe_key("recall../x") == "recall_/x"
