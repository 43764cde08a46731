"""The production leaderboard: rows from MLflow, an aligned table, a PNG, logged to `reports`."""

from __future__ import annotations

import pytest
from PIL import Image

from registry.heads import register_head
from registry.releases import bootstrap_release, promote_head
from registry.report import COLUMNS, format_table, log_report, plot_accuracy_vs_cost, production_table
from registry.trunks import register_trunk


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
        assert set(row) == set(COLUMNS)
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
    assert files == {"production_table.md", "accuracy_vs_cost.png"}
    md = open(client.download_artifacts(out["run_id"], "production_table.md", str(tmp_path))).read()
    assert "| colour | 1 | team-vision | pooled | 0.9300 |" in md
    second = log_report(client, workspace)  # a second report in the same second keeps the first
    assert second["png"] != out["png"] and out["png"].is_file()
