"""build_trunk instantiates only trunk.model.Trunk: no nested targets, no Hydra `_` keys."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tools.common import build_trunk
from trunk.model import TrunkError

BASE = {"_target_": "trunk.model.Trunk", "model_name": "test_resnet", "pretrained": False,
        "data_config": {"input_size": [3, 32, 32], "crop_pct": 1.0}}


@pytest.mark.parametrize("extra, field", [
    ({"_partial_": True}, "trunk._partial_"),
    ({"_args_": ["test_resnet"]}, "trunk._args_"),
    ({"_recursive_": False}, "trunk._recursive_"),
    ({"model_kwargs": {"act_layer": {"_target_": "os.makedirs", "name": "x"}}}, "trunk.model_kwargs.act_layer._target_"),
])
def test_private_keys_and_nested_targets_are_refused(tmp_path, monkeypatch, extra, field):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrunkError, match=rf"^trunk config: field '{field.replace('.', '[.]')}': '_"):
        build_trunk(OmegaConf.create({**BASE, **extra}))
    assert not (tmp_path / "x").exists()


def test_plain_trunk_config_still_builds():
    assert build_trunk(OmegaConf.create(BASE)).model_name == "test_resnet"
