"""Head configs: every mistake is one line naming the file and the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from heads.spec import HeadConfigError, list_heads, load_head_spec, resolve_head, search_dirs

GOOD = {
    "name": "colour",
    "owner": "team-a",
    "data": {"manifest": "${workspace}/data/colour.csv"},
    "attach": {"tap": "pooled"},
    "module": {"_target_": "heads.modules.LinearHead", "dropout": 0.1},
    "train": {"epochs": 5},
    "gate": {"min_val_accuracy": 0.5},
}


def write(tmp_path: Path, cfg: dict, name: str = "colour") -> Path:
    path = tmp_path / "heads" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


DELETE = object()


def patch(changes: dict) -> dict:
    """GOOD with dotted keys replaced (or removed, with DELETE)."""
    cfg = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            node.pop(leaf)
        else:
            node[leaf] = value
    return cfg



def test_good_config_resolves_workspace_and_fills_defaults(tmp_path):
    spec = load_head_spec(write(tmp_path, GOOD), context={"workspace": "/ws"})
    assert spec.name == "colour" and spec.owner == "team-a" and spec.tap == "pooled"
    assert spec.data["manifest"] == "/ws/data/colour.csv"
    assert spec.train["epochs"] == 5 and spec.train["patience"] == 10  # default kept
    assert spec.module == {"_target_": "heads.modules.LinearHead", "dropout": 0.1}
    assert spec.config["augment"] is None
    assert len(spec.config_sha) == 16


def test_config_sha_changes_with_any_setting(tmp_path):
    a = load_head_spec(write(tmp_path, GOOD), context={"workspace": "/ws"})
    b = load_head_spec(write(tmp_path, patch({"train.lr": 0.5})), context={"workspace": "/ws"})
    assert a.config_sha != b.config_sha


@pytest.mark.parametrize("changes, field, words", [
    ({"owner": DELETE}, "owner", "Missing mandatory value"),
    ({"train.epochs": "ten"}, "train.epochs", "could not be converted"),
    ({"train.epochs": 0}, "train.epochs", "at least 1"),
    ({"train.lr": -1.0}, "train.lr", "positive"),
    ({"train.epoch": 3}, "train.epoch", "not in"),
    ({"gate.min_val_accuracy": "high"}, "gate.min_val_accuracy", "could not be converted"),
    ({"name": "Colour!"}, "name", "[a-z0-9_]+"),
    ({"name": "other"}, "name", "must equal the file name"),
    ({"module": {"dropout": 0.1}}, "module._target_", "missing"),
    ({"module": {"_target_": "os.system"}}, "module._target_", "outside the platform's packages"),
    ({"module": {"_target_": "heads.modules.NoSuchHead"}}, "module._target_", "does not exist"),
    ({"module": {"_target_": "heads.modules.LinearHead", "hiden": 3}}, "module.hiden", "unknown argument"),
    ({"module": {"_target_": "heads.modules.LinearHead", "num_classes": 3}}, "module.num_classes", "set by the platform"),
    ({"attach.tap": "layer3"}, "module._target_", "must be a branch (heads.branch.BranchHead)"),
    ({"module": {"_target_": "heads.branch.BranchHead"}}, "attach.tap", "forks at an earlier tap"),
    ({"attach.tap": "layer3", "module": {"_target_": "heads.branch.BranchHead", "model_name": "x"}},
     "module.model_name", "set by the platform"),
    ({"augment": [{"_target_": "os.system"}]}, "augment[0]._target_", "not an albumentations transform"),
    ({"augment": "flip"}, "augment", "Invalid value assigned"),
    ({"data": {}}, "data", "exactly one of"),
    ({"data": {"root": "a", "manifest": "b"}}, "data", "exactly one of"),
    ({"data": {"root": "a", "val_fraction": 1.5}}, "data.val_fraction", "between 0 and 1"),
])
def test_bad_config_is_one_line_naming_file_and_field(tmp_path, changes, field, words):
    path = write(tmp_path, patch(changes))
    with pytest.raises(HeadConfigError) as err:
        load_head_spec(path, context={"workspace": "/ws"})
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: field '{field}':"), msg
    assert words in msg, msg


def test_unknown_tap_lists_valid_taps(tmp_path):
    branch = {"attach.tap": "layer9", "module": {"_target_": "heads.branch.BranchHead"}}
    spec = load_head_spec(write(tmp_path, patch(branch)), context={"workspace": "/ws"})
    with pytest.raises(HeadConfigError, match=r"field 'attach.tap': unknown tap 'layer9'; valid taps: layer1, pooled"):
        spec.check_tap(["layer1", "pooled"])


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "heads" / "colour.yaml"
    path.parent.mkdir()
    path.write_text("name: [unclosed\n")
    with pytest.raises(HeadConfigError, match=r"colour.yaml: field '<file>': not valid YAML"):
        load_head_spec(path)


def test_team_folder_on_search_path_works_like_conf(tmp_path):
    conf = tmp_path / "conf"
    team = tmp_path / "team"
    write(conf, GOOD)
    write(team, patch({"name": "damage", "owner": "team-b"}), name="damage")
    write(team, patch({"owner": "team-override"}))  # later search-path entries win, as in Hydra
    dirs = search_dirs([f"file://{team}"], conf_dir=conf)
    assert list_heads(dirs) == ["colour", "damage"]
    assert resolve_head("damage", dirs, {"workspace": "/ws"}).owner == "team-b"
    assert resolve_head("colour", dirs, {"workspace": "/ws"}).owner == "team-override"


def test_unknown_head_lists_known_ones(tmp_path):
    write(tmp_path, GOOD)
    with pytest.raises(HeadConfigError, match=r"field 'head': no such head config .* known heads: colour"):
        resolve_head("texture", search_dirs([], conf_dir=tmp_path))


def test_repo_head_configs_are_valid():
    dirs = search_dirs([])
    names = list_heads(dirs)
    assert names, "conf/heads/ ships the demo's head configs"
    for name in names:
        assert resolve_head(name, dirs, {"workspace": "/ws"}).name == name
