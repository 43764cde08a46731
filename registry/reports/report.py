"""The production leaderboard and the heads' trunk dependencies.

The leaderboard is every head of release@production with accuracy and cost. The
dependency view is every registered ``head.<name>``: its production version, its latest
version and the trunk version that one was trained on, flagged ``STALE`` when that
trunk's ``trunk_id`` is not production's (the head was retrained for another trunk, or
production moved to a trunk the head has no version for); plus, per trunk version, the
head versions trained on it.

``log_report`` writes the table (Markdown, and CSV with each head's standing), a summary with
the heads that need attention first (``summary.md``: failing their gate, stale, most costly,
largest accuracy drops; :func:`attention`), a PNG of accuracy against added cost (log cost
axes, the trunk's own cost drawn as a line) and the dependencies (``dependencies.md``) into
``<workspace>/reports/<time>/`` and logs them all to the MLflow experiment ``reports``,
with the table also as an MLflow table (``leaderboard.json``, sortable in the UI). It first marks what killed promoters left
behind (:func:`registry.store.releases.reap_leftovers`: release runs stuck RUNNING set KILLED,
never-served release versions tagged ``orphan=true``), so nothing dead looks live.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from heads.training.cost import format_ms
from registry.reports.summary import attention_lines, summary_lines
from registry.store.heads import head_model_versions, head_versions
from registry.store.releases import PRODUCTION, ReleaseError, get_release, reap_leftovers
from registry.store.runs import tracked_run
from registry.store.tracking import runs_metrics
from registry.store.trunks import trunk_alias_versions, trunk_metrics, trunk_versions

log = logging.getLogger(__name__)
# A report does not queue long behind a promotion; the next report or promotion marks leftovers.
LEFTOVERS_WAIT_S = 10.0

# The leaderboard as an MLflow table artifact (``MlflowClient.log_table``) of each report run.
LEADERBOARD_TABLE = "leaderboard.json"
COLUMNS = ("head", "version", "owner", "tap", "val_accuracy", "added_gflops", "added_ms_per_image", "params")
_FORMATS = {"val_accuracy": "{:.4f}", "added_gflops": "{:.4g}", "added_ms_per_image": "{:.4f}", "params": "{:,.0f}"}


def production_table(client: MlflowClient, alias: str = PRODUCTION) -> list[dict[str, Any]]:
    """One row per head of the release behind ``alias``, sorted by head name.

    Returns:
        Rows with keys ``COLUMNS`` and ``added_ms_per_image_spread`` (metrics are floats,
        None when not logged); empty when there is no such release or it has no heads.
    """
    release = get_release(client, alias)
    if release is None:
        return []
    rows = []
    versions = head_versions(client, release.heads)  # one search per 100 heads, and one for their runs
    metrics_of = runs_metrics(client, [mv.run_id for mv in versions.values()])
    for name, version in sorted(release.heads.items()):
        mv = versions[name]
        metrics = metrics_of.get(mv.run_id, {})
        rows.append({"head": name, "version": int(version), "owner": mv.tags.get("owner", ""),
                     "tap": mv.tags.get("tap", ""),
                     **{m: metrics.get(m) for m in ("val_accuracy", "added_gflops", "added_ms_per_image", "params",
                                                    "added_ms_per_image_spread")}})
    return rows


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    fmt = _FORMATS.get(column)
    return fmt.format(value) if fmt else str(value)


def _cells(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    # A time comes with its spread, or reads "below timing noise" when it is not above it.
    return [[format_ms(row.get(c), row.get("added_ms_per_image_spread")) if c == "added_ms_per_image"
             else _cell(c, row.get(c)) for c in COLUMNS] for row in rows]


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


# Each cost panel in base units, so an engineering formatter reads "2.1 kFLOP", "350 ns", "1.8 GFLOP".
_PANELS = (("added_gflops", "added compute per image", "FLOP", 1e9, "gflops_per_image"),
           ("added_ms_per_image", "added time per image", "s", 1e-3, "ms_per_image"))
# Beyond this many heads the points are not labelled (300 labels are a smudge); the table names them.
MAX_LABELLED_POINTS = 30


def plot_panels(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, list[tuple[float, float, str]]]]:
    """The scatter panels that have points: ``(cost metric, axis label, [(cost, accuracy, head)])``.

    A cost no head has logged gets no panel (an empty one reads as a finding).
    """
    out = []
    for cost, label, *_ in _PANELS:
        points = [(r[cost], r["val_accuracy"], r["head"]) for r in rows
                  if r.get(cost) is not None and r.get("val_accuracy") is not None]
        if points:
            out.append((cost, label, points))
    return out


def plot_accuracy_vs_cost(rows: Sequence[dict[str, Any]], path: str | Path,
                          trunk_cost: Mapping[str, float] | None = None) -> Path:
    """Scatter val_accuracy against added compute and added time per image, one point per head.

    The cost axes are logarithmic with engineering tick labels (``2 kFLOP``, ``350 ns``):
    heads cost thousands of times less than the trunk, and a linear axis puts them all
    on top of each other. ``trunk_cost`` (the trunk version's ``gflops_per_image`` and
    ``ms_per_image``, when it recorded them) is drawn as a dashed line on each panel, so
    a head's added cost reads against the cost every head shares. A head whose added time
    is not above zero (below timing noise) cannot sit on a log axis: it is counted in the
    panel's title instead. Only panels with points are drawn; with none, the figure holds
    its title alone.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shown = plot_panels(rows)
    panels = {p[0]: p[1:] for p in _PANELS}
    trunk_cost = dict(trunk_cost or {})
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4.2), sharey=True, squeeze=False)
        for ax, (cost, label, points) in zip(axes[0], shown):
            _, unit, scale, trunk_key = panels[cost]
            drawn = [(x * scale, y, name) for x, y, name in points if x > 0]
            hidden = len(points) - len(drawn)
            # Hundreds of points: smaller and translucent, so dense clusters read as dense, not as one blob.
            many = len(drawn) > MAX_LABELLED_POINTS
            ax.scatter([p[0] for p in drawn], [p[1] for p in drawn], s=8 if many else 18, alpha=0.4 if many else 1.0,
                       linewidths=0)
            if many:
                ax.set_title(f"{len(drawn)} heads (unlabelled; the table names them)", fontsize=8)
            if len(drawn) <= MAX_LABELLED_POINTS:
                for x, y, name in drawn:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if trunk_cost.get(trunk_key):
                shared = trunk_cost[trunk_key] * scale
                ax.axvline(shared, color="tab:red", linestyle="--", linewidth=1)
                ax.annotate(f"trunk: {EngFormatter(unit=unit, places=1)(shared)}", (shared, 0.02),
                            xycoords=("data", "axes fraction"), xytext=(-4, 0), textcoords="offset points",
                            ha="right", fontsize=8, color="tab:red")
            if drawn or trunk_cost.get(trunk_key):
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(EngFormatter(unit=unit, places=0))
            ax.set_xlabel(f"{label} (log scale)")
            if hidden:
                ax.set_title(f"{hidden} head(s) below timing noise, not drawn", fontsize=8)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("val accuracy")
    else:
        fig = plt.figure(figsize=(5, 2))
    fig.suptitle("production heads: accuracy vs added cost" if rows else "no heads in production")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trunk_cost(client: MlflowClient, version: int) -> dict[str, float]:
    """The cost ``trunk`` v<version> recorded for itself (``gflops_per_image``, ``ms_per_image``); {} when none."""
    metrics = trunk_metrics(client, version)
    return {k: metrics[k] for k in ("gflops_per_image", "ms_per_image") if metrics.get(k) is not None}


