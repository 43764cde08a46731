"""The drift report of a bulk run, and a head's drift history across runs: rendering only.

Input is what :func:`heads.monitor.drift.assess` returns (:class:`~heads.monitor.drift.HeadDrift`,
or its ``to_dict()`` form read back from a file or an MLflow run). Output:

- :func:`drift_markdown`: one table, one row per head (verdict, reason, label PSI / JS,
  feature p-value / MMD^2 / mean shift, low-confidence share reference -> run, counts);
- :func:`head_drift_figure` / :func:`plot_head_drift`: a PNG per head, reference vs this
  run: predicted-label shares side by side, the top-score histogram, and, when the head
  has feature stats, its most shifted feature dimensions (in reference std units). A panel
  whose data is missing is left out, never drawn empty;
- :func:`history_figure` / :func:`plot_history`: a head's label PSI and feature p-value per
  job over time, with the watch / drift thresholds as lines (for ``tools.monitor``);
- :func:`write_drift_report`: the Markdown plus a PNG per head into a folder.

No MLflow calls here: the job that owns the run logs the files (``registry.jobs``).
Figures use matplotlib's ``Figure`` and Agg canvas directly, not pyplot: no global backend
switch, no shared state (as :func:`heads.training.evaluate.plot_confusion`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from heads.monitor.drift import HeadDrift

COLUMNS = ("head", "tap", "verdict", "label PSI", "label JS", "feature p", "MMD²", "mean shift (std)",
           "low confidence", "predictions (ref / run)", "reason")
MAX_BARS = 30


def _as_drift(d: HeadDrift | Mapping[str, Any]) -> HeadDrift:
    return d if isinstance(d, HeadDrift) else HeadDrift.from_dict(d)


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _cell(text: str) -> str:
    # A reason may hold any character; a pipe or newline would break the table.
    return str(text).replace("|", "\\|").replace("\n", " ")


def drift_markdown(drifts: Sequence[HeadDrift | Mapping[str, Any]], title: str = "Drift report",
                   context: Mapping[str, str] | None = None) -> str:
    """The run's drift table as Markdown.

    Args:
        drifts: one assessment per head (any order; rows are sorted drift, watch, ok, then by name).
        title: the page heading.
        context: ``{label: value}`` lines above the table (release, job, time, ...).
    """
    rows = sorted((_as_drift(d) for d in drifts), key=lambda d: ({"drift": 0, "watch": 1}.get(d.verdict, 2), d.head))
    lines = [f"# {_cell(title)}", ""]
    for key, value in (context or {}).items():
        lines.append(f"- {_cell(key)}: {_cell(value)}")
    if context:
        lines.append("")
    counts = {v: sum(d.verdict == v for d in rows) for v in ("drift", "watch", "ok")}
    lines += [f"{len(rows)} heads: {counts['drift']} drift, {counts['watch']} watch, {counts['ok']} ok.", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for d in rows:
        low = "-" if d.low_confidence_reference is None and d.low_confidence_run is None else \
            f"{_share(d.low_confidence_reference)} -> {_share(d.low_confidence_run)}"
        cells = [d.head, d.tap, d.verdict.upper() if d.verdict != "ok" else "ok", _num(d.label_psi), _num(d.label_js),
                 _num(d.feature_p, "{:.2g}"), _num(d.mmd2, "{:.2g}"), _num(d.mean_shift_rms, "{:.2f}"), low,
                 f"{d.n_reference} / {d.n_run}", d.reason]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _bars(ax: Any, labels: Sequence[str], ref: Sequence[float], run: Sequence[float], title: str) -> None:
    import numpy as np

    x = np.arange(len(labels))
    width = 0.4 if ref and run else 0.8
    if ref:
        ax.bar(x - (width / 2 if run else 0), ref, width, label="reference (validation)", color="#8c8c8c")
    if run:
        ax.bar(x + (width / 2 if ref else 0), run, width, label="this run", color="#1f77b4")
    ax.set_xticks(x, labels=list(labels), rotation=45 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center")
    ax.set_ylabel("share of predictions")
    ax.set_title(title)
    ax.legend(fontsize=8)


def head_drift_figure(drift: HeadDrift | Mapping[str, Any]) -> Any:
    """A matplotlib ``Figure`` for one head: label shares, score histogram, top shifted dims (panels with data only)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = _as_drift(drift)
    panels: list[str] = []
    if d.reference_labels or d.run_labels:
        panels.append("labels")
    if d.reference_scores or d.run_scores:
        panels.append("scores")
    if d.top_shifted:
        panels.append("features")
    fig = Figure(figsize=(4.5 * max(len(panels), 1), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    if not panels:
        # Nothing recorded at all: one axis with the reason as text, so the PNG is not blank.
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, f"{d.head}: {d.reason}", ha="center", va="center", wrap=True)
        ax.set_axis_off()
        return fig
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        if panel == "labels":
            classes = d.classes[:MAX_BARS]
            _bars(ax, classes, d.reference_labels[:MAX_BARS], d.run_labels[:MAX_BARS],
                  "predicted labels" + (f" (PSI {d.label_psi:.3f})" if d.label_psi is not None else ""))
        elif panel == "scores":
            bins = len(d.reference_scores or d.run_scores)
            edges = [i / bins for i in range(bins)]
            if d.reference_scores:
                ax.step(edges + [1.0], list(d.reference_scores) + [d.reference_scores[-1]], where="post",
                        color="#8c8c8c", label="reference (validation)")
            if d.run_scores:
                ax.step(edges + [1.0], list(d.run_scores) + [d.run_scores[-1]], where="post", color="#1f77b4",
                        label="this run")
            ax.axvline(d.low_confidence_below, color="#d62728", linestyle=":", label="low-confidence threshold")
            ax.set_xlim(0.0, 1.0)
            ax.set_xlabel("top score (max softmax probability)")
            ax.set_ylabel("share of predictions")
            ax.set_title("scores")
            ax.legend(fontsize=8)
        else:
            dims = [f"dim {int(i)}" for i, _ in d.top_shifted]
            ax.barh(dims[::-1], [z for _, z in d.top_shifted][::-1], color="#ff7f0e")
            ax.axvline(0.0, color="black", linewidth=0.8)
            ax.set_xlabel("mean shift (reference std)")
            title = f"tap '{d.tap}' most shifted dims"
            if d.feature_p is not None:
                title += f"\nMMD p={d.feature_p:.2g}"
            ax.set_title(title)
    fig.suptitle(f"{d.head}: {d.verdict}")
    fig.tight_layout()
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_head_drift(drift: HeadDrift | Mapping[str, Any], path: str | Path) -> Path:
    """Write :func:`head_drift_figure` as a PNG; returns ``path``."""
    return _save(head_drift_figure(drift), path)


def history_figure(points: Sequence[Mapping[str, Any]], head: str) -> Any:
    """A head's drift across jobs: label PSI and feature p-value per job, thresholds as lines.

    Args:
        points: one per job, oldest first or not (sorted by ``time``): a ``HeadDrift.to_dict()``
            plus ``time`` (seconds since the epoch) and optionally ``job``.
        head: the head's name, for the title.
    """
    from datetime import datetime, timezone

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = sorted(points, key=lambda p: float(p["time"]))
    when = [datetime.fromtimestamp(float(p["time"]), tz=timezone.utc) for p in pts]
    panels = []
    if any(p.get("label_psi") is not None for p in pts):
        panels.append("label_psi")
    if any(p.get("feature_p") is not None for p in pts):
        panels.append("feature_p")
    fig = Figure(figsize=(8.0, 3.0 * max(len(panels), 1)), dpi=100)
    FigureCanvasAgg(fig)
    if not panels:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, f"{head}: no judged figures in {len(pts)} jobs", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    colour = {"ok": "#2ca02c", "watch": "#ff7f0e", "drift": "#d62728"}
    for ax, key in zip(axes, panels):
        xs = [w for w, p in zip(when, pts) if p.get(key) is not None]
        sel = [p for p in pts if p.get(key) is not None]
        ys = [float(p[key]) for p in sel]
        ax.plot(xs, ys, color="#1f77b4", marker="o", linewidth=1)
        ax.scatter(xs, ys, c=[colour.get(p.get("verdict", "ok"), "#1f77b4") for p in sel], zorder=3)
        last = sel[-1]
        if key == "label_psi":
            ax.axhline(float(last.get("label_psi_watch", 0.1)), color="#ff7f0e", linestyle="--", label="watch")
            ax.axhline(float(last.get("label_psi_drift", 0.25)), color="#d62728", linestyle="--", label="drift")
            ax.set_ylabel("label PSI")
        else:
            ax.set_yscale("log")
            ax.axhline(float(last.get("alpha_watch", 0.01)), color="#ff7f0e", linestyle="--", label="watch α")
            ax.axhline(float(last.get("alpha_drift", 0.001)), color="#d62728", linestyle="--", label="drift α")
            ax.set_ylabel("feature test p-value")
        ax.legend(fontsize=8)
    axes[0].set_title(f"{head}: drift across {len(pts)} jobs")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def plot_history(points: Sequence[Mapping[str, Any]], head: str, path: str | Path) -> Path:
    """Write :func:`history_figure` as a PNG; returns ``path``."""
    return _save(history_figure(points, head), path)


def write_drift_report(drifts: Sequence[HeadDrift | Mapping[str, Any]], folder: str | Path,
                       title: str = "Drift report", context: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write ``drift.md`` and ``drift-<head>.png`` per head into ``folder``.

    Returns:
        ``{"drift.md": path, "<head>": png path, ...}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [_as_drift(d) for d in drifts]
    md = folder / "drift.md"
    md.write_text(drift_markdown(rows, title, context), encoding="utf-8")
    out: dict[str, Path] = {"drift.md": md}
    for d in rows:
        out[d.head] = plot_head_drift(d, folder / f"drift-{d.head}.png")
    return out
