"""Head artifacts: safetensors + JSON round trip, never a pickle, clear errors, untrusted files refused."""

from __future__ import annotations

import json
import os
import pickle
import re
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from heads.branch import BranchHead, branch_kwargs
from heads.modules import LinearHead, MLPHead
from heads.store import (
    SPEC_FILE,
    WEIGHTS_FILE,
    HeadArtifactError,
    artifact_digests,
    build_module,
    load_head,
    save_head,
)
from trunk.timm_args import TimmArgumentError
from trunk.model import Trunk


def meta_for(module, target, kwargs, classes=("a", "b", "c")):
    return {"name": "colour", "tap": "pooled", "target": target, "kwargs": kwargs,
            "in_features": 8, "num_classes": len(classes), "classes": list(classes), "trunk_id": "abc"}


@pytest.mark.parametrize("cls, kwargs", [(LinearHead, {"dropout": 0.1}), (MLPHead, {"hidden": 16})])
def test_round_trip_gives_identical_outputs(tmp_path, cls, kwargs):
    torch.manual_seed(0)
    module = cls(in_features=8, num_classes=3, **kwargs).eval()
    target = f"heads.modules.{cls.__name__}"
    save_head(tmp_path, module, meta_for(module, target, kwargs))
    loaded = load_head(tmp_path)
    x = torch.randn(5, 8)
    assert torch.equal(loaded.module(x), module(x))
    assert loaded.name == "colour" and loaded.tap == "pooled" and loaded.classes == ["a", "b", "c"]
    assert not loaded.module.training
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as f:  # a safetensors file, not a pickle
        assert set(f.keys()) == set(module.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_FILE, SPEC_FILE])


def test_save_commits_weights_and_spec_atomically(tmp_path, monkeypatch):
    # Each file is fsynced under a temp name and renamed in: the synced inode is the final one.
    real, synced = os.fsync, set()

    def counting(fd):  # the one fault injection: a wrapper that records what was synced
        synced.add(os.fstat(fd).st_ino)
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    save_head(tmp_path, LinearHead(8, 3), meta_for(None, "heads.modules.LinearHead", {}))
    assert {(tmp_path / WEIGHTS_FILE).stat().st_ino, (tmp_path / SPEC_FILE).stat().st_ino} <= synced
    assert sorted(os.listdir(tmp_path)) == sorted([SPEC_FILE, WEIGHTS_FILE])
    assert load_head(tmp_path).meta["name"] == "colour"


def test_missing_meta_field_refused_on_save(tmp_path):
    meta = meta_for(None, "heads.modules.LinearHead", {})
    del meta["trunk_id"]
    with pytest.raises(HeadArtifactError, match="lacks trunk_id"):
        save_head(tmp_path, LinearHead(8, 3), meta)


def test_target_outside_platform_refused_on_load(tmp_path):
    save_head(tmp_path, LinearHead(8, 3), meta_for(None, "heads.modules.LinearHead", {}))
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    spec["target"] = "os.system"
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(HeadArtifactError, match=r"head.json: field 'target': .*outside the platform"):
        load_head(tmp_path)


def test_classes_must_match_num_classes(tmp_path):
    save_head(tmp_path, LinearHead(8, 3), meta_for(None, "heads.modules.LinearHead", {}))
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    spec["classes"] = ["a"]
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(HeadArtifactError, match=r"field 'classes' has 1 names for num_classes=3"):
        load_head(tmp_path)


def test_weights_that_do_not_fit_are_named(tmp_path):
    save_head(tmp_path, LinearHead(8, 4), meta_for(None, "heads.modules.LinearHead", {}))
    with pytest.raises(HeadArtifactError, match=r"head.safetensors: weights do not fit"):
        load_head(tmp_path)


def test_build_module_passes_platform_arguments():
    module = build_module("heads.modules.MLPHead", {"hidden": 5}, in_features=7, num_classes=2)
    assert module(torch.zeros(1, 7)).shape == (1, 2)


# -- untrusted artifacts: hashes, allowlists, never a pickle ---------------------------------
_WATCHED: set[str] = set()
_OPENED: list[str] = []
_HOOKED = []


