"""The accuracy/cost trade-off of one head across taps: Pareto front, choice, plot, table.

A point is one trained variant (usually one tap): its validation accuracy and what it
adds to the shared trunk (usually GFLOPs per image). Teams want the cheapest variant that
is nearly as good as the best, not the best at any price; ``cheapest_within`` names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Point:
    """One variant: ``label`` (e.g. the tap), ``accuracy``, ``cost``, anything else in ``extra``."""

    label: str
    accuracy: float
    cost: float
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def _order(p: Point) -> tuple[float, float, str]:
    return (p.cost, -p.accuracy, p.label)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both accuracy (higher) and cost (lower), by cost.

    Of points with equal cost only the most accurate can be on the front; exact duplicates
    keep the first label in sorted order.
    """
    front: list[Point] = []
    best = float("-inf")
    for p in sorted(points, key=_order):
        if p.accuracy > best:
            front.append(p)
            best = p.accuracy
    return front


def cheapest_within(points: Sequence[Point], tolerance: float) -> Point:
    """The lowest-cost point whose accuracy is at least the best accuracy minus ``tolerance``."""
    if not points:
        raise ValueError("no points to choose from")
    if tolerance < 0:
        raise ValueError(f"tolerance must be at least 0, got {tolerance}")
    best = max(p.accuracy for p in points)
    return min((p for p in points if p.accuracy >= best - tolerance), key=_order)


def plot_tradeoff(points: Sequence[Point], path: str | Path, *, title: str,
                  cost_label: str = "added GFLOPs per image", chosen: Point | None = None) -> Path:
    """Accuracy against cost, every point labelled, the Pareto front as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p.cost for p in points], [p.accuracy for p in points], color="tab:blue", zorder=3)
    ax.step([p.cost for p in front], [p.accuracy for p in front], where="post", color="tab:orange",
            label="Pareto front", zorder=2)
    for p in points:
        ax.annotate(p.label, (p.cost, p.accuracy), textcoords="offset points", xytext=(5, 5), fontsize=9)
    if chosen is not None:
        ax.scatter([chosen.cost], [chosen.accuracy], s=200, facecolors="none", edgecolors="tab:red",
                   linewidths=2, label=f"chosen: {chosen.label}", zorder=4)
    costs = [p.cost for p in points]
    if costs and min(costs) > 0 and max(costs) / min(costs) > 100:
        ax.set_xscale("log")
    ax.set_xlabel(cost_label)
    ax.set_ylabel("val accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.1)  # room for the labels of the extreme points
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_tradeoff(points: Sequence[Point], chosen: Point, tolerance: float) -> str:
    """An aligned table (by cost) and a line naming the choice."""
    on_front = {p.label for p in pareto_front(points)}
    rows = [("variant", "val_accuracy", "cost", "pareto", "")]
    for p in sorted(points, key=_order):
        rows.append((p.label, f"{p.accuracy:.4f}", f"{p.cost:.4g}", "yes" if p.label in on_front else "no",
                     "<- chosen" if p.label == chosen.label else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    best = max(points, key=lambda p: (p.accuracy, -p.cost))
    lines.append(f"cheapest within {tolerance:.3f} of the best ({best.accuracy:.4f} at {best.label}): "
                 f"{chosen.label} ({chosen.accuracy:.4f}, cost {chosen.cost:.4g})")
    return "\n".join(lines)
