"""Hydra as its users expect: the `head` group, typed tool configs, one-line composition errors, --help.

Composition is checked with Hydra's compose API and the tools' plain functions; what is about
the command line (one error line, exit status, --help text) runs the real tools as subprocesses.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from heads.spec import HeadConfigError
from tools.candidates import Distill, Multitask, Registered, build_candidate
from tools.common import CONF_DIR, check_config, composition_error_line, head_spec, num_workers
from tests.tools.toolserver import run_tool_process

REPO = Path(__file__).resolve().parents[2]
GOOD_TEAM_HEAD = ("name: {name}\nowner: team-outside\ndata:\n  manifest: /data/{name}.csv\n"
                  "module:\n  _target_: heads.modules.LinearHead\n")


def compose_tool(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def refusal(name: str, *overrides: str) -> str:
    """The one line a config mistake gives, whether Hydra or the schema's checks refuse it."""
    try:
        check_config(compose_tool(name, *overrides))
    except (ValueError, OSError) as e:
        if not isinstance(e, (HeadConfigError,)) and type(e).__module__.startswith("hydra"):
            return composition_error_line(e)
        return str(e)
    except Exception as e:  # Hydra's ConfigCompositionException and OmegaConf's errors
        return composition_error_line(e)
    raise AssertionError(f"{name} {overrides} composed")


def run_tool(tool: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["PYTHONPATH"] = str(REPO)
    return run_tool_process(REPO, env, tool, list(args), timeout=timeout)  # its own process, imports paid once


def test_head_group_override_reaches_the_spec():
    cfg = compose_tool("train_head", "head=colour", "head.train.lr=0.003", "head.train.epochs=5", "workspace=/ws")
    spec = head_spec(cfg)
    assert spec.name == "colour" and spec.source == str(Path(CONF_DIR) / "heads" / "colour.yaml")
    # the overrides win, the rest comes from the shared defaults (conf/heads/_defaults.yaml)
    assert spec.train == {"epochs": 5, "batch_size": 256, "lr": 0.003, "weight_decay": 0.0001, "patience": 40,
                          "seed": 0}
    assert spec.data["manifest"] == "/ws/data/shapes/manifests/colour.csv"


def test_shared_defaults_keep_every_demo_heads_config():
    import yaml

    for name, epochs in (("colour", 300), ("count", 300), ("shape", 300), ("texture", 300), ("count_branch", 10)):
        spec = head_spec(compose_tool("train_head", f"head={name}", "workspace=/ws"))
        assert spec.train["epochs"] == epochs and spec.gate["min_val_accuracy"] == 0.5
        assert "train" not in yaml.safe_load((Path(CONF_DIR) / "heads" / f"{name}.yaml").read_text()) or \
            name == "count_branch"


def test_team_folder_is_found_by_hydra(tmp_path):
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "damage.yaml").write_text(GOOD_TEAM_HEAD.format(name="damage"))
    cfg = compose_tool("train_head", "head=damage", f"hydra.searchpath=[file://{tmp_path}]", "workspace=/ws")
    assert head_spec(cfg).owner == "team-outside" and head_spec(cfg).train["patience"] == 10  # schema default


@pytest.mark.parametrize("overrides, line", [
    (("head=colour", "head.trian.lr=0.1"), "field 'head.trian': Key 'trian' not in 'HeadConfig'"),
    (("head=colour", "batch_size=ten"), "field 'batch_size': Value 'ten' of type 'str' could not be converted"),
    (("head=colour", "nope=1"), "field 'nope': Key 'nope' not in 'TrainHeadConfig'"),
    (("head=colour", "num_workers=many"), "field 'num_workers': 'many' is not a number or 'auto'"),
    (("head=nope",), "Could not find 'head/nope'; available: colour, count, count_branch, shape, texture"),
    ((), "field 'head': give head=<name>; heads: colour, count, count_branch, shape, texture"),
])
def test_config_mistakes_are_one_line_naming_the_field(overrides, line):
    msg = refusal("train_head", *overrides)
    assert line in msg and "\n" not in msg, msg


