"""tools.common: trunk configs build through Hydra's instantiate and fail in one line."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tools.common import CONF_DIR, build_trunk
from trunk.model import TrunkError


def trunk_cfg(**overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="register_trunk", overrides=[f"trunk.{k}={v}" for k, v in overrides.items()])
    return cfg.trunk


def test_trunk_group_builds_the_configured_trunk():
    trunk = build_trunk(trunk_cfg(**{"data_config.input_size": "[3,32,32]"}))
    assert trunk.model_name == "test_resnet" and tuple(trunk.data_config["input_size"]) == (3, 32, 32)


def test_unknown_model_is_one_line_trunk_error():
    with pytest.raises(TrunkError) as err:
        build_trunk(trunk_cfg(model_name="resnet_nope"))
    assert str(err.value).startswith("trunk config: unknown timm model 'resnet_nope'")
    assert "\n" not in str(err.value)


def test_target_outside_the_platform_is_refused():
    cfg = OmegaConf.create({"_target_": "os.system", "command": "true"})
    with pytest.raises(TrunkError, match=r"field 'trunk._target_': must be trunk.model.Trunk"):
        build_trunk(cfg)


def test_bench_pipeline_suite_runs_from_its_config(tmp_path, capsys):
    from tools.bench import run

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="bench", overrides=[
            "suite=pipeline", "model=test_resnet", "image_size=32", "warmup=0", "device=cpu", "pipeline.n_images=4",
            "pipeline.photo_size=[64,48]", "pipeline.batch_size=2", "pipeline.num_workers=0", "pipeline.repeats=1",
            f"pipeline.images_dir={tmp_path / 'img'}", f"output={tmp_path / 'out.json'}"])
    result = run(cfg)
    assert json.loads((tmp_path / "out.json").read_text())["images_per_s"] == result["images_per_s"]
    assert "end to end (files -> Parquet)" in capsys.readouterr().out
    from tools.common import check_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        bad = compose(config_name="bench", overrides=["suite=nope"])
    with pytest.raises(ValueError, match="field 'suite': 'nope' is not one of: heads, pipeline"):
        check_config(bad)  # the schema's check, before the tool runs


def test_num_workers_auto_and_bad_values():
    from tools.common import num_workers
    from tools.schema import BaseConfig

    assert num_workers(OmegaConf.create({"num_workers": "auto"})) >= 1
    assert num_workers(OmegaConf.create({"num_workers": 3})) == 3
    with pytest.raises(ValueError, match="field 'num_workers': 'many' is not a number or 'auto'"):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BaseConfig), {"num_workers": "many"}))
    with pytest.raises(ValueError, match="field 'num_workers': must be 0 or more, got -1"):
        BaseConfig(num_workers=-1)
