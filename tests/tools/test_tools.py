"""The tools driven exactly as the README does, as subprocesses, on one temporary workspace.

Each run is its own process with its own command line, output and exit status; the
processes are forked by :mod:`tests.tools.toolserver`, which has imported the libraries once.

Checks what users and other jobs rely on (DESIGN.md): names, tags and metrics in MLflow,
the release manifest, and the Parquet schema of bulk classification.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.tools.toolserver import run_tool_process

REPO = Path(__file__).resolve().parents[2]
# The demo, shrunk to test size: tiny trunk at 32 px, a few hundred images, one trunk epoch.
SMALL_DEMO = ["data.n_images=320", "data.n_holdout=24", "data.size=32", "trunk=test_resnet",
              "trunk.data_config.input_size=[3,32,32]", "train.epochs=1", "progress=false"]
HEAD_METRICS = {"val_accuracy", "val_macro_f1", "params", "added_gflops", "added_ms_per_image"}
HEAD_TAGS = {"trunk_id", "tap", "config_sha", "data_sha"}


def run_tool(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m tools.<tool> *args``, its own process (forked by :mod:`tests.tools.toolserver`: imports once)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = run_tool_process(REPO, env, tool, list(args), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"tools.{tool} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def team_head(folder: Path, name: str, workspace: Path, **overrides: str) -> None:
    """A head config in a team's own folder, outside the repo, on the shapes' count labels."""
    fields = {
        "name": name, "owner": "team-outside",
        "manifest": f"{workspace}/data/shapes/manifests/count.csv",
        "epochs": "30", "min_val_accuracy": "0.3",
    } | overrides
    (folder / "heads").mkdir(parents=True, exist_ok=True)
    (folder / "heads" / f"{name}.yaml").write_text(
        f"name: {fields['name']}\nowner: {fields['owner']}\n"
        f"data:\n  manifest: {fields['manifest']}\n"
        f"module:\n  _target_: heads.modules.MLPHead\n  hidden: 32\n"
        f"train:\n  epochs: {fields['epochs']}\n"
        f"gate:\n  min_val_accuracy: {fields['min_val_accuracy']}\n"
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    proc = run_tool("demo", f"workspace={ws}", *SMALL_DEMO)
    return ws, proc.stdout


def mlflow_client(ws: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def production_manifest(client) -> dict:
    release = client.get_model_version_by_alias("release", "production")
    return json.loads(Path(client.download_artifacts(release.run_id, "release.json")).read_text())


def check_parquet(folder: Path, heads: list[str], n_rows: int) -> pa.Table:
    success = json.loads((folder / "_SUCCESS.json").read_text())
    table = pq.read_table(sorted(folder.glob("part-*.parquet")))
    expected = [("path", pa.string()), ("sha256", pa.string()), ("error", pa.string())]
    for head in sorted(heads):
        expected += [(f"{head}_label", pa.string()), (f"{head}_score", pa.float32())]
    assert [(f.name, f.type) for f in table.schema] == expected
    assert table.num_rows == n_rows == success["counts"]["images"]
    assert set(success["release"]["heads"]) == set(heads)
    assert {"version", "trunk_version", "trunk_id"} <= set(success["release"])
    return table


def test_demo_prints_what_users_need(demo):
    ws, out = demo
    assert "held-out accuracy" in out
    assert "predictions:" in out and "mlflow ui --backend-store-uri" in out
    for head in ("shape", "colour", "count", "texture"):
        assert head in out
    # a colour-shifted copy of the held-out set is classified and its drift verdicts printed
    assert "[6/7] classifying" in out and "drifted on the shifted set:" in out
    assert "drift on the colour-shifted held-out copy:" in out


def test_demo_mlflow_contents_match_design(demo):
    ws, _ = demo
    client = mlflow_client(ws)
    names = {m.name for m in client.search_registered_models()}
    assert {"trunk", "release", "head.shape", "head.colour", "head.count", "head.texture"} <= names
    manifest = production_manifest(client)
    trunk_version = client.get_model_version("trunk", str(manifest["trunk"]["version"]))
    trunk_id = trunk_version.tags["trunk_id"]
    assert manifest["trunk"]["trunk_id"] == trunk_id
    assert manifest["heads"], "the demo's release has heads"
    for name, entry in manifest["heads"].items():
        mv = client.get_model_version(f"head.{name}", str(entry["version"]))
        assert HEAD_TAGS <= set(mv.tags)
        assert mv.tags["trunk_id"] == trunk_id, "all heads in a release share its trunk_id"
        # Each head where its config attaches it (count_branch forks at layer2, when it passes its gate).
        assert mv.tags["tap"] == ("layer2" if name == "count_branch" else "pooled")
        metrics = client.get_run(mv.run_id).data.metrics
        assert HEAD_METRICS <= set(metrics)
        assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["params"] > 0 and metrics["added_gflops"] > 0
    # the database and every artifact live inside the workspace
    assert (ws / "mlflow.db").is_file()
    assert Path(client.get_experiment_by_name("heads").artifact_location.removeprefix("file://")).is_relative_to(ws)


def test_demo_parquet_matches_design(demo):
    ws, _ = demo
    folders = sorted((ws / "predictions").glob("demo-holdout-*"))
    assert folders
    table = check_parquet(folders[-1], list(production_manifest(mlflow_client(ws))["heads"]), n_rows=24)
    assert table.column("error").null_count == 24


def test_team_head_classify_report_and_bad_config(demo, tmp_path):
    ws, _ = demo
    team = tmp_path / "team_conf"
    team_head(team, "items", ws)
    team_head(team, "strict", ws, min_val_accuracy="0.999")
    team_head(team, "broken", ws, epochs="ten")
    searchpath = f"hydra.searchpath=[file://{team}]"

    # a product team's head from a folder outside the repo, through Hydra's search path
    out = run_tool("train_head", f"workspace={ws}", "head=items", searchpath, "progress=false").stdout
    assert "head.items v1" in out and "promoted: release" in out

    # a head that fails its gate gets a report and production is untouched
    client = mlflow_client(ws)
    before = client.get_model_version_by_alias("release", "production").version
    out = run_tool("train_head", f"workspace={ws}", "head=strict", searchpath, "progress=false").stdout
    assert "[FAIL] val_accuracy" in out and "production is untouched" in out
    assert client.get_model_version_by_alias("release", "production").version == before

    # a bad config is one line naming the file and the field, exit status 2
    proc = run_tool("train_head", f"workspace={ws}", "head=broken", searchpath, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "broken.yaml: field 'train.epochs'" in err[0]

    # bulk classification with every production head, a bad file among the images
    images = ws / "data" / "shapes" / "holdout"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in sorted(images.glob("*.png"))[:10]:
        (inputs / p.name).write_bytes(p.read_bytes())
    (inputs / "not_an_image.jpg").write_text("<html>oops</html>")
    out_dir = tmp_path / "predictions"
    run_tool("classify", f"workspace={ws}", f"input={inputs}", f"output={out_dir}", "progress=false")
    heads = sorted(production_manifest(client)["heads"])
    assert "items" in heads and "colour" in heads
    table = check_parquet(out_dir, heads, n_rows=11).to_pydict()
    bad = table["path"].index(str(inputs / "not_an_image.jpg"))
    assert table["error"][bad] and all(table[f"{h}_label"][bad] is None for h in heads)
    assert sum(e is None for e in table["error"]) == 10

    # re-running the same job writes nothing
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    run_tool("classify", f"workspace={ws}", f"input={inputs}", f"output={out_dir}", "progress=false")
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before

    # backend=ray reaches the job's own checks (its rows equal local's: tests/heads/classify/test_ray_backend.py)
    bad = run_tool("classify", f"workspace={ws}", f"input={inputs}", f"output={tmp_path / 'x'}", "backend=ray",
                   "ray.actors=0", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: field 'ray.actors': must be positive, got 0"

    # extraction: the second run reuses every row
    run_tool("extract", f"workspace={ws}", f"input={inputs}", "progress=false")
    out = run_tool("extract", f"workspace={ws}", f"input={inputs}", "progress=false").stdout
    assert "new_rows 0" in out and "reused_rows 10" in out and "errors 1" in out

    # the leaderboard lists every production head and is logged to MLflow
    out = run_tool("report", f"workspace={ws}").stdout
    for head in heads:
        assert head in out
    assert client.search_runs([client.get_experiment_by_name("reports").experiment_id])


def test_head_override_is_registered_and_multirun_survives_a_failing_head(demo, tmp_path):
    ws, _ = demo
    team = tmp_path / "team_conf"
    team_head(team, "badtap", ws)
    path = team / "heads" / "badtap.yaml"
    path.write_text(path.read_text() + "attach:\n  tap: layer2\n")  # a pooled head class on a branch tap

    # one override on the command line reaches training and the registered config
    out = run_tool("train_head", f"workspace={ws}", "head=colour", "head.train.lr=0.003", "head.train.epochs=5",
                   "promote=false", "progress=false").stdout
    version = out.split("head.colour v")[1].split()[0]
    mv = mlflow_client(ws).get_model_version("head.colour", version)
    params = mlflow_client(ws).get_run(mv.run_id).data.params
    assert params["train.lr"] == "0.003" and params["train.epochs"] == "5"
    saved = sorted((ws / "hydra" / "train_head").glob("*/.hydra/config.yaml"))[-1].read_text()
    assert "lr: 0.003" in saved and "${workspace}/data/shapes/manifests/colour.csv" in saved  # nothing resolved

    # -m: every head trains; the failing one is reported and the exit status says so
    proc = run_tool("train_head", "-m", "head=colour,badtap,texture", "head.train.epochs=3", "promote=false",
                    f"workspace={ws}", f"hydra.searchpath=[file://{team}]", "progress=false", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "head.colour v" in proc.stdout and "head.texture v" in proc.stdout
    assert f"error: {path}: field 'module._target_'" in proc.stderr
    assert "FAILED (exit 2): head=badtap" in proc.stderr