def test_every_tool_config_is_typed():
    assert refusal("classify", "input=/x", "output=/y", "backend=spark") == \
        "field 'backend': 'spark' is not one of: local, ray"
    assert refusal("classify", "input=/x").startswith("field 'output': ") and "missing mandatory value" in \
        refusal("classify", "input=/x")
    assert "field 'to'" in refusal("rollback", "to=latest")
    assert "field 'suite': 'nope' is not one of: heads, pipeline, streaming, bank, cache, roundtrips, promotion, " \
           "cascade, quantize, cache_precision" == refusal("bench", "suite=nope")
    assert refusal("classify", "input=/x", "output=/y", "head_weights=int4") == \
        "field 'head_weights': 'int4' is not one of: float32, bfloat16, float16, int8"
    assert refusal("extract") == "field 'input': give exactly one of input=<folder or manifest> or head=<name>"
    assert refusal("refresh", "multitask.base=nope") == "field 'multitask.base': 'nope' is not one of: production, config"
    assert num_workers(compose_tool("classify", "num_workers=auto")) >= 1
    assert num_workers(compose_tool("classify", "num_workers=3")) == 3


def test_candidate_is_a_config_group_of_allowlisted_classes():
    assert isinstance(build_candidate(compose_tool("refresh")), Registered)
    assert build_candidate(compose_tool("refresh")).name == "candidate"
    assert build_candidate(compose_tool("refresh", "candidate=version", "candidate.version=3")).name == 3
    m = build_candidate(compose_tool("refresh", "candidate=multitask", "multitask.epochs=8"))
    assert isinstance(m, Multitask) and m.settings["epochs"] == 8
    assert isinstance(build_candidate(compose_tool("refresh", "candidate=distill")), Distill)
    assert "available: alias, distill, multitask, quantize, timm, version" in refusal("refresh", "candidate=bogus")
    cfg = compose_tool("refresh", "candidate=timm")
    OmegaConf.update(cfg, "candidate._target_", "os.system", force_add=True)
    with pytest.raises(ValueError, match=r"field 'candidate._target_': 'os.system' is not one of"):
        build_candidate(cfg)


# -- hostile team heads, composed by Hydra: refused before Hydra's YAML loader sees them --------
def test_billion_laughs_and_resolvers_on_a_team_searchpath_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    heads = tmp_path / "heads"
    heads.mkdir()
    lines = ["a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    (heads / "lol.yaml").write_text("\n".join(lines) + "\n" + GOOD_TEAM_HEAD.format(name="lol"))
    (heads / "leak.yaml").write_text(GOOD_TEAM_HEAD.format(name="leak") + "description: ${oc.env:SECRET_TOKEN}\n")
    (heads / "pkg.yaml").write_text("# @package _global_\n" + GOOD_TEAM_HEAD.format(name="pkg"))
    (heads / "reach.yaml").write_text("defaults:\n  - /hydra/callbacks: x\n" + GOOD_TEAM_HEAD.format(name="reach"))
    (heads / "huge.yaml").write_text(GOOD_TEAM_HEAD.format(name="huge") + "description: '" + "x" * 70_000 + "'\n")
    sp = f"hydra.searchpath=[file://{tmp_path}]"
    expect = {"lol": "YAML aliases (*a) are not allowed", "leak": "only plain interpolation",
              "pkg": "'# @package' headers are not allowed", "reach": "field 'defaults[0]'",
              "huge": "is larger than 64 KiB"}
    for name, words in expect.items():
        with pytest.raises(HeadConfigError) as err:
            compose_tool("train_head", f"head={name}", sp)
        assert str(err.value).startswith(f"{heads / name}.yaml: field '") and words in str(err.value)
        assert "hunter2" not in str(err.value)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    for args, words in ((["head=colour", "head.trian.lr=0.1"], "field 'head.trian'"),
                        (["head=colour", "promote=no"], "field 'promote': 'no' is not a boolean")):
        proc = run_tool("train_head", f"workspace={tmp_path}", *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything ran


def test_help_describes_the_tools_own_options():
    out = run_tool("train_head", "--help").stdout
    assert out.startswith("train_head: train, evaluate") and "head=<name>" in out and "promote: true" in out
    assert "candidate" not in out and "trunk:" not in out
    out = run_tool("refresh", "--help").stdout
    assert out.startswith("refresh: build a candidate") and "candidate=alias|version|multitask|timm|distill" in out
