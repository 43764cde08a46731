"""The production leaderboard: every head of release@production with accuracy and cost.

``log_report`` writes the table (Markdown) and a PNG of accuracy against added cost into
``<workspace>/reports/<time>/`` and logs both to the MLflow experiment ``reports``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from registry.heads import get_head_version
from registry.releases import PRODUCTION, get_release
from registry.tracking import experiment_id
from registry.trunks import metrics_batch

COLUMNS = ("head", "version", "owner", "tap", "val_accuracy", "added_gflops", "added_ms_per_image", "params")
_FORMATS = {"val_accuracy": "{:.4f}", "added_gflops": "{:.4g}", "added_ms_per_image": "{:.4f}", "params": "{:,.0f}"}


def production_table(client: MlflowClient, alias: str = PRODUCTION) -> list[dict[str, Any]]:
    """One row per head of the release behind ``alias``, sorted by head name.

    Returns:
        Rows with keys ``COLUMNS`` (metrics are floats, None when not logged);
        empty when there is no such release or it has no heads.
    """
    release = get_release(client, alias)
    if release is None:
        return []
    rows = []
    for name, version in sorted(release.heads.items()):
        mv = get_head_version(client, name, version)
        metrics = client.get_run(mv.run_id).data.metrics
        rows.append({"head": name, "version": int(version), "owner": mv.tags.get("owner", ""),
                     "tap": mv.tags.get("tap", ""),
                     **{m: metrics.get(m) for m in ("val_accuracy", "added_gflops", "added_ms_per_image", "params")}})
    return rows


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    fmt = _FORMATS.get(column)
    return fmt.format(value) if fmt else str(value)


def _cells(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [[_cell(c, row.get(c)) for c in COLUMNS] for row in rows]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """An aligned plain-text table (numbers right-aligned), one line per head."""
    if not rows:
        return "(no heads in production)"
    body = _cells(rows)
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(COLUMNS)]
    numeric = [c in _FORMATS or c == "version" for c in COLUMNS]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(s.rjust(w) if num else s.ljust(w) for s, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(r) for r in body)])


def format_markdown(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """The same table as Markdown (MLflow's UI renders ``.md`` artifacts)."""
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(COLUMNS) + " |",
              "| " + " | ".join("---:" if c in _FORMATS or c == "version" else "---" for c in COLUMNS) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in _cells(rows)]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_cost(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Scatter val_accuracy against added GFLOPs and added ms per image, one point per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, cost, label in ((axes[0], "added_gflops", "added GFLOPs per image"),
                            (axes[1], "added_ms_per_image", "added ms per image")):
        points = [(r[cost], r["val_accuracy"], r["head"]) for r in rows
                  if r.get(cost) is not None and r.get("val_accuracy") is not None]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points])
            for x, y, name in points:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val accuracy")
    fig.suptitle("production heads: accuracy vs added cost" if rows else "no heads in production")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_report(client: MlflowClient, workspace: str | Path, alias: str = PRODUCTION) -> dict[str, Any]:
    """Build the production leaderboard and log it to the experiment ``reports``.

    Args:
        client: from :func:`registry.tracking.connect`.
        workspace: the local copies go to ``<workspace>/reports/<time>/``.
        alias: which release to report on.

    Returns:
        ``{"rows", "table" (text), "markdown" (path), "png" (path), "run_id", "release"}``.
    """
    release = get_release(client, alias)
    rows = production_table(client, alias)
    out = Path(workspace) / "reports" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while out.exists():  # two reports in one second must not overwrite each other
        suffix += 1
        out = out.with_name(f"{out.name.split('+')[0]}+{suffix}")
    out.mkdir(parents=True)
    title = f"release v{release.version} ({alias}), trunk v{release.trunk_version}" if release else f"no {alias} release"
    markdown = out / "production_table.md"
    markdown.write_text(format_markdown(rows, title))
    png = plot_accuracy_vs_cost(rows, out / "accuracy_vs_cost.png")
    tags = {"alias": alias}
    if release:
        tags.update({"release_version": str(release.version), "trunk_version": str(release.trunk_version)})
    run = client.create_run(experiment_id(client, "reports"), run_name=f"report-{alias}", tags=tags)
    client.log_batch(run.info.run_id, metrics=metrics_batch({"heads": len(rows)}))
    client.log_artifact(run.info.run_id, str(markdown))
    client.log_artifact(run.info.run_id, str(png))
    client.set_terminated(run.info.run_id, "FINISHED")
    return {"rows": rows, "table": format_table(rows), "markdown": markdown, "png": png,
            "run_id": run.info.run_id, "release": release}