def leaderboard_frame(rows: Sequence[dict[str, Any]]):
    """The leaderboard as a pandas DataFrame (columns ``COLUMNS`` plus the time's spread), for ``log_table``."""
    import pandas as pd

    return pd.DataFrame([{c: row.get(c) for c in (*COLUMNS, "added_ms_per_image_spread")} for row in rows],
                        columns=[*COLUMNS, "added_ms_per_image_spread"])


DEPENDENCY_COLUMNS = ("head", "production", "latest", "latest on trunk", "stale")


def _trunk_versions_by_id(client: MlflowClient) -> dict[str, int]:
    """``{trunk_id: lowest trunk version}``, for head versions registered without a trunk_version tag."""
    out: dict[str, int] = {}
    for mv in trunk_versions(client):
        trunk_id = mv.tags.get("trunk_id")
        if trunk_id and (trunk_id not in out or int(mv.version) < out[trunk_id]):
            out[trunk_id] = int(mv.version)
    return out


def _trunk_of(mv: Any, by_id: Mapping[str, int]) -> int | None:
    tag = mv.tags.get("trunk_version")
    if tag is not None and str(tag).isdigit():
        return int(tag)
    return by_id.get(mv.tags.get("trunk_id", ""))


def trunk_aliases(client: MlflowClient) -> dict[int, list[str]]:
    """``{trunk version: its aliases on the registered model trunk}`` (e.g. ``candidate``); {} when none."""
    out: dict[int, list[str]] = {}
    for alias, version in sorted(trunk_alias_versions(client).items()):
        out.setdefault(version, []).append(alias)
    return dict(sorted(out.items()))


