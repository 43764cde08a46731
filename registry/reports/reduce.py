"""The reduction search's report: per candidate, cost, accuracy kept per head, verdict; the Pareto front.

Printed, written as Markdown, JSON and a PNG into ``<workspace>/reports/reduce-<time>/``,
and logged to the MLflow experiment ``reductions`` (one run per search: a metric per
candidate and figure, e.g. ``int8-static.ms_per_image``, ``int8-static.kept.colour``,
``int8-static.worst_kept``; the table as the MLflow table ``reductions.json``; tags
``chosen``, ``promoted_release``, ``production_release``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from registry.reports.summary import report_folder
from registry.store.runs import tracked_run
from trunk.files import write_json_atomic

EXPERIMENT = "reductions"


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def table_rows(result) -> list[dict[str, Any]]:
    """One display row for the production trunk, then one per candidate."""
    heads = sorted(result.production.heads)
    base = result.baseline

    def row(name: str, trunk: str, cost: dict[str, float], kept: dict[str, float], worst, verdict: str,
            why: str) -> dict[str, Any]:
        out = {"candidate": name, "trunk": trunk,
               "ms/img": "-" if "ms_per_image" not in cost else f"{cost['ms_per_image']:.3f}",
               "speed-up": "-" if "speedup" not in cost else f"{cost['speedup']:.2f}x",
               "GFLOPs": "-" if "gflops" not in cost else f"{cost['gflops']:.4g}",
               "size": _mb(cost.get("bytes")),
               "worst head": "-" if worst is None else f"{worst[0]} {worst[1]:.1%}"}
        out.update({h: "-" if h not in kept else f"{kept[h]:.1%}" for h in heads})
        out.update({"verdict": verdict, "why": why})
        return out

    rows = [row("production", f"v{result.production.trunk_version}", {**base, "speedup": 1.0},
                dict.fromkeys(heads, 1.0), None, "serves", "")]
    for r in result.rows:
        marks = (" (chosen)" if r.name == result.chosen else "") + (" *" if r.name in result.front else "")
        why = r.error or "; ".join(f"{h}: {w}" for h, w in sorted(r.blocked.items()))
        rows.append({**row(r.name + marks, "-" if r.version is None else f"v{r.version}", r.cost, r.kept, r.worst,
                             r.verdict, why), "_name": r.name})
    return rows


def columns(result) -> list[str]:
    return ["candidate", "trunk", "ms/img", "speed-up", "GFLOPs", "size", "worst head",
            *sorted(result.production.heads), "verdict"]


def outcome_line(result) -> str:
    """What the search concluded, one line."""
    if result.chosen is None:
        return (f"no candidate is cheaper than production's trunk and passes every head's contract: production stays "
                f"release v{result.production.version}")
    chosen = result.row(result.chosen)
    what = (f"{chosen.name} (trunk v{chosen.version}): {chosen.cost.get('speedup', float('nan')):.2f}x production's "
            f"speed, worst head {chosen.worst[0]} keeps {chosen.worst[1]:.1%}")
    if result.promoted is not None:
        return f"PROMOTED {what}; production is release v{result.promoted.version}"
    if result.refused:
        return f"NOT PROMOTED {what}: {result.refused}"
    return f"PROPOSED {what} (promote=false: production stays release v{result.production.version})"


def format_text(result) -> str:
    """An aligned table, blocking reasons, the Pareto front and the outcome."""
    rows, cols = table_rows(result), columns(result)
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip() for c in cells]
    lines += [f"  {r['_name']}: {r['why']}" for r in rows if r["why"]]
    lines.append(f"Pareto front (cost {result.cost_key} vs worst head kept; marked *): "
                 f"{', '.join(result.front) or 'none'}")
    lines.append(outcome_line(result))
    return "\n".join(lines)


def format_markdown(result, png_name: str) -> str:
    rows, cols = table_rows(result), columns(result)
    lines = [f"# Reduction search against release v{result.production.version}", "",
             outcome_line(result), "",
             f"Costs measured side by side in one run on the same batches (ms/img: median per image; speed-up: "
             f"production time / candidate time). Kept: candidate val accuracy / production's, per head. "
             f"`*`: on the Pareto front of {result.cost_key} vs worst head kept.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    why = [r for r in rows if r["why"]]
    if why:
        lines += ["", "## Why not", ""] + [f"- **{r['_name']}**: {r['why']}" for r in why]
    lines += ["", f"![cost vs accuracy kept]({png_name})"]
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> Path:
    """Cost relative to production (log x) against worst-head accuracy kept; the front joined; passing in green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from registry.jobs.reduce import cost_value

    base = cost_value(result.baseline, result.cost_key)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([1.0], [1.0], marker="*", s=160, color="#455a64", label="production", zorder=3)
    points = {}
    for r in result.rows:
        if not r.cost or r.worst is None:
            continue
        x, y = cost_value(r.cost, result.cost_key) / base, r.worst[1]
        points[r.name] = (x, y)
        ax.scatter([x], [y], s=70 if r.name == result.chosen else 40, zorder=3,
                   color="#2e7d32" if r.passed else "#c62828", edgecolors="black" if r.name == result.chosen else None)
    # Labels alternate above and below in order of cost, so neighbouring points' names do not overlap.
    for i, (name, (x, y)) in enumerate(sorted(points.items(), key=lambda kv: kv[1][0])):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 == 0 else -12), fontsize=8)
    # Production's own point closes the front: no candidate keeps more than all of it.
    front = [points[n] for n in result.front if n in points] + [(1.0, 1.0)]
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="#607d8b", lw=1, label="Pareto front")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(FuncFormatter(lambda v, _: f"{v:.2g}x"))
    unit = {"ms": "time per image", "gflops": "GFLOPs per image", "bytes": "weight bytes"}[result.cost_key]
    ax.set_xlabel(f"{unit}, relative to production's trunk (log)")
    ax.set_ylabel("accuracy kept by the worst head")
    ax.axvline(1.0, color="#9e9e9e", lw=0.8)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("reductions: green passes every head's contract, red is blocked", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _metrics(result) -> dict[str, float]:
    out = {f"production.{k}": float(v) for k, v in result.baseline.items() if isinstance(v, (int, float))}
    for r in result.rows:
        for k in ("ms_per_image", "gflops", "bytes", "speedup", "params"):
            if k in r.cost:
                out[f"{r.name}.{k}"] = float(r.cost[k])
        out.update({f"{r.name}.kept.{h}": float(v) for h, v in r.kept.items()})
        if r.worst is not None:
            out[f"{r.name}.worst_kept"] = float(r.worst[1])
        out[f"{r.name}.passed"] = float(r.passed)
    return out


def log_reduce_report(client: MlflowClient, workspace, result) -> dict[str, Any]:
    """Write the report, log it to the experiment ``reductions``, return ``{"text", "markdown", "png", "json", "run_id"}``."""
    out = report_folder(workspace.root, "reduce")
    png = plot(result, out / "reductions.png")
    markdown = out / "reductions.md"
    markdown.write_text(format_markdown(result, png.name))
    data = {"production_release": result.production.version, "baseline": result.baseline,
            "cost": result.cost_key, "chosen": result.chosen, "front": result.front,
            "promoted_release": None if result.promoted is None else result.promoted.version,
            "refused": result.refused,
            "candidates": [{"name": r.name, "recipe": r.recipe, "version": r.version, "trunk_id": r.trunk_id,
                            "status": r.status, "error": r.error, "cost": r.cost, "kept": r.kept,
                            "worst": r.worst, "passed": r.passed, "blocked": r.blocked, "verdict": r.verdict,
                            "cascade": r.cascade_id, "cascade_report": r.report} for r in result.rows]}
    summary = out / "reductions.json"
    write_json_atomic(summary, data, indent=2)
    tags = {"production_release": str(result.production.version), "chosen": result.chosen or "none",
            "cost": result.cost_key}
    if result.promoted is not None:
        tags["promoted_release"] = str(result.promoted.version)
    with tracked_run(client, EXPERIMENT, run_name=f"reduce-{result.production.version}", tags=tags) as run:
        run.log(metrics=_metrics(result))
        run.log_table(_frame(table_rows(result), columns(result)), "reductions.json")
        run.log_folder(out)
    text = format_text(result)
    return {"text": text, "markdown": markdown, "png": png, "json": summary, "run_id": run.run_id}


def _frame(rows: Sequence[dict[str, Any]], cols: Sequence[str]):
    import pandas as pd

    return pd.DataFrame([{c: str(r[c]) for c in cols} for r in rows])
