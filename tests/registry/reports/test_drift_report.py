"""The drift report: a table with only what it should hold, PNGs without empty panels, a history plot."""

from __future__ import annotations

import torch

from heads.monitor.drift import HeadDrift, assess
from heads.monitor.reference import HeadReference
from heads.monitor.stats import FeatureStats, PredictionStats
from registry.reports.drift import drift_markdown, head_drift_figure, history_figure, plot_history, write_drift_report

CLASSES = ["red", "green", "blue"]


def _preds(seed: int, n: int = 300) -> PredictionStats:
    g = torch.Generator().manual_seed(seed)
    stats = PredictionStats(CLASSES)
    stats.update_logits(torch.randn(n, 3, generator=g) * 2)
    return stats


def _drifts() -> tuple[HeadDrift, HeadDrift]:
    g = torch.Generator().manual_seed(0)
    with_features = HeadReference(_preds(1), FeatureStats.from_features(torch.randn(400, 8, generator=g)), "pooled")
    shifted = assess(with_features, _preds(2), FeatureStats.from_features(torch.randn(300, 8, generator=g) + 1.5),
                     head="colour")
    no_features = assess(HeadReference(_preds(3), None, "layer3"), _preds(4), None, head="shape")
    return shifted, no_features


def _empty_axes(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes
            if ax.axison and not (ax.patches or ax.lines or ax.collections or ax.images)]


def test_markdown_has_one_row_per_head_and_nothing_else():
    shifted, no_features = _drifts()
    shifted.reason += " | odd"  # a pipe in a reason must not split the row
    md = drift_markdown([no_features, shifted], title="Drift: job 7", context={"release": "4"})
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| colour", "| shape"]  # drift first, then ok
    assert all(r.count(" | ") == 10 for r in rows)
    assert "DRIFT" in rows[0] and "\\| odd" in rows[0]
    assert "- release: 4" in md and "2 heads: 1 drift, 0 watch, 1 ok." in md
    # A head without feature stats shows '-' there, never None / nan.
    cells = rows[1].split(" | ")
    assert cells[5] == "-" and cells[6] == "-" and cells[7] == "-"
    assert "None" not in md and "nan" not in md.lower()


def test_head_png_has_no_empty_panel_with_and_without_feature_stats(tmp_path):
    shifted, no_features = _drifts()
    assert len(head_drift_figure(shifted).axes) == 3
    fig = head_drift_figure(no_features)
    assert len(fig.axes) == 2 and _empty_axes(fig) == []
    assert _empty_axes(head_drift_figure(shifted)) == []
    # A run that recorded nothing for the head: the reference panels still have data.
    nothing = assess(HeadReference(_preds(5), None, "pooled"), None, None, head="quiet")
    fig = head_drift_figure(nothing)
    assert len(fig.axes) == 2 and _empty_axes(fig) == []
    paths = write_drift_report([shifted, no_features], tmp_path / "report")
    assert sorted(paths) == ["colour", "drift.md", "shape"]
    assert paths["colour"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_plot_draws_figures_and_thresholds_per_job(tmp_path):
    shifted, no_features = _drifts()
    points = [{**shifted.to_dict(), "time": 1_700_000_000 + 86400 * i, "job": f"job{i}"} for i in range(3)]
    fig = history_figure(points, "colour")
    assert len(fig.axes) == 2 and _empty_axes(fig) == []
    psi_ax, p_ax = fig.axes
    assert [round(v, 6) for v in psi_ax.lines[0].get_ydata()] == [round(shifted.label_psi, 6)] * 3
    assert {float(line.get_ydata()[0]) for line in p_ax.lines[1:]} == {shifted.alpha_watch, shifted.alpha_drift}
    only_labels = [{**no_features.to_dict(), "time": 1_700_000_000 + i} for i in range(2)]
    assert len(history_figure(only_labels, "shape").axes) == 1  # no feature p-values: no empty p panel
    assert plot_history(points, "colour", tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