def head_dependencies(client: MlflowClient) -> list[dict[str, Any]]:
    """One row per registered ``head.<name>``: what production serves, what is newest, and on which trunk.

    Returns:
        Rows sorted by head name, with keys ``head``, ``production_version`` (the
        version in release@production, None when not in it), ``latest_version`` (None
        when the model has no versions), ``latest_trunk_version`` (the latest version's
        tag ``trunk_version``), ``latest_trunk_id``, ``production_trunk_version`` (None
        without a production release), ``stale`` (the latest version's trunk_id is not
        production's; False when there is no production), ``latest_gate`` (its tag
        ``gate``: ``passed``/``failed``, None when untagged), ``latest_run_id`` and ``trunk_versions``
        (``{trunk version: [head versions trained on it]}``, ascending).
    """
    release = get_release(client, PRODUCTION)
    by_id = _trunk_versions_by_id(client)
    rows = []
    for name, versions in head_model_versions(client).items():
        latest = versions[-1] if versions else None
        by_trunk: dict[int, list[int]] = {}
        for mv in versions:
            trunk_version = _trunk_of(mv, by_id)
            if trunk_version is not None:
                by_trunk.setdefault(trunk_version, []).append(int(mv.version))
        latest_trunk_id = latest.tags.get("trunk_id") if latest is not None else None
        rows.append({
            "head": name,
            "production_version": release.heads.get(name) if release else None,
            "latest_version": int(latest.version) if latest is not None else None,
            "latest_trunk_version": _trunk_of(latest, by_id) if latest is not None else None,
            "latest_trunk_id": latest_trunk_id,
            "production_trunk_version": release.trunk_version if release else None,
            "stale": bool(release is not None and latest is not None and latest_trunk_id != release.trunk_id),
            "latest_gate": latest.tags.get("gate") if latest is not None else None,
            "latest_run_id": latest.run_id if latest is not None else None,
            "trunk_versions": dict(sorted(by_trunk.items())),
        })
    return rows


def _dependents(rows: Sequence[dict[str, Any]], trunks: Sequence[int] = ()) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {int(t): [] for t in trunks}
    for row in sorted(rows, key=lambda r: r["head"]):
        for trunk_version, versions in row["trunk_versions"].items():
            out.setdefault(int(trunk_version), []).extend(f"{row['head']} v{v}" for v in versions)
    return dict(sorted(out.items()))