@pytest.fixture
def opened():
    """Paths in ``watch`` that anything in this process opened (a real audit hook, not a mock)."""
    if not _HOOKED:
        def hook(event, args):
            if event == "open" and _WATCHED and args and str(args[0]) in _WATCHED:
                _OPENED.append(str(args[0]))
        sys.addaudithook(hook)  # cannot be removed; it only acts on the paths watched now
        _HOOKED.append(hook)
    _OPENED.clear()
    yield _WATCHED, _OPENED
    _WATCHED.clear()
    _OPENED.clear()


class _Bomb:
    """Unpickling this creates a folder: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def evil_pickle(path, marker):
    path.write_bytes(pickle.dumps({"fc.weight": _Bomb(marker)}))
    return path


def rewrite_spec(directory, **changes):
    spec = json.loads((directory / SPEC_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    (directory / SPEC_FILE).write_text(json.dumps(spec))
    return spec


def saved_branch(tmp_path):
    trunk = Trunk("test_resnet", data_config={"input_size": [3, 32, 32], "crop_pct": 1.0})
    tap = "layer3"
    kwargs = branch_kwargs(trunk, tap, dropout=0.0)
    head = BranchHead(trunk.tap(tap).channels, 3, **kwargs).init_from_trunk(trunk).eval()
    meta = {"name": "shape", "tap": tap, "target": "heads.branch.BranchHead", "kwargs": kwargs,
            "in_features": trunk.tap(tap).channels, "num_classes": 3, "classes": ["a", "b", "c"],
            "trunk_id": trunk.trunk_id}
    directory = tmp_path / "head"
    save_head(directory, head, meta)
    return directory


@pytest.mark.parametrize("key, value", [
    ("checkpoint_path", "CHECKPOINT"),
    ("pretrained_cfg_overlay", {"file": "CHECKPOINT"}),
    ("pretrained", True),
    ("cache_dir", "CHECKPOINT"),
])
def test_timm_loader_kwargs_in_head_json_are_refused_before_timm_runs(tmp_path, opened, key, value):
    directory = saved_branch(tmp_path)
    checkpoint = evil_pickle(tmp_path / "evil.pth", tmp_path / "unpickled")
    watch, seen = opened
    watch.add(str(checkpoint))
    value = {"file": str(checkpoint)} if isinstance(value, dict) else str(checkpoint) if value == "CHECKPOINT" else value
    spec = json.loads((directory / SPEC_FILE).read_text())
    spec["kwargs"]["model_kwargs"][key] = value
    (directory / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(HeadArtifactError) as e:
        load_head(directory)
    assert str(e.value) == (f"{directory / SPEC_FILE}: field 'kwargs.model_kwargs.{key}': not an architecture "
                            f"argument the platform passes to timm.create_model (see trunk/timm_args.py)")
    assert seen == [] and not (tmp_path / "unpickled").exists()  # the file was never opened


@pytest.mark.parametrize("model_name", ["local-dir:/tmp", "hf-hub:timm/resnet18.a1_in1k", "../test_resnet"])
def test_model_name_outside_timm_registry_is_refused(tmp_path, model_name):
    directory = saved_branch(tmp_path)
    spec = json.loads((directory / SPEC_FILE).read_text())
    spec["kwargs"]["model_name"] = model_name
    (directory / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(HeadArtifactError, match=r"head.json: field 'kwargs.model_name': must be a model name"):
        load_head(directory)


def test_branch_head_refuses_loader_kwargs_itself(tmp_path, opened):
    checkpoint = evil_pickle(tmp_path / "evil.pth", tmp_path / "unpickled")
    watch, seen = opened
    watch.add(str(checkpoint))
    with pytest.raises(TimmArgumentError, match=r"field 'model_kwargs.checkpoint_path'"):
        BranchHead(48, 3, model_name="test_resnet", tap="layer3", model_kwargs={"checkpoint_path": str(checkpoint)})
    assert seen == []


@pytest.mark.parametrize("target", ["heads.store.HeadArtifactError", "heads.branch.timm.create_model",
                                    "heads.branch.Suffix", "heads.modules"])
def test_target_must_be_a_platform_head_class_before_anything_is_called(tmp_path, target):
    save_head(tmp_path, LinearHead(8, 3), meta_for(None, "heads.modules.LinearHead", {}))
    rewrite_spec(tmp_path, target=target)
    with pytest.raises(HeadArtifactError, match=rf"head.json: field 'target': '{re.escape(target)}' "
                                                rf"does not exist or is not a head class; allowed head classes"):
        load_head(tmp_path)


@pytest.mark.parametrize("kwargs, field", [({"hidden": 4}, "kwargs.hidden"), ({"dropout": "0.1"}, "kwargs.dropout"),
                                           ({"dropout": True}, "kwargs.dropout")])
def test_kwargs_outside_what_the_platform_writes_are_refused(tmp_path, kwargs, field):
    save_head(tmp_path, LinearHead(8, 3), meta_for(None, "heads.modules.LinearHead", {}))
    rewrite_spec(tmp_path, kwargs=kwargs)
    with pytest.raises(HeadArtifactError, match=rf"head.json: field '{field}': "):
        load_head(tmp_path)


def test_save_refuses_what_load_would_refuse(tmp_path):
    with pytest.raises(HeadArtifactError, match=r"field 'kwargs.checkpoint_path': not an argument"):
        save_head(tmp_path, LinearHead(8, 3), meta_for(None, "heads.modules.LinearHead", {"checkpoint_path": "x"}))
    assert not (tmp_path / WEIGHTS_FILE).exists()


def test_same_shape_weights_swapped_locally_are_refused(tmp_path):
    module = LinearHead(8, 3)
    save_head(tmp_path, module, meta_for(None, "heads.modules.LinearHead", {}))
    save_file({k: torch.randn_like(v) for k, v in module.state_dict().items()}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(HeadArtifactError, match=r"head.safetensors does not match the sha256 in its head.json"):
        load_head(tmp_path)


def test_expected_digests_are_checked_before_parsing(tmp_path):
    save_head(tmp_path, LinearHead(8, 3), meta_for(None, "heads.modules.LinearHead", {}))
    digests = artifact_digests(tmp_path)
    assert load_head(tmp_path, expected=digests, label="head.colour v3").classes == ["a", "b", "c"]
    rewrite_spec(tmp_path, classes=["x", "y", "z"])
    with pytest.raises(HeadArtifactError) as e:
        load_head(tmp_path, expected=digests, label="head.colour v3")
    assert str(e.value) == "head.colour v3: head.json does not match the sha256 recorded at registration " \
                           "(tampered or corrupt)"


@pytest.mark.parametrize("hashed", [True, False])
def test_pickle_in_place_of_safetensors_is_a_one_line_refusal(tmp_path, hashed):
    save_head(tmp_path, LinearHead(8, 3), meta_for(None, "heads.modules.LinearHead", {}))
    if not hashed:  # a spec written before head.json carried the weights' hash
        rewrite_spec(tmp_path, weights_sha256=None)
    evil_pickle(tmp_path / WEIGHTS_FILE, tmp_path / "unpickled")
    with pytest.raises(HeadArtifactError) as e:
        load_head(tmp_path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / WEIGHTS_FILE}")
    assert ("does not match the sha256" in message) if hashed else ("not a safetensors file" in message)
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("content, reason", [
    (pickle.dumps({"name": "colour"}), "not valid JSON"),
    (b"\xff\xfe not text", "not valid JSON"),
    (b"[1, 2, 3]", "must be a JSON object, got list"),
    (b'{"name": "colour", "tap": "pooled", "target": "heads.modules.LinearHead", "kwargs": {}, "in_features": "8", '
     b'"num_classes": 3, "classes": ["a", "b", "c"], "trunk_id": "abc"}', "field 'in_features': must be a positive"),
], ids=["pickle", "not-utf8", "list", "in_features-string"])
def test_spec_that_is_not_the_platforms_json_is_a_one_line_refusal(tmp_path, content, reason):
    save_head(tmp_path, LinearHead(8, 3), meta_for(None, "heads.modules.LinearHead", {}))
    (tmp_path / SPEC_FILE).write_bytes(content)
    with pytest.raises(HeadArtifactError) as e:
        load_head(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / SPEC_FILE}: ") and reason in str(e.value)
    assert "\n" not in str(e.value)
