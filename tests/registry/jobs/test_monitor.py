"""Drift of every classify job: assessed against each head's reference, reported, logged to MLflow, tagged; tools.monitor."""

# ruff: noqa: F811  (fixtures imported from a sibling test module are redefined as arguments)
from __future__ import annotations

import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import tools.monitor as tools_monitor
from heads.monitor.drift import DriftThresholds
from heads.monitor.reference import HeadReference
from registry.jobs.classify import classify_job
from registry.jobs.monitor import history, monitor_lines, recommendations, report_folder
from registry.store.heads import model_name
from tests.registry.jobs.test_classify import COLOURS, RUN, production  # noqa: F401  (fixture)
from tools.common import CONF_DIR
from trunk.preprocess import eval_transform

# Eight images: judge on few rows (the platform's minimums are 100 predictions, 32 sampled rows).
FEW = DriftThresholds(min_predictions=5, min_feature_rows=5, min_permutations=200)


def drifted_reference(trunk, folder) -> HeadReference:
    """A colour reference far from these images: validation all 'red', training features shifted by 50 std."""
    transform = eval_transform(trunk.data_config)
    x = torch.stack([transform(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(8)])
    with torch.no_grad():
        pooled = trunk(x, ["pooled"])["pooled"]
    train = torch.cat([pooled + 50 * pooled.std(0) + torch.randn_like(pooled) * 0.01 for _ in range(8)])
    val = torch.tensor([[9.0, 0.0, 0.0]]).repeat(200, 1)
    return HeadReference.build(val, COLOURS, train, tap="pooled", meta={"head": "colour"})


def test_a_drifted_head_is_reported_logged_and_tagged_on_its_production_version(client, production, trunk_a,
                                                                             tmp_path):
    folder, release = production
    out = tmp_path / "out"
    refs = {"colour": drifted_reference(trunk_a, folder), "shape": None}
    success = classify_job(client, folder, out, references=refs, thresholds={"colour": FEW}, **RUN)
    drift = success["drift"]
    assert drift["unreferenced"] == ["shape"] and set(drift["heads"]) == {"colour"}
    colour = drift["heads"]["colour"]
    assert colour["verdict"] == "drift" and colour["label_verdict"] == "drift" and colour["feature_verdict"] == "drift"
    assert drift["tagged"] == {"colour": "drift"}

    run = client.get_run(drift["run_id"])
    assert run.info.experiment_id == client.get_experiment_by_name("monitoring").experiment_id
    tags, metrics = run.data.tags, run.data.metrics
    assert (tags["release_version"], tags["trunk_version"], tags["output"], tags["fingerprint"]) == (
        str(release.version), str(release.trunk_version), str(out), success["fingerprint"])
    assert tags["colour.verdict"] == "drift" and tags["unreferenced"] == "shape"
    assert metrics["colour.label_psi"] == colour["label_psi"] and metrics["colour.verdict_level"] == 2.0
    assert metrics["colour.feature_p"] == colour["feature_p"] <= FEW.alpha_drift
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"_MONITOR.safetensors", "drift.json", "report"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {"report/drift.md",
                                                                                   "report/drift-colour.png"}
    assert (report_folder(out) / "drift.md").is_file() and not list(out.glob("drift*"))
    assert drift["report"] == str(report_folder(out))
    mv = client.get_model_version(model_name("colour"), str(release.heads["colour"]))
    assert mv.tags["drift"] == "drift" and mv.tags["drift_run"] == run.info.run_id
    assert "drift" not in client.get_model_version(model_name("shape"), str(release.heads["shape"])).tags

    lines = monitor_lines(drift)
    assert lines[0].startswith("  drift: 1 of 1 heads need attention") and "colour: DRIFT:" in lines[1]
    assert "  drift: no reference recorded, not assessed: shape" in lines

    # The same job again: nothing classified, nothing logged, the same run.
    again = classify_job(client, folder, out, references=refs, thresholds={"colour": FEW}, **RUN)
    assert again["drift"]["run_id"] == run.info.run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_no_shift_says_all_heads_ok_in_one_line(client, production, trunk_a, tmp_path):
    folder, release = production
    transform = eval_transform(trunk_a.data_config)
    x = torch.stack([transform(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(8)])
    with torch.no_grad():
        pooled = trunk_a(x, ["pooled"])["pooled"]
    # The reference is these very images: nothing can have moved.
    from heads.bank import HeadBank  # noqa: F401
    from registry.store.releases import load_release

    _, heads = load_release(client, release)
    refs = {n: HeadReference.build(heads[n].module(pooled).detach(), heads[n].classes, pooled, tap="pooled")
            for n in heads}
    success = classify_job(client, folder, tmp_path / "out", references=refs,
                           thresholds={n: FEW for n in heads}, **RUN)
    assert {d["verdict"] for d in success["drift"]["heads"].values()} == {"ok"}
    assert monitor_lines(success["drift"])[0] == "  drift: all 2 heads ok against their references"
    assert success["drift"]["tagged"] == {}


def test_tools_monitor_recommends_retraining_where_drift_persists(client, workspace, production, trunk_a, tmp_path,
                                                                 capsys):
    folder, release = production
    refs = {"colour": drifted_reference(trunk_a, folder), "shape": None}
    for i in range(3):
        classify_job(client, folder, tmp_path / f"out{i}", references=refs, thresholds={"colour": FEW}, **RUN)
    runs = history(client, head="colour")
    assert len(runs) == 3 and all(r["heads"]["colour"]["verdict"] == "drift" for r in runs)
    assert set(recommendations(runs, last=3)) == {"colour"}
    assert recommendations(runs, last=4) == {}

    def tool(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="monitor", overrides=[f"workspace={workspace}", *overrides])
        tools_monitor.main(cfg)
        return capsys.readouterr().out

    printed = tool("head=colour", f"output={tmp_path / 'plots'}")
    assert "drift of head colour across 3 jobs" in printed
    assert printed.count(" colour ") >= 3 and "RETRAIN colour: drift in each of its last 3 jobs" in printed
    assert (tmp_path / "plots" / "history-colour.png").is_file()
    printed = tool("release=production", "last=4", f"output={tmp_path / 'plots'}")
    assert f"drift of release v{release.version} across 3 jobs" in printed
    assert "no head drifted in each of its last 4 jobs: no retraining recommended" in printed

    # retrain=true: the flagged head's own job on the data its config names (conf/heads/colour.yaml reads
    # <workspace>/data/shapes), registered as a new version.
    from demo.shapes import generate_shapes

    generate_shapes(workspace / "data" / "shapes", n_images=40, n_holdout=0, size=32, seed=0)
    printed = tool("release=production", "retrain=true", f"output={tmp_path / 'plots'}", "progress=false")
    assert "retraining colour: tools.train_head's job" in printed and "or rerun this with retrain=true" not in printed
    assert client.get_model_version(model_name("colour"), "2").tags["trunk_version"] == str(release.trunk_version)
