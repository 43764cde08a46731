"""The production leaderboard and head dependencies: rows from MLflow, aligned tables, a PNG, logged to `reports`."""

from __future__ import annotations

import pytest
from PIL import Image

from registry.store.heads import register_head
from registry.store.releases import bootstrap_release, promote_head
from registry.reports.report import (
    COLUMNS, format_dependencies, format_table, head_dependencies, log_report, plot_accuracy_vs_cost, production_table,
    trunk_aliases, trunk_dependents,
)
from registry.store.trunks import register_trunk


@pytest.fixture
def production(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    bootstrap_release(client, tv)
    colour = make_result(trunk_a, "colour", val_accuracy=0.93)
    shape = make_result(trunk_a, "shape", classes=("circle", "square"), val_accuracy=0.81)
    promote_head(client, "colour", register_head(client, colour, trunk_version=tv))
    promote_head(client, "shape", register_head(client, shape, trunk_version=tv))
    return {"colour": colour, "shape": shape}


def test_production_table_rows(client, production):
    rows = production_table(client)
    assert [r["head"] for r in rows] == ["colour", "shape"]
    for row in rows:
        assert set(row) == set(COLUMNS) | {"added_ms_per_image_spread"}
        result = production[row["head"]]
        assert row["version"] == 1 and row["owner"] == "team-vision" and row["tap"] == "pooled"
        for m in ("val_accuracy", "added_gflops", "added_ms_per_image", "params"):
            assert row[m] == pytest.approx(result.metrics[m])


def test_format_table_is_aligned(client, production):
    text = format_table(production_table(client))
    lines = text.splitlines()
    assert lines[0].split() == list(COLUMNS)
    assert len(lines) == 4 and set(lines[1]) <= {"-", " "}
    assert lines[2].split()[:5] == ["colour", "1", "team-vision", "pooled", "0.9300"]
    assert lines[3].split()[:5] == ["shape", "1", "team-vision", "pooled", "0.8100"]
    # Right-aligned numbers end in the same column.
    assert lines[2].index("0.9300") + 6 == lines[3].index("0.8100") + 6 == lines[0].index("val_accuracy") + 12


def test_empty_production(client):
    assert production_table(client) == []
    assert format_table([]) == "(no heads in production)"


def test_plot_writes_png(client, production, tmp_path):
    path = plot_accuracy_vs_cost(production_table(client), tmp_path / "plots" / "acc.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200


def test_log_report_logs_table_and_png(client, production, workspace, tmp_path):
    out = log_report(client, workspace)
    assert out["rows"] == production_table(client)
    assert out["table"] == format_table(out["rows"])
    assert out["png"].is_file() and out["png"].is_relative_to(workspace)
    run = client.get_run(out["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "reports"
    assert run.data.tags["release_version"] == "3"
    assert run.data.metrics["heads"] == 2
    files = {f.path for f in client.list_artifacts(out["run_id"])}
    assert files == {"production_table.md", "accuracy_vs_cost.png", "dependencies.md", "leaderboard.json",
                     "production_table.csv", "summary.md"}
    # The MLflow table: the same rows, one per head, with the table's columns.
    table = client.load_table(client.get_experiment_by_name("reports").experiment_id, "leaderboard.json",
                              run_ids=[out["run_id"]])
    assert list(table["head"]) == ["colour", "shape"]
    assert list(table["val_accuracy"]) == pytest.approx([0.93, 0.81])
    assert set(COLUMNS) <= set(table.columns)
    md = open(client.download_artifacts(out["run_id"], "production_table.md", str(tmp_path))).read()
    assert "| colour | 1 | team-vision | pooled | 0.9300 |" in md
    second = log_report(client, workspace)  # a second report in the same second keeps the first
    assert second["png"] != out["png"] and out["png"].is_file()


# -- head dependencies and stale flags -----------------------------------------------------
@pytest.fixture
def refreshed(client, production, trunk_a, trunk_b, make_result):
    """Production on trunk a (colour v1, shape v1); a candidate trunk b with colour v2 retrained on it."""
    ta = register_trunk(client, trunk_a)
    tb = register_trunk(client, trunk_b)
    client.set_registered_model_alias("trunk", "candidate", str(tb))
    register_head(client, make_result(trunk_b, "colour", seed=1), trunk_version=tb)
    return ta, tb


def test_stale_head_is_flagged_and_listed_under_its_trunk(client, refreshed, trunk_a, trunk_b):
    ta, tb = refreshed
    colour, shape = head_dependencies(client)
    assert colour == {"head": "colour", "production_version": 1, "latest_version": 2, "latest_trunk_version": tb,
                      "latest_trunk_id": trunk_b.trunk_id, "production_trunk_version": ta, "stale": True,
                      "latest_gate": "passed", "latest_run_id": colour["latest_run_id"],
                      "trunk_versions": {ta: [1], tb: [2]}}
    assert shape["stale"] is False and shape["trunk_versions"] == {ta: [1]} and shape["latest_trunk_id"] == \
        trunk_a.trunk_id
    assert trunk_dependents(client) == {ta: ["colour v1", "shape v1"], tb: ["colour v2"]}
    assert trunk_aliases(client) == {ta: ["production"], tb: ["candidate"]}  # production follows the release

    lines = format_dependencies([colour, shape], ta, trunk_aliases(client)).splitlines()
    assert lines[0].split() == ["head", "production", "latest", "latest", "on", "trunk", "stale"]
    assert lines[2].split()[:4] == ["colour", "v1", "v2", f"v{tb}"]
    assert lines[2].endswith(f"STALE: latest on trunk v{tb}, production trunk v{ta}")
    assert lines[3].split() == ["shape", "v1", "v1", f"v{ta}", "ok"]
    assert lines[lines.index("heads by trunk version") + 1:] == [f"trunk v{ta} (production): colour v1, shape v1",
                                                                 f"trunk v{tb} (candidate): colour v2"]


def test_dependencies_without_production(client, trunk_a, make_result):
    tv = register_trunk(client, trunk_a)
    register_head(client, make_result(trunk_a, "colour"), trunk_version=tv)
    [row] = head_dependencies(client)
    assert (row["production_version"], row["production_trunk_version"], row["stale"]) == (None, None, False)
    text = format_dependencies([row], None)
    assert text.splitlines()[2].split() == ["colour", "-", "v1", f"v{tv}", "ok"]
    assert text.endswith(f"trunk v{tv} (-): colour v1")
    assert format_dependencies([], None, {3: ["candidate"]}).splitlines() == [
        "(no heads registered)", "", "heads by trunk version", "trunk v3 (candidate): (no heads)"]


def test_nothing_registered(client):
    assert head_dependencies(client) == [] and trunk_dependents(client) == {} and trunk_aliases(client) == {}


def test_log_report_logs_dependencies(client, refreshed, workspace, tmp_path):
    ta, tb = refreshed
    out = log_report(client, workspace)
    assert out["dependencies"] == head_dependencies(client)
    assert out["dependencies_text"] == format_dependencies(out["dependencies"], ta, {tb: ["candidate"]})
    assert {f.path for f in client.list_artifacts(out["run_id"])} == {
        "production_table.md", "accuracy_vs_cost.png", "dependencies.md", "leaderboard.json", "production_table.csv",
        "summary.md"}
    md = open(client.download_artifacts(out["run_id"], "dependencies.md", str(tmp_path))).read()
    assert f"STALE: latest on trunk v{tb}, production trunk v{ta}" in md
    assert f"trunk v{tb} (candidate): colour v2" in md
    assert client.get_run(out["run_id"]).data.metrics["stale_heads"] == 1


def test_leaderboard_marks_costs_below_timing_noise_and_leaves_empty_panels_out():
    from registry.reports.report import plot_panels

    rows = [{"head": "colour", "version": 1, "owner": "o", "tap": "pooled", "val_accuracy": 0.9,
             "added_gflops": 1e-6, "added_ms_per_image": 0.0002, "added_ms_per_image_spread": 0.003, "params": 10},
            {"head": "shape", "version": 1, "owner": "o", "tap": "pooled", "val_accuracy": 0.8,
             "added_gflops": 2e-6, "added_ms_per_image": 0.55, "added_ms_per_image_spread": 0.02, "params": 10}]
    text = format_table(rows)
    assert "< 0.003 (below timing noise)" in text.splitlines()[2]
    assert "0.5500 (IQR 0.0200)" in text.splitlines()[3]
    assert [p[0] for p in plot_panels(rows)] == ["added_gflops", "added_ms_per_image"]
    unmeasured = [{**r, "added_ms_per_image": None} for r in rows]
    assert [p[0] for p in plot_panels(unmeasured)] == ["added_gflops"]
    assert plot_panels([]) == []


def test_cost_axes_are_logarithmic_with_the_trunk_drawn_and_unmeasurable_heads_counted(tmp_path, monkeypatch):
    import matplotlib.figure

    from registry.reports.report import plot_accuracy_vs_cost

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    rows = [{"head": "colour", "val_accuracy": 0.9, "added_gflops": 2e-6, "added_ms_per_image": 0.004},
            {"head": "shape", "val_accuracy": 0.8, "added_gflops": 3e-3, "added_ms_per_image": 0.0}]
    plot_accuracy_vs_cost(rows, tmp_path / "acc.png", {"gflops_per_image": 1.8, "ms_per_image": 12.0})
    flops, ms = saved[0].axes
    assert flops.get_xscale() == ms.get_xscale() == "log"
    # The trunk's own cost is a vertical line, in the axis' base unit (FLOPs, seconds).
    assert [line.get_xdata()[0] for line in flops.get_lines()] == [pytest.approx(1.8e9)]
    assert [line.get_xdata()[0] for line in ms.get_lines()] == [pytest.approx(12e-3)]
    assert flops.xaxis.get_major_formatter()(2e3) == "2 kFLOP"
    # A head at zero added time cannot sit on a log axis: it is counted, not dropped silently.
    assert "1 head(s) below timing noise" in ms.get_title()
    assert len(ms.collections[0].get_offsets()) == 1 and len(flops.collections[0].get_offsets()) == 2


# -- the report at many heads: summary, attention sections, the full table in files -------------------
@pytest.fixture(scope="module")
def many_heads(tmp_path_factory):
    """16 generated heads (2 fail their gate), released on trunk v1; 2 of them retrained on trunk v2 (stale)."""
    from benchmarks.workspace import build_workspace, head_name
    from registry.jobs.train import train_head_job
    from registry.store.tracking import connect
    from registry.store.trunks import register_trunk
    from registry.store.workspace import Workspace
    from heads.spec import load_head_spec
    from trunk.model import Trunk

    root = tmp_path_factory.mktemp("many") / "ws"
    built = build_workspace(root, 16, mlp_every=5, branch_every=0, fail_every=7, n_images=120, image_size=32,
                            head_epochs=1, progress=False)
    client = connect(root)
    other = register_trunk(client, Trunk("test_resnet", seed=7, data_config={"input_size": [3, 32, 32],
                                                                                  "crop_pct": 1.0}))
    stale = [head_name(3), head_name(11)]
    for name in stale:
        spec = load_head_spec(root / "conf" / "heads" / f"{name}.yaml", {"workspace": str(root)})
        train_head_job(client, spec, workspace=Workspace.at(root), trunk_version=other, batch_size=256,
                       num_workers=0, device="cpu", progress=False, promote=False)
    return {"root": root, "client": client, "built": built, "stale": stale, "other_trunk": other,
            "failing": [head_name(6), head_name(13)]}


def test_report_at_many_heads_puts_attention_first_and_the_full_table_in_files(many_heads):
    import csv

    from benchmarks.workspace import head_name
    from registry.reports.summary import report_lines

    client, root = many_heads["client"], many_heads["root"]
    report = log_report(client, root)
    att = report["attention"]
    s = att["summary"]
    assert (s["heads_in_production"], s["heads_registered"], s["failing"], s["stale"]) == (14, 16, 2, 2)
    assert [d["head"] for d in att["failing"]] == many_heads["failing"]
    assert [d["head"] for d in att["stale"]] == sorted(many_heads["stale"])
    assert s["trunk_version"] == many_heads["built"].trunk_version and s["taps"] == {"pooled": 14}
    assert s["heads_gflops"] == pytest.approx(sum(r["added_gflops"] for r in report["rows"]))
    # MLP heads cost more than linear ones: they lead the costly list.
    assert {r["head"] for r in att["costly"][:3]} == {head_name(i) for i in (4, 9, 14)}
    for d in att["drops"]:  # drops, when a stale retrain scored lower, are its production version's
        assert d["head"] in many_heads["stale"] and d["drop"] > 0

    lines = report_lines(report, limit=5)
    text = "\n".join(lines)
    assert lines[0].startswith(f"release v{s['release_version']}: trunk v{s['trunk_version']}")
    assert "14 heads in production (14 on pooled); 16 registered" in lines[0]
    assert lines[1].startswith("needs attention: 2 failing their gate, 2 stale")
    stale_at = lines.index("stale (latest version trained on another trunk than production's) (2)")
    assert [ln.split()[0] for ln in lines[stale_at + 1:stale_at + 3]] == sorted(many_heads["stale"])
    assert f"on trunk v{many_heads['other_trunk']}" in lines[stale_at + 1]
    costly_at = lines.index("most costly (added GFLOPs per image) (14)")
    assert lines[costly_at + 6] == "  ... and 9 more (full table: see below)"
    # The full table is not printed: at most 5 rows per section, and far fewer lines than heads.
    assert "full=true prints it" in text
    assert len(lines) < 45 and not any(ln.startswith("head ") for ln in lines)
    assert f"trunk v{s['trunk_version']} (production): 16 head versions of 16 heads" in lines
    assert f"trunk v{many_heads['other_trunk']} (-): 2 head versions of 2 heads" in lines
    assert str(report["csv"]) in text and report["run_id"] in text

    # full=true prints every head; the files hold every production head.
    full = report_lines(report, limit=5, full=True)
    assert all(any(ln.startswith(r["head"] + " ") for ln in full) for r in report["rows"])
    with open(report["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["head"] for r in table) == sorted(r["head"] for r in report["rows"])
    assert {r["head"] for r in table if r["stale"] == "True"} == set(many_heads["stale"])
    assert all(r["head"] in report["markdown"].read_text() for r in table)
    summary = report["summary_markdown"].read_text()
    assert all(n in summary for n in many_heads["failing"] + many_heads["stale"])
    assert {f.path for f in client.list_artifacts(report["run_id"])} >= {"production_table.csv", "summary.md",
                                                                         "leaderboard.json"}
    metrics = client.get_run(report["run_id"]).data.metrics
    assert (metrics["heads"], metrics["failing_heads"], metrics["stale_heads"]) == (14, 2, 2)
