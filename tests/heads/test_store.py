"""Head artifacts: safetensors + JSON round trip, never a pickle, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from heads.modules import LinearHead, MLPHead
from heads.store import WEIGHTS_FILE, SPEC_FILE, HeadArtifactError, build_module, load_head, save_head


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
