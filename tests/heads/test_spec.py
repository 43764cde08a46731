"""Head configs: every mistake is one line naming the file and the field."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from heads.spec import (MAX_CONFIG_BYTES, HeadConfigError, find_head_file, list_heads, load_head_spec,
                        read_config_file, resolve_head, resolve_head_class, search_dirs, validate)
from trunk.targets import TargetError

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
    ({"augment": [{"_target_": "os.system"}]}, "augment[0]._target_", "'os.system' is not an allowed class"),
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
    write(team, patch({"owner": "team-shadow"}))  # Hydra's order: the first entry that has it wins
    dirs = search_dirs([f"file://{team}"], conf_dir=conf)
    assert list_heads(dirs) == ["colour", "damage"]
    assert resolve_head("damage", dirs, {"workspace": "/ws"}).owner == "team-b"
    assert resolve_head("colour", dirs, {"workspace": "/ws"}).owner == "team-a"
    assert find_head_file("damage", dirs) == str(team / "heads" / "damage.yaml")


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


# -- untrusted configs: nothing named in a config runs, nothing reads the environment -----------
def _refusal(path, context=None) -> str:
    with pytest.raises(HeadConfigError) as err:
        load_head_spec(path, context=context if context is not None else {"workspace": "/ws"})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: field '"), msg
    return msg


@pytest.mark.parametrize("module, field, words", [
    ({"_target_": "heads.store.save_head"}, "module._target_", "does not exist or is not a head class"),
    ({"_target_": "heads.modules.torch.load", "f": "/etc/passwd"}, "module._target_", "is not a head class"),
    ({"_target_": "heads.spec.importlib.import_module", "name": "antigravity"}, "module._target_", "not a head"),
    ({"_target_": "heads.modules.LinearHead", "_args_": [3]}, "module._args_", "'_args_' is not allowed"),
    ({"_target_": "heads.modules.LinearHead", "_partial_": True}, "module._partial_", "'_partial_' is not allowed"),
    ({"_target_": "heads.modules.LinearHead", "_recursive_": True}, "module._recursive_", "is not allowed"),
    ({"_target_": "heads.modules.MLPHead", "hidden": {"_target_": "os.getpid"}}, "module.hidden._target_",
     "plain values only"),
])
def test_module_target_is_an_allowlisted_class_and_arguments_are_plain(tmp_path, module, field, words):
    msg = _refusal(write(tmp_path, patch({"module": module})))
    assert f"field '{field}'" in msg and words in msg, msg


def test_module_resolution_imports_nothing_the_config_names():
    assert "antigravity" not in sys.modules
    for target in ("antigravity.X", "heads.antigravity.X", "heads.modules.LinearHead.__init__", None):
        with pytest.raises(TargetError, match=r"field 'module._target_'"):
            resolve_head_class(target)
    assert "antigravity" not in sys.modules and "heads.antigravity" not in sys.modules
    from heads.modules import LinearHead

    assert resolve_head_class("heads.modules.LinearHead") is LinearHead


def test_dangerous_augment_target_is_refused_at_load_and_never_called(tmp_path):
    victim = tmp_path / "made-by-config"
    branch = {"attach.tap": "layer2", "module": {"_target_": "heads.branch.BranchHead"}}
    direct = patch({**branch, "augment": [{"_target_": "albumentations.os.makedirs", "name": str(victim)}]})
    msg = _refusal(write(tmp_path, direct))
    assert "field 'augment[0]._target_': 'albumentations.os.makedirs' is not an allowed class" in msg, msg
    nested = patch({**branch, "augment": [{"_target_": "albumentations.OneOf", "transforms": [
        {"_target_": "albumentations.HorizontalFlip"},
        {"_target_": "albumentations.os.makedirs", "name": str(victim)}]}]})
    msg = _refusal(write(tmp_path, nested))
    assert "field 'augment[0].transforms[1]._target_': 'albumentations.os.makedirs'" in msg, msg
    partial = patch({**branch, "augment": [{"_target_": "albumentations.HorizontalFlip", "_partial_": True}]})
    assert "field 'augment[0]._partial_'" in _refusal(write(tmp_path, partial))
    assert not victim.exists()
    good = patch({**branch, "augment": [{"_target_": "albumentations.OneOf", "transforms": [
        {"_target_": "albumentations.HorizontalFlip"}, {"_target_": "albumentations.VerticalFlip"}]}]})
    assert load_head_spec(write(tmp_path, good), context={"workspace": "/ws"}).config["augment"][0]["transforms"]


@pytest.mark.parametrize("value", [
    "${oc.env:SECRET_TOKEN}",
    "${oc.env:SECRET_TOKEN,default}",
    "prefix-${oc.decode:'${oc.env:SECRET_TOKEN}'}",
    "${oc.create:{a: 1}}",
    "${${workspace}}",
    "\\${oc.env:SECRET_TOKEN}",
])
def test_a_value_may_not_call_a_resolver(tmp_path, monkeypatch, value):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    msg = _refusal(write(tmp_path, patch({"description": value})))
    assert "field 'description'" in msg and "only plain interpolation (${head}, ${workspace})" in msg, msg
    assert "hunter2" not in msg
    # Same in a nested value and in the module's arguments.
    msg = _refusal(write(tmp_path, patch({"module": {"_target_": "heads.modules.MLPHead", "hidden": value}})))
    assert "field 'module.hidden'" in msg, msg


def test_only_keys_the_platform_provides_may_be_interpolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/root")
    msg = _refusal(write(tmp_path, patch({"description": "${HOME}"})))
    assert "field 'description': '${HOME}' is not a key the platform provides" in msg, msg
    # Without a workspace in the context, ${workspace} is refused the same way, not resolved.
    msg = _refusal(write(tmp_path, GOOD), context={})
    assert "field 'data.manifest': '${workspace}' is not a key" in msg, msg
    ok = load_head_spec(write(tmp_path, patch({"description": "${head.owner} data in ${workspace}"})),
                        context={"workspace": "/ws"})
    assert ok.config["description"] == "team-a data in /ws"


def test_stored_configs_are_checked_the_same_way(tmp_path, monkeypatch):
    # registry/jobs/cascade.py re-reads a head's config from MLflow through these two functions.
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    stored = tmp_path / "stored.yaml"
    stored.write_text(yaml.safe_dump(patch({"description": "${oc.env:SECRET_TOKEN}"})))
    source = "head.colour v3 (config/colour.yaml)"
    with pytest.raises(HeadConfigError, match=r"^head\.colour v3 \(config/colour\.yaml\): field 'description': "):
        validate(read_config_file(stored, source), source, context={"workspace": "/ws"}, expected_name="colour")
    from omegaconf import OmegaConf

    with pytest.raises(HeadConfigError, match="field 'description'"):  # a DictConfig is checked too
        validate(OmegaConf.load(stored), source, context={"workspace": "/ws"}, expected_name="colour")


def test_a_huge_config_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    path = tmp_path / "heads" / "colour.yaml"
    path.parent.mkdir()
    with path.open("w") as f:
        f.write(yaml.safe_dump(GOOD))
        f.write("description: '" + "x" * (30 * 1024 * 1024) + "'\n")  # 30 MB
    monkeypatch.setattr(yaml, "load", lambda *a, **k: pytest.fail("parsed a file over the size limit"))
    msg = _refusal(path)
    assert f"field '<file>': is larger than {MAX_CONFIG_BYTES // 1024} KiB" in msg, msg


def test_yaml_aliases_are_refused_so_a_billion_laughs_cannot_expand(tmp_path):
    lines = ["a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    path = tmp_path / "heads" / "colour.yaml"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n" + yaml.safe_dump(GOOD))
    assert path.stat().st_size < 1024  # small on disk: 9**9 strings once expanded
    msg = _refusal(path)
    assert "field '<file>': not valid YAML: line 2: YAML aliases (*a) are not allowed" in msg, msg
    # A merge key is an alias too.
    merged = yaml.safe_dump({**GOOD, "train": {}}).replace("train: {}", "train:\n  <<: *base")
    path.write_text("base: &base {epochs: 3}\n" + merged)
    assert "YAML aliases (*base) are not allowed" in _refusal(path)


def test_yaml_numbers_are_read_as_omegaconf_reads_them(tmp_path):
    # The safe loader keeps OmegaConf's float rules: 1e-3 is a float, not a string.
    path = write(tmp_path, patch({"module": {"_target_": "heads.modules.LinearHead", "dropout": 0.1}}))
    path.write_text(path.read_text().replace("dropout: 0.1", "dropout: 1e-1"))
    assert load_head_spec(path, context={"workspace": "/ws"}).module["dropout"] == 0.1


def test_allow_roots_must_be_absolute(tmp_path):
    msg = _refusal(write(tmp_path, patch({"data.allow_roots": ["shared/images"]})))
    assert "field 'data.allow_roots[0]': 'shared/images' must be an absolute folder" in msg, msg


def test_config_sha_is_unchanged_by_the_allow_roots_field(tmp_path):
    spec = load_head_spec(write(tmp_path, GOOD), context={"workspace": "/ws"})
    assert spec.data["allow_roots"] == []
    without = {**spec.config, "data": {k: v for k, v in spec.data.items() if k != "allow_roots"}}
    assert spec.config_sha == type(spec)(config=without, source=spec.source).config_sha
    wider = load_head_spec(write(tmp_path, patch({"data.allow_roots": ["/shared"]})), context={"workspace": "/ws"})
    assert wider.config_sha != spec.config_sha


def test_heldout_is_an_optional_data_field_that_leaves_config_sha_unchanged_when_absent(tmp_path):
    import hashlib
    import json

    spec = load_head_spec(write(tmp_path, GOOD), context={"workspace": "/ws"})
    assert spec.data["heldout"] is None
    # What config_sha hashed before the field existed: the config without it (and without unset allow_roots).
    before = {**{k: v for k, v in spec.config.items() if k != "monitor"},  # nor the unset monitor block
              "data": {k: v for k, v in spec.data.items() if k not in ("heldout", "allow_roots")}}
    assert spec.config_sha == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    named = load_head_spec(write(tmp_path, patch({"data.heldout": "${workspace}/data/colour_heldout.csv"})),
                           context={"workspace": "/ws"})
    assert named.data["heldout"] == "/ws/data/colour_heldout.csv"
    assert named.config_sha != spec.config_sha


@pytest.mark.parametrize("value, words", [
    ("  ", "field 'data.heldout': is empty"),
    ("${workspace}/data/colour.csv", "field 'data.heldout': '/ws/data/colour.csv' is data.manifest itself"),
    ({"path": "x.csv"}, "field 'data.heldout': Cannot convert 'DictConfig' to string"),
])
def test_a_bad_heldout_field_is_one_line_naming_it(tmp_path, value, words):
    msg = _refusal(write(tmp_path, patch({"data.heldout": value})), context={"workspace": "/ws"})
    assert words in msg and "\n" not in msg, msg


# -- the monitor block (issue 15): drift thresholds a team sets for its head ------------------
def test_monitor_block_reaches_the_drift_thresholds(tmp_path):
    from heads.monitor.drift import DriftThresholds

    spec = load_head_spec(write(tmp_path, patch({"monitor": {"label_psi_drift": 0.4, "alpha_drift": 0.0005,
                                                             "min_predictions": 50}})), context={"workspace": "/ws"})
    got = spec.drift_thresholds()
    assert isinstance(got, DriftThresholds)
    assert (got.label_psi_drift, got.alpha_drift, got.min_predictions) == (0.4, 0.0005, 50)
    assert got.label_psi_watch == DriftThresholds().label_psi_watch  # the rest: platform defaults


def test_an_absent_monitor_block_gives_the_platform_defaults_and_keeps_config_sha(tmp_path):
    import hashlib
    import json

    from heads.monitor.drift import DriftThresholds

    spec = load_head_spec(write(tmp_path, GOOD), context={"workspace": "/ws"})
    assert spec.config["monitor"] is None
    assert spec.drift_thresholds() == DriftThresholds()
    # What config_sha hashed before the block existed: the config without it (nor unset data fields).
    before = {k: v for k, v in spec.config.items() if k != "monitor"}
    before["data"] = {k: v for k, v in spec.data.items() if k not in ("heldout", "allow_roots")}
    assert spec.config_sha == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    set_ = load_head_spec(write(tmp_path, patch({"monitor": {"alpha_watch": 0.02}})), context={"workspace": "/ws"})
    assert set_.config_sha != spec.config_sha


@pytest.mark.parametrize("monitor, words", [
    ({"psi_drift": 0.3}, "field 'monitor.psi_drift': is not a monitor setting (known: alpha_drift"),
    ({"alpha_drift": "low"}, "field 'monitor.alpha_drift': 'low' must be a number"),
    ({"min_predictions": 2.5}, "field 'monitor.min_predictions': 2.5 must be an integer"),
    ({"alpha_drift": 0.5, "alpha_watch": 0.01}, "field 'monitor.alpha_drift': 0.5 must be > 0 and <= alpha_watch"),
    ({"low_confidence_below": 1.5}, "field 'monitor.low_confidence_below': 1.5 must be in (0, 1]"),
    ({"min_feature_rows": 0}, "field 'monitor.min_feature_rows': 0 must be >= 1"),
    (3, "field 'monitor': Cannot assign int"),
])
def test_a_bad_monitor_block_is_one_line_naming_file_and_field(tmp_path, monitor, words):
    path = write(tmp_path, patch({"monitor": monitor}))
    msg = _refusal(path)
    assert words in msg and msg.startswith(str(path)) and "\n" not in msg, msg
