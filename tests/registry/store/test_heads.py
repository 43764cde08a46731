"""Head versions: DESIGN's tags and metrics by name, artifacts, safe loading."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from safetensors.torch import save_file

from heads.checks.gate import check_gate
from heads.store import HeadArtifactError
from registry.serving.package import MODEL_FILES
from registry.store.heads import head_metrics, load_head_version, record_head_hashes, register_head, safe_key
from registry.store.releases import create_release, load_release
from registry.store.tracking import RegistryError
from registry.store.trunks import register_trunk


def test_register_head_records_design_tags_metrics_and_artifacts(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    result = make_result(trunk_a, "colour", classes=("red", "green/teal", "blue sky"),
                         slices={"night": {"accuracy": 0.8, "n": 30}, "day?": {"accuracy": 0.95, "n": 50}})
    version = register_head(client, result, trunk_version=tv)
    assert version == 1
    mv = client.get_model_version("head.colour", "1")
    assert mv.tags == {"trunk_id": trunk_a.trunk_id, "tap": "pooled", "config_sha": result.spec.config_sha,
                       "data_sha": result.data_sha, "owner": "team-vision", "trunk_version": str(tv),
                       "gate": "passed", "weights_sha256": mv.tags["weights_sha256"],
                       "spec_sha256": mv.tags["spec_sha256"]}
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
    # The head's files, and beside them what makes the folder an MLflow pyfunc model (registry.serving).
    head_files = {f.path.split("/", 1)[1] for f in client.list_artifacts(mv.run_id, "head")}
    assert {"head.json", "head.safetensors", "MLmodel", "model.py"} <= head_files
    assert head_files <= {"head.json", "head.safetensors", *MODEL_FILES}
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


# -- artifacts swapped in the store after registration ---------------------------------------
def stored_head_dir(client, name: str, version: int) -> Path:
    """The artifact store's own copy of a version's head/ folder (the local store is a folder)."""
    mv = client.get_model_version(f"head.{name}", str(version))
    uri = client.get_run(mv.run_id).info.artifact_uri
    path = Path(unquote(urlparse(uri).path)) / "head" if uri.startswith("file:") else Path(uri) / "head"
    assert (path / "head.safetensors").is_file() and (path / "head.json").is_file()
    return path


def test_hash_tags_are_the_stored_files_sha256(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    version = register_head(client, make_result(trunk_a, "colour"), trunk_version=tv)
    tags = client.get_model_version("head.colour", str(version)).tags
    stored = stored_head_dir(client, "colour", version)
    assert tags["weights_sha256"] == hashlib.sha256((stored / "head.safetensors").read_bytes()).hexdigest()
    assert tags["spec_sha256"] == hashlib.sha256((stored / "head.json").read_bytes()).hexdigest()


def _garbage_weights(stored, result):
    torch.manual_seed(7)
    garbage = {k: torch.randn_like(v) for k, v in result.module.state_dict().items()}
    save_file(garbage, str(stored / "head.safetensors"), metadata={"name": "colour"})


def _renamed_classes(stored, result):
    spec = json.loads((stored / "head.json").read_text())
    spec["classes"] = ["blue", "green", "red"]  # same count, other meaning: served silently before
    (stored / "head.json").write_text(json.dumps(spec, indent=2) + "\n")


@pytest.mark.parametrize("tamper, file", [(_garbage_weights, "head.safetensors"), (_renamed_classes, "head.json")],
                         ids=["same-shape garbage weights", "renamed classes"])
def test_tampered_files_in_the_store_are_refused(client, trunk_a, make_result, tamper, file):
    tv = register_trunk(client, trunk_a)
    result = make_result(trunk_a, "colour")
    version = register_head(client, result, trunk_version=tv)
    tamper(stored_head_dir(client, "colour", version), result)
    with pytest.raises(HeadArtifactError) as e:
        load_head_version(client, "colour", version)
    assert str(e.value) == (f"head.colour v1: {file} does not match the sha256 recorded at registration "
                            "(tampered or corrupt)")


def test_a_release_loads_its_own_copy_and_a_tampered_head_version_is_refused(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    register_head(client, make_result(trunk_a, "colour"), trunk_version=tv)
    register_head(client, make_result(trunk_a, "shape"), trunk_version=tv)
    release = create_release(client, tv, {"colour": 1, "shape": 1}, expected_production=None, alias="candidate")
    assert sorted(load_release(client, release)[1]) == ["colour", "shape"]
    stored = stored_head_dir(client, "shape", 1)
    spec = json.loads((stored / "head.json").read_text())
    spec["classes"] = spec["classes"][::-1]
    (stored / "head.json").write_text(json.dumps(spec))
    # The release carries its own checked copy of its heads (its pack): the version's files,
    # changed later, are not what it loads...
    assert load_release(client, release)[1]["shape"].classes == list(reversed(spec["classes"]))
    # ...while the version itself is refused.
    with pytest.raises(HeadArtifactError, match=r"^head.shape v1: head.json does not match the sha256"):
        load_head_version(client, "shape", 1)


class _Bomb:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _drop_hash_tags(client, name: str, version: int) -> None:
    """What a version registered before hashes were recorded looks like."""
    for key in ("weights_sha256", "spec_sha256"):
        client.delete_model_version_tag(f"head.{name}", str(version), key)


@pytest.mark.parametrize("hashed", [True, False])
def test_pickle_in_place_of_safetensors_is_a_one_line_refusal(client, trunk_a, make_result, tmp_path, hashed):
    tv = register_trunk(client, trunk_a)
    version = register_head(client, make_result(trunk_a, "colour"), trunk_version=tv)
    stored = stored_head_dir(client, "colour", version)
    marker = tmp_path / "unpickled"
    (stored / "head.safetensors").write_bytes(pickle.dumps({"fc.weight": _Bomb(marker)}))
    if not hashed:
        _drop_hash_tags(client, "colour", version)
        spec = json.loads((stored / "head.json").read_text())
        del spec["weights_sha256"]  # an old head.json, without the weights' hash either
        (stored / "head.json").write_text(json.dumps(spec))
    with pytest.raises(HeadArtifactError) as e:
        load_head_version(client, "colour", version, allow_unverified=not hashed)
    message = str(e.value)
    assert "\n" not in message and message.startswith("head.colour v1: head.safetensors")
    assert ("does not match the sha256 recorded" in message) if hashed else ("not a safetensors file" in message)
    assert not marker.exists()


def test_version_without_hashes_is_refused_unless_allowed_or_recorded(client, trunk_a, make_result, caplog):
    tv = register_trunk(client, trunk_a)
    result = make_result(trunk_a, "colour", seed=2)
    version = register_head(client, result, trunk_version=tv)
    tags = dict(client.get_model_version("head.colour", str(version)).tags)
    _drop_hash_tags(client, "colour", version)
    with pytest.raises(HeadArtifactError, match=r"^head.colour v1: registered without content hashes "
                                                r"\(tags weights_sha256, spec_sha256\)"):
        load_head_version(client, "colour", version)
    with caplog.at_level(logging.WARNING, logger="registry.store.heads"):
        loaded = load_head_version(client, "colour", version, allow_unverified=True)
    assert "head.colour v1: registered without content hashes" in caplog.text
    x = torch.randn(2, result.in_features)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), result.module(x))
    # An operator who has checked it records the hashes once; from then on it is verified.
    recorded = record_head_hashes(client, "colour", version)
    assert recorded == {k: tags[k] for k in ("weights_sha256", "spec_sha256")}
    assert load_head_version(client, "colour", version).classes == ["red", "green", "blue"]
    with pytest.raises(RegistryError, match="already has content hashes recorded"):
        record_head_hashes(client, "colour", version)


def test_one_hash_tag_missing_is_refused_even_when_unverified_is_allowed(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    version = register_head(client, make_result(trunk_a, "colour"), trunk_version=tv)
    client.delete_model_version_tag("head.colour", str(version), "spec_sha256")
    with pytest.raises(HeadArtifactError, match=r"^head.colour v1: tag 'spec_sha256' is None, not a sha256"):
        load_head_version(client, "colour", version, allow_unverified=True)


# -- the monitoring reference a head version remembers (issue 15) ----------------------------
def _reference(classes, seed=0):
    from heads.monitor.reference import HeadReference

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(40, len(classes), generator=g) * 3
    return HeadReference.build(logits, classes, torch.randn(60, 8, generator=g), tap="pooled",
                               meta={"head": "colour"}), logits


def test_a_head_reference_is_stored_tagged_summarised_and_read_back_verified(client, trunk_a, make_result):
    from registry.store.heads import REFERENCE_ARTIFACT, head_reference

    tv = register_trunk(client, trunk_a)
    result = make_result(trunk_a, "colour")
    result.reference, logits = _reference(result.classes)
    version = register_head(client, result, trunk_version=tv)
    mv = client.get_model_version("head.colour", str(version))
    assert mv.tags["monitor_reference_digest"] == result.reference.digest
    assert (stored_head_dir(client, "colour", version).parent / REFERENCE_ARTIFACT).is_file()
    metrics = client.get_run(mv.run_id).data.metrics
    shares = torch.bincount(logits.argmax(1), minlength=3).double() / 40
    assert [metrics[f"reference.label_share.{c}"] for c in result.classes] == pytest.approx(shares.tolist())
    assert (metrics["reference.n_val"], metrics["reference.n_train_features"], metrics["reference.feature_dim"]) == \
        (40, 60, 8)
    got = head_reference(client, "colour", version)
    assert got.digest == result.reference.digest and got.meta == {"head": "colour"}
    assert torch.equal(got.predictions.label_counts, result.reference.predictions.label_counts)
    assert torch.equal(got.features.mean, result.reference.features.mean)
    assert torch.equal(got.features.sample, result.reference.features.sample)


def test_an_altered_reference_file_is_refused_naming_the_head_and_version(client, trunk_a, make_result):
    from registry.store.heads import REFERENCE_ARTIFACT, head_reference

    tv = register_trunk(client, trunk_a)
    result = make_result(trunk_a, "colour")
    result.reference, _ = _reference(result.classes)
    version = register_head(client, result, trunk_version=tv)
    stored = stored_head_dir(client, "colour", version).parent / REFERENCE_ARTIFACT
    # A well-formed reference of other data: consistent with its own digest, not with the tag.
    _reference(result.classes, seed=1)[0].save(stored)
    with pytest.raises(RegistryError) as e:
        head_reference(client, "colour", version)
    msg = str(e.value)
    assert msg.startswith("head.colour v1: monitoring reference refused") and "was recorded" in msg
    assert "\n" not in msg
    stored.unlink()
    with pytest.raises(RegistryError, match=r"^head.colour v1: monitoring reference monitor/reference.safetensors "
                                            r"cannot be downloaded"):
        head_reference(client, "colour", version)


def test_a_version_without_a_reference_gives_none(client, trunk_a, make_result):
    from registry.store.heads import head_reference

    tv = register_trunk(client, trunk_a)
    version = register_head(client, make_result(trunk_a, "colour"), trunk_version=tv)
    assert "monitor_reference_digest" not in client.get_model_version("head.colour", str(version)).tags
    assert head_reference(client, "colour", version) is None
    with pytest.raises(RegistryError, match="head.colour v9 does not exist"):
        head_reference(client, "colour", 9)
