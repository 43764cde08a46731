"""The cascade's report: per head, production vs candidate accuracy, worst slice, cost change, verdict.

Written as Markdown and a PNG into ``<workspace>/reports/cascade-<id>-<time>/``, logged to
the MLflow experiment ``cascades`` (one run per cascade run, tagged with the cascade id,
the candidate trunk version, the starting release and the verdict), and printed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient

from heads.checks.contract import worst_slice
from trunk.files import write_json_atomic
from trunk.speed import compare_trunks, trunk_size
from registry.store.runs import tracked_run
from registry.store.trunks import load_trunk

COLUMNS = ("head", "production", "candidate", "val_accuracy", "kept", "worst slice", "added GFLOPs", "added ms/img",
           "verdict")


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _change(a: float | None, b: float | None, fmt: str = "{:.3g}") -> str:
    if a is None and b is None:
        return "-"
    return f"{'-' if a is None else fmt.format(a)} -> {'-' if b is None else fmt.format(b)}"


def head_rows(result) -> list[dict[str, Any]]:
    """One row per production head with the report's figures (numbers and display strings)."""
    rows = []
    for name, o in sorted(result.outcomes.items()):
        prod, cand = o.production_metrics, o.candidate_metrics or {}
        pa, ca = prod.get("val_accuracy"), cand.get("val_accuracy")
        worst = worst_slice(cand) if cand else None
        worst_text = "-"
        if worst is not None:
            prod_slice = prod.get(f"slice_accuracy.{worst[0]}")
            delta = "" if prod_slice is None else f" ({worst[1] - prod_slice:+.3f})"
            worst_text = f"{worst[0]} {worst[1]:.3f}{delta}"
        rows.append({
            "head": name, "production": f"v{o.production_version}",
            "candidate": "-" if o.candidate_version is None else f"v{o.candidate_version} ({o.status})",
            "val_accuracy": f"{_acc(pa)} -> {_acc(ca)}" + ("" if pa is None or ca is None else f" ({ca - pa:+.3f})"),
            "kept": "-" if not pa or ca is None else f"{ca / pa:.1%}",
            "worst slice": worst_text,
            "added GFLOPs": _change(prod.get("added_gflops"), cand.get("added_gflops") if cand else None),
            "added ms/img": _change(prod.get("added_ms_per_image"), cand.get("added_ms_per_image") if cand else None,
                                    "{:.4f}"),
            "verdict": "PASS" if o.passed else "FAIL",
            "why": o.blocking(),
            "_prod_acc": pa, "_cand_acc": ca, "_worst": worst,
            "_prod_worst": worst_slice(prod), "_passed": o.passed,
        })
    return rows


def trunk_comparison(client: MlflowClient, result, *, device: str = "cpu", batch_size: int = 64) -> dict[str, Any]:
    """Production trunk vs candidate: GFLOPs, parameters and speed on the same batch, side by side.

    Speed is compared only when both trunks take the same input size (the same batch must
    fit both); otherwise only the FLOPs and parameters are given.
    """
    production = load_trunk(client, result.production.trunk_version)
    candidate = result.candidate
    if list(production.data_config["input_size"]) == list(candidate.data_config["input_size"]):
        pixels = torch.randn(batch_size, *production.data_config["input_size"],
                             generator=torch.Generator().manual_seed(0))
        return {"same_input": True, **compare_trunks(production, candidate, pixels, device=device)}
    a, b = trunk_size(production), trunk_size(candidate)
    return {"same_input": False, "teacher_gflops": a["gflops"], "student_gflops": b["gflops"],
            "teacher_params": a["params"], "student_params": b["params"],
            "flops_ratio": a["gflops"] / max(b["gflops"], 1e-12)}


def trunk_line(result, cost: dict[str, Any]) -> str:
    """One line: the two trunks' size, FLOPs and measured speed-up."""
    prod_v, cand_v = result.production.trunk_version, result.candidate_version
    line = (f"trunk v{prod_v} -> v{cand_v} ({result.candidate.model_name}): "
            f"{cost['teacher_gflops']:.4g} -> {cost['student_gflops']:.4g} GFLOPs/image "
            f"({cost['flops_ratio']:.2f}x fewer), {cost['teacher_params']:,.0f} -> {cost['student_params']:,.0f} params")
    if cost.get("same_input"):
        line += (f"; {cost['teacher_ms_per_image']:.3f} -> {cost['student_ms_per_image']:.3f} ms/image, "
                 f"{cost['speedup']:.2f}x the speed (same batches, interleaved)")
    return line


