"""``python -m tools.refresh`` as users run it: a distilled candidate, the cascade, the verdict, the exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.registry.jobs import cascade_state as cs
from tests.tools.toolserver import run_tool_process

REPO = Path(__file__).resolve().parents[2]


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m tools.<tool> *args``, its own process (forked by :mod:`tests.tools.toolserver`: imports once)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return run_tool_process(REPO, env, tool, list(args), timeout=600)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with a production release: random-init test_resnet at 32 px and three heads."""
    root = tmp_path_factory.mktemp("refresh")
    cs.small_platform(root)
    return root / "ws"


def test_bad_candidate_method_is_one_line_naming_the_options(ws):
    proc = run_tool("refresh", f"workspace={ws}", "candidate=bogus")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: In 'refresh': Could not find 'candidate/bogus'; available: alias, distill, "
                                   "multitask, quantize, timm, version")


def test_no_candidate_alias_says_how_to_make_one(ws):
    proc = run_tool("refresh", f"workspace={ws}")
    assert proc.returncode == 2
    assert "no trunk version has the alias 'candidate'" in proc.stderr


def test_distill_then_cascade_prints_speedup_report_and_verdict(ws):
    # promote=false: the module's later tests need production's trunk as the fixture made it (no recipe).
    proc = run_tool("refresh", f"workspace={ws}", "candidate=distill", "distill.epochs=2", "progress=false",
                    "promote=false")
    out = proc.stdout
    assert proc.returncode in (0, 1), proc.stderr
    assert "candidate trunk v" in out and "distill, built" in out
    assert "student vs teacher:" in out and "fewer GFLOPs (same batches, one run)" in out
    for name in cs.HEADS:
        assert f"\n{name} " in out  # one report row per production head
    report = next(line for line in out.splitlines() if line.startswith("report: "))
    assert Path(report.split()[1]).is_file()
    if proc.returncode == 0:
        assert "every head passed; promote=false, so production stays release v" in out
    else:
        assert "BLOCKED by" in out and "blocks: " in out

    # Building the same candidate again reuses it (same recipe).
    again = run_tool("refresh", f"workspace={ws}", "candidate=distill", "distill.epochs=2", "progress=false",
                     "cascade=false")
    assert again.returncode == 0 and "distill, reused (same recipe)" in again.stdout


def test_timm_candidate_is_registered_with_alias_candidate_only(ws):
    from mlflow import MlflowClient

    proc = run_tool("refresh", f"workspace={ws}", "candidate=timm", "trunk.seed=7",
                    "trunk.data_config.input_size=[3,32,32]", "cascade=false")
    assert proc.returncode == 0, proc.stderr
    assert "timm, built" in proc.stdout
    version = int(proc.stdout.split("candidate trunk v")[1].split()[0])
    client = MlflowClient(tracking_uri=f"sqlite:///{ws}/mlflow.db", registry_uri=f"sqlite:///{ws}/mlflow.db")
    assert int(client.get_registered_model("trunk").aliases["candidate"]) == version
    production = client.get_model_version_by_alias("release", "production")
    assert production.tags["trunk_version"] != str(version)  # building a candidate never moves production


def test_multitask_candidate_from_a_trunk_without_recipe_says_so_and_stores_its_own(ws):
    from mlflow import MlflowClient

    from registry.store.trunks import trunk_recipe, trunk_version_tags

    # production's trunk was registered as it is (no recipe): the configured settings apply, and the tool says so
    proc = run_tool("refresh", f"workspace={ws}", "candidate=multitask", "multitask.epochs=1", "augment=none",
                    "cascade=false", "progress=false")
    assert proc.returncode == 0, proc.stderr
    version = int(proc.stdout.split("candidate trunk v")[1].split()[0])
    production = MlflowClient(tracking_uri=f"sqlite:///{ws}/mlflow.db").get_model_version_by_alias(
        "release", "production").tags["trunk_version"]
    line = (f"  production trunk v{production} has no stored recipe (registered from timm or a weights file): "
            f"training with the configured multitask settings and augment group")
    assert line in proc.stdout.splitlines()
    client = MlflowClient(tracking_uri=f"sqlite:///{ws}/mlflow.db", registry_uri=f"sqlite:///{ws}/mlflow.db")
    recipe = trunk_recipe(client, version)  # the candidate's own recipe, for the refresh after it
    assert (recipe["augment"], recipe["epochs"], recipe["tasks"]) == ([], 1, ["colour", "count_branch", "shape"])
    assert trunk_version_tags(client, version)["recipe_diff"] == f"production trunk v{production} has no stored recipe"


def test_a_numbered_candidate_is_the_version_option():
    from tools.refresh import numbered_candidate

    assert numbered_candidate(["candidate=3", "promote=false"]) == ["candidate=version", "candidate.version=3",
                                                                   "promote=false"]
    assert numbered_candidate(["candidate=multitask", "multitask.epochs=3"]) == ["candidate=multitask",
                                                                                 "multitask.epochs=3"]


def test_candidate_by_number_on_the_command_line_names_the_missing_version(ws):
    proc = run_tool("refresh", f"workspace={ws}", "candidate=7")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: trunk v7 does not exist in the registry"


@pytest.mark.slow  # torchrun plus two ranks importing torch, timm, MLflow and Hydra, then one process: ~90 s
def test_distillation_under_torchrun_registers_the_student_one_process_distills(ws, tmp_path):
    """Two gloo ranks distill (cascade=false) on one copy of the workspace, one process on another."""
    import shutil

    import torch

    from registry.store.tracking import connect
    from registry.store.trunks import load_trunk, trunk_alias_versions
    from tests.trunk.test_distributed import free_port

    copies = {}
    for name in ("ranks", "single"):
        copies[name] = tmp_path / name
        shutil.copytree(ws, copies[name], symlinks=True)
    before = len(connect(copies["single"]).search_model_versions("name='trunk'"))
    args = ["candidate=distill", "distill.epochs=1", "distill.batch_size=16", "cascade=false", "progress=false",
            "device=cpu", "distributed_timeout_s=120"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "tools.refresh",
                            f"workspace={copies['ranks']}", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=400)
    assert ranks.returncode == 0, ranks.stdout[-2000:] + ranks.stderr[-3000:]
    assert ranks.stdout.count("candidate trunk v") == 1 and "distill, built" in ranks.stdout  # rank 0 reports
    single = run_tool("refresh", f"workspace={copies['single']}", *args)
    assert single.returncode == 0, single.stderr[-3000:]

    students = {}
    for name, root in copies.items():
        client = connect(root)
        # Exactly one version registered per run, by rank 0 alone.
        assert len(client.search_model_versions("name='trunk'")) == before + 1
        students[name] = load_trunk(client, trunk_alias_versions(client)["candidate"])
    a, b = (students[n].model.state_dict() for n in ("ranks", "single"))
    assert a.keys() == b.keys()
    from trunk.model import Trunk

    init = Trunk("test_resnet", model_kwargs={"channels": [16, 24, 24, 48], "stem_width": 8},
                 data_config=students["single"].data_config).model.state_dict()
    floats = [k for k in b if torch.is_floating_point(b[k])]
    moved = max((b[k] - init[k]).abs().max().item() for k in floats)
    apart = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    # Equal up to float summation order (which AdamW's normalised steps amplify a little), while
    # the epoch moved the weights two orders of magnitude more.
    assert moved > 1e-2 and apart < 0.02 * moved, (apart, moved)
