"""Trade-off utilities: the Pareto front, the cheapest variant within a tolerance, plot, table."""

from __future__ import annotations

import pytest
from PIL import Image

from heads.checks.tradeoff import Point, cheapest_within, format_tradeoff, pareto_front, plot_tradeoff

POINTS = [
    Point("pooled", 0.80, 0.00001),
    Point("layer3", 0.93, 0.002),
    Point("layer2", 0.95, 0.004),
    Point("layer1", 0.945, 0.008),   # dearer and worse than layer2: dominated
    Point("stem", 0.95, 0.016),      # as good as layer2 but dearer: dominated
]


def test_front_drops_dominated_points_and_is_sorted_by_cost():
    assert [p.label for p in pareto_front(POINTS)] == ["pooled", "layer3", "layer2"]


def test_equal_cost_keeps_the_more_accurate_and_duplicates_are_deterministic():
    pts = [Point("b", 0.9, 1.0), Point("a", 0.9, 1.0), Point("c", 0.8, 1.0)]
    assert [p.label for p in pareto_front(pts)] == ["a"]


def test_cheapest_within_tolerance():
    assert cheapest_within(POINTS, 0.0).label == "layer2"
    assert cheapest_within(POINTS, 0.02).label == "layer3"
    assert cheapest_within(POINTS, 0.2).label == "pooled"
    with pytest.raises(ValueError, match="no points"):
        cheapest_within([], 0.01)
    with pytest.raises(ValueError, match="tolerance must be at least 0"):
        cheapest_within(POINTS, -0.1)


def test_plot_and_table(tmp_path):
    chosen = cheapest_within(POINTS, 0.02)
    png = plot_tradeoff(POINTS, tmp_path / "t.png", title="count", chosen=chosen)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 300
    table = format_tradeoff(POINTS, chosen, 0.02)
    lines = table.splitlines()
    assert lines[0].split() == ["variant", "val_accuracy", "cost", "pareto"]
    assert [line.split()[0] for line in lines[1:6]] == ["pooled", "layer3", "layer2", "layer1", "stem"]
    assert "layer3" in lines[2] and "<- chosen" in lines[2] and "yes" in lines[2]
    assert "no" in lines[4].split()
    assert lines[-1].startswith("cheapest within 0.020 of the best (0.9500 at layer2): layer3")