def format_text(rows: Sequence[dict[str, Any]]) -> str:
    """An aligned plain-text table, then one line per blocking head."""
    cells = [[str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip() for c in cells]
    for r in rows:
        if r["why"]:
            lines.append(f"blocks: {r['head']}: {r['why']}")
    return "\n".join(lines)


def format_markdown(result, rows: Sequence[dict[str, Any]], trunk_text: str) -> str:
    lines = [f"# Refresh cascade {result.cascade_id}: {result.verdict}", "",
             f"Candidate trunk v{result.candidate_version} against release v{result.production.version} "
             f"(trunk v{result.production.trunk_version}).", "", trunk_text, ""]
    if result.promoted is not None:
        lines += [f"Production is now release v{result.promoted.version}.", ""]
    if result.refused:
        lines += [f"Promotion refused: {result.refused}", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    blocking = [r for r in rows if r["why"]]
    if blocking:
        lines += ["", "## Blocking heads", ""] + [f"- **{r['head']}**: {r['why']}" for r in blocking]
    return "\n".join(lines) + "\n"


def plot(result, rows: Sequence[dict[str, Any]], path: Path, title_extra: str = "") -> Path:
    """Production vs candidate val accuracy per head, and each one's worst slice; red bars block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["head"] for r in rows]
    x = list(range(len(names)))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names) + 4), 4.5), sharey=True)
    for ax, (title, prod_of, cand_of) in zip(axes, (
            ("val accuracy", lambda r: r["_prod_acc"], lambda r: r["_cand_acc"]),
            ("worst slice accuracy", lambda r: (r["_prod_worst"] or (None, None))[1],
             lambda r: (r["_worst"] or (None, None))[1]))):
        prod = [prod_of(r) or 0.0 for r in rows]
        cand = [cand_of(r) or 0.0 for r in rows]
        ax.bar([i - 0.2 for i in x], prod, width=0.4, color="#9aa5b1", label="production")
        ax.bar([i + 0.2 for i in x], cand, width=0.4, label="candidate",
               color=["#2e7d32" if r["_passed"] else "#c62828" for r in rows])
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_title(title)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"cascade {result.cascade_id}: {result.verdict} (green passes, red blocks){title_extra}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_cascade_report(client: MlflowClient, workspace, result, *, device: str = "cpu") -> dict[str, Any]:
    """Write the report, log it to the experiment ``cascades``, return its pieces.

    Returns:
        ``{"text", "markdown" (path), "png" (path), "run_id", "trunk" (the comparison)}``.
    """
    rows = head_rows(result)
    cost = trunk_comparison(client, result, device=device)
    trunk_text = trunk_line(result, cost)
    out = Path(workspace.root) / "reports" / f"cascade-{result.cascade_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while out.exists():
        suffix += 1
        out = out.with_name(f"{out.name.split('+')[0]}+{suffix}")
    out.mkdir(parents=True)
    markdown = out / "cascade_report.md"
    markdown.write_text(format_markdown(result, rows, trunk_text))
    speed = f"; candidate trunk {cost['speedup']:.2f}x the speed" if cost.get("same_input") else ""
    png = plot(result, rows, out / "cascade_report.png", speed)
    outcomes = out / "outcomes.json"
    write_json_atomic(outcomes, {n: {"production_version": o.production_version,
                                     "candidate_version": o.candidate_version, "status": o.status,
                                     "passed": o.passed, "reason": o.reason, "contract": o.contract.as_dict()}
                                 for n, o in result.outcomes.items()}, indent=2)
    tags = {"cascade": result.cascade_id, "candidate_trunk_version": str(result.candidate_version),
            "production_release": str(result.production.version), "verdict": result.verdict}
    if result.promoted is not None:
        tags["promoted_release"] = str(result.promoted.version)
    metrics: dict[str, float] = {"heads": len(rows), "heads_passed": sum(r["_passed"] for r in rows),
                                 "trunk_flops_ratio": cost["flops_ratio"]}
    if cost.get("same_input"):
        metrics["trunk_speedup"] = cost["speedup"]
    for r in rows:
        if r["_cand_acc"] is not None:
            metrics[f"{r['head']}.candidate_val_accuracy"] = r["_cand_acc"]
        if r["_prod_acc"] is not None:
            metrics[f"{r['head']}.production_val_accuracy"] = r["_prod_acc"]
    with tracked_run(client, "cascades", run_name=f"cascade-{result.cascade_id}", tags=tags) as run:
        run.log(metrics=metrics)
        for path in (markdown, png, outcomes):
            run.log_file(path)
    text = "\n".join([trunk_text, format_text(rows)])
    return {"text": text, "markdown": markdown, "png": png, "run_id": run.run_id, "trunk": cost, "rows": rows}