def trunk_dependents(client: MlflowClient) -> dict[int, list[str]]:
    """For each ``trunk`` version, the head versions trained on it.

    Returns:
        ``{trunk version: ["colour v1", "shape v2", ...]}`` ascending, heads by name then
        version (from each head version's tag ``trunk_version``); every registered trunk
        version is a key, with an empty list when no head was trained on it.
    """
    trunks = [int(mv.version) for mv in trunk_versions(client)]
    return _dependents(head_dependencies(client), trunks)


def _version(value: Any) -> str:
    return "-" if value is None else f"v{value}"


def _stale_flag(row: Mapping[str, Any], production_trunk: int | None) -> str:
    if not row.get("stale"):
        return "ok"
    return f"STALE: latest on trunk {_version(row.get('latest_trunk_version'))}, production trunk " \
           f"{_version(production_trunk)}"


def format_dependencies(rows: Sequence[dict[str, Any]], production_trunk: int | None,
                        aliases: Mapping[int, Sequence[str]] | None = None) -> str:
    """The heads' trunk dependencies as plain text: a table, then the heads by trunk version.

    Args:
        rows: from :func:`head_dependencies`.
        production_trunk: the trunk version of release@production (None: no production).
        aliases: ``{trunk version: aliases}`` from :func:`trunk_aliases`, to label
            trunks such as ``candidate``.

    Returns:
        A table ``head | production | latest | latest on trunk | stale`` (stale reads
        ``STALE: latest on trunk vX, production trunk vY`` or ``ok``) and a section
        ``heads by trunk version`` with one line per trunk that has heads, serves
        production or carries an alias: ``trunk v1 (production): colour v1, shape v2``.
    """
    by_trunk = {int(k): list(v) for k, v in (aliases or {}).items()}
    if rows:
        body = [[row["head"], _version(row.get("production_version")), _version(row.get("latest_version")),
                 _version(row.get("latest_trunk_version")), _stale_flag(row, production_trunk)] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(DEPENDENCY_COLUMNS)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(s.ljust(w) for s, w in zip(cells, widths)).rstrip()

        lines = [line(DEPENDENCY_COLUMNS), line(["-" * w for w in widths]), *(line(r) for r in body)]
    else:
        lines = ["(no heads registered)"]
    trunks = [t for t in (production_trunk,) if t is not None] + list(by_trunk)
    lines += ["", "heads by trunk version"]
    for trunk_version, heads in _dependents(rows, trunks).items():
        labels = ([PRODUCTION] if trunk_version == production_trunk else []) + \
            [a for a in by_trunk.get(trunk_version, []) if a != PRODUCTION or trunk_version != production_trunk]
        lines.append(f"trunk v{trunk_version} ({', '.join(labels) or '-'}): {', '.join(heads) or '(no heads)'}")
    return "\n".join(lines)


# -- the report at hundreds of heads: a summary, the heads that need attention, the full table in files ----
FULL_TABLE_CSV = "production_table.csv"
SUMMARY_MD = "summary.md"
# Columns of the full table file beyond the leaderboard's: where each head stands.
FULL_COLUMNS = (*COLUMNS, "added_ms_per_image_spread", "stale", "latest_version", "latest_gate")


def accuracy_drops(client: MlflowClient, rows: Sequence[dict[str, Any]],
                   dependencies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Production heads whose newest version scores lower than the version that serves.

    A newer version that did not reach production (retrained on a candidate trunk, or
    failed its gate) with a lower ``val_accuracy`` is what the next promotion or refresh
    would lose. Only heads whose latest version is not the production one are read.

    Returns:
        ``{head, production_version, latest_version, production_accuracy, latest_accuracy,
        drop}`` rows, largest drop first (ties by head name).
    """
    serving = {r["head"]: r for r in rows}
    newer = [dep for dep in dependencies
             if (row := serving.get(dep["head"])) is not None and row.get("val_accuracy") is not None
             and dep.get("latest_run_id") is not None and dep.get("latest_version") not in (None, row["version"])]
    metrics_of = runs_metrics(client, [dep["latest_run_id"] for dep in newer])
    out = []
    for dep in newer:
        row = serving[dep["head"]]
        latest = metrics_of.get(dep["latest_run_id"], {}).get("val_accuracy")
        if latest is not None and latest < row["val_accuracy"]:
            out.append({"head": dep["head"], "production_version": row["version"],
                        "latest_version": dep["latest_version"], "production_accuracy": row["val_accuracy"],
                        "latest_accuracy": latest, "drop": row["val_accuracy"] - latest})
    return sorted(out, key=lambda r: (-r["drop"], r["head"]))


def attention(rows: Sequence[dict[str, Any]], dependencies: Sequence[dict[str, Any]],
              drops: Sequence[dict[str, Any]], release: Any, shared: Mapping[str, float]) -> dict[str, Any]:
    """The report's summary and the heads that need attention first, every list complete and ordered.

    Args:
        rows: :func:`production_table`.
        dependencies: :func:`head_dependencies`.
        drops: :func:`accuracy_drops`.
        release: the release reported on (None: none).
        shared: the trunk's own cost, :func:`trunk_cost`.

    Returns:
        ``{"summary": {...counts and totals}, "failing": [...], "stale": [...], "costly":
        [...], "drops": [...]}``. ``failing``: heads whose latest version failed its gate
        (tag ``gate=failed``: registered, never shipped), by head; ``stale``: the rows of
        :func:`head_dependencies` flagged stale, by head; ``costly``: production rows with
        a measured ``added_gflops``, most costly first.
    """
    failing = [d for d in dependencies if d.get("latest_gate") == "failed"]
    stale = [d for d in dependencies if d.get("stale")]
    costly = sorted((r for r in rows if r.get("added_gflops") is not None),
                    key=lambda r: (-r["added_gflops"], r["head"]))
    accuracies = [r["val_accuracy"] for r in rows if r.get("val_accuracy") is not None]
    summary = {
        "release_version": getattr(release, "version", None),
        "trunk_version": getattr(release, "trunk_version", None),
        "trunk_id": getattr(release, "trunk_id", None),
        "heads_in_production": len(rows),
        "heads_registered": len(dependencies),
        "failing": len(failing), "stale": len(stale), "accuracy_drops": len(drops),
        "taps": dict(sorted(_count(r.get("tap") or "-" for r in rows).items())),
        "heads_gflops": sum(r["added_gflops"] for r in rows if r.get("added_gflops") is not None),
        "heads_ms_per_image": sum(r["added_ms_per_image"] for r in rows
                                  if r.get("added_ms_per_image") is not None),
        "trunk_gflops": shared.get("gflops_per_image"), "trunk_ms_per_image": shared.get("ms_per_image"),
        "min_val_accuracy": min(accuracies) if accuracies else None,
        "median_val_accuracy": sorted(accuracies)[len(accuracies) // 2] if accuracies else None,
    }
    return {"summary": summary, "failing": failing, "stale": stale, "costly": costly, "drops": list(drops)}


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def full_table_rows(rows: Sequence[dict[str, Any]], dependencies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leaderboard rows with each head's standing (``stale``, ``latest_version``, ``latest_gate``)."""
    deps = {d["head"]: d for d in dependencies}
    return [{**{c: row.get(c) for c in COLUMNS}, "added_ms_per_image_spread": row.get("added_ms_per_image_spread"),
             "stale": bool(deps.get(row["head"], {}).get("stale")),
             "latest_version": deps.get(row["head"], {}).get("latest_version"),
             "latest_gate": deps.get(row["head"], {}).get("latest_gate")} for row in rows]


def write_full_table(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Every production head, one CSV line each (:data:`FULL_COLUMNS`; empty cell: not logged)."""
    import csv

    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FULL_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in FULL_COLUMNS})
    return path


def log_report(client: MlflowClient, workspace: str | Path, alias: str = PRODUCTION) -> dict[str, Any]:
    """Build the production leaderboard and log it to the experiment ``reports``.

    Args:
        client: from :func:`registry.store.tracking.connect`.
        workspace: the local copies go to ``<workspace>/reports/<time>/``.
        alias: which release to report on.

    Returns:
        ``{"rows", "table" (text), "markdown" (path), "png" (path), "run_id", "release",
        "dependencies" (rows of :func:`head_dependencies`), "dependencies_text",
        "dependencies_markdown" (path), "leftovers" (what :func:`reap_leftovers` marked;
        empty lists when the promotion lock was busy), "attention" (:func:`attention`: the
        summary and the heads that need attention), "csv" (the full table, every head:
        :func:`write_full_table`), "summary_markdown" (the summary and complete attention
        lists), "production_trunk", "trunk_aliases"}``. The dependencies are always
        measured against ``production``, the release that serves.
    """
    try:
        leftovers = reap_leftovers(client, wait_s=LEFTOVERS_WAIT_S)
    except ReleaseError as e:
        log.warning("leftovers of killed promoters not marked this time: %s", e)
        leftovers = {"killed_runs": [], "finished_runs": [], "orphan_versions": []}
    release = get_release(client, alias)
    rows = production_table(client, alias)
    dependencies = head_dependencies(client)
    served = release if alias == PRODUCTION else get_release(client, PRODUCTION)
    aliases = trunk_aliases(client)
    production_trunk = served.trunk_version if served else None
    dependencies_text = format_dependencies(dependencies, production_trunk, aliases)
    out = Path(workspace) / "reports" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while out.exists():  # two reports in one second must not overwrite each other
        suffix += 1
        out = out.with_name(f"{out.name.split('+')[0]}+{suffix}")
    out.mkdir(parents=True)
    title = f"release v{release.version} ({alias}), trunk v{release.trunk_version}" if release else f"no {alias} release"
    markdown = out / "production_table.md"
    markdown.write_text(format_markdown(rows, title))
    shared = trunk_cost(client, release.trunk_version) if release else {}
    png = plot_accuracy_vs_cost(rows, out / "accuracy_vs_cost.png", shared)
    needs = attention(rows, dependencies, accuracy_drops(client, rows, dependencies), release, shared)
    csv_path = write_full_table(full_table_rows(rows, dependencies), out / FULL_TABLE_CSV)
    summary_md = out / SUMMARY_MD
    # Complete lists in the file; the terminal shows the first rows of each (registry.reports.summary).
    summary_md.write_text(f"# {title}\n\n```\n" + "\n".join(summary_lines(needs) + [""] + attention_lines(needs, None))
                          + "\n```\n")
    against = f"release v{served.version} (production), trunk v{served.trunk_version}" if served else "no production"
    dependencies_md = out / "dependencies.md"
    dependencies_md.write_text(f"# head dependencies, against {against}\n\n```\n{dependencies_text}\n```\n")
    tags = {"alias": alias}
    if release:
        tags.update({"release_version": str(release.version), "trunk_version": str(release.trunk_version)})
    with tracked_run(client, "reports", run_name=f"report-{alias}", tags=tags) as run:
        run.log(metrics={"heads": len(rows), "stale_heads": sum(bool(d["stale"]) for d in dependencies),
                         "failing_heads": len(needs["failing"]), "accuracy_drops": len(needs["drops"]),
                         "heads_gflops": needs["summary"]["heads_gflops"],
                         "orphan_releases_marked": len(leftovers["orphan_versions"]),
                         **{f"trunk_{k}": v for k, v in shared.items()}})
        for path in (markdown, png, dependencies_md, csv_path, summary_md):
            run.log_file(path)
        # The same rows as an MLflow table: sortable and filterable in the run's artifact view.
        run.log_table(leaderboard_frame(rows), LEADERBOARD_TABLE)
    return {"rows": rows, "table": format_table(rows), "markdown": markdown, "png": png,
            "run_id": run.run_id, "release": release, "dependencies": dependencies,
            "dependencies_text": dependencies_text, "dependencies_markdown": dependencies_md,
            "leftovers": leftovers, "attention": needs, "csv": csv_path, "summary_markdown": summary_md,
            "production_trunk": production_trunk, "trunk_aliases": aliases}
