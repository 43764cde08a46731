"""The cascade's report: per head, production vs candidate accuracy, worst slice, cost change, verdict.

Written as Markdown and a PNG into ``<workspace>/reports/cascade-<id>-<time>/``, logged to
the MLflow experiment ``cascades`` (one run per cascade run, tagged with the cascade id,
the candidate trunk version, the starting release and the verdict), and printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient

from heads.checks.contract import worst_slice
from heads.training.cost import format_ms
from trunk.files import write_json_atomic
from trunk.speed import compare_trunks, trunk_size
from trunk.timing import speed_phrase
from registry.reports.summary import report_folder
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


def _ms_change(prod: dict[str, Any], cand: dict[str, Any]) -> str:
    """Added ms per image, production -> candidate, each with its spread or marked as below timing noise."""
    a, b = prod.get("added_ms_per_image"), cand.get("added_ms_per_image")
    if a is None and b is None:
        return "-"
    return (f"{format_ms(a, prod.get('added_ms_per_image_spread'))} -> "
            f"{format_ms(b, cand.get('added_ms_per_image_spread'))}")


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
            "added ms/img": _ms_change(prod, cand),
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


def _ms(cost: dict[str, Any], who: str) -> str:
    """``4.020 ms (IQR 3.951-4.102)``: one trunk's median per image and its quartiles, when measured."""
    text = f"{cost[f'{who}_ms_per_image']:.3f} ms"
    if f"{who}_ms_per_image_q1" in cost:
        text += f" (IQR {cost[f'{who}_ms_per_image_q1']:.3f}-{cost[f'{who}_ms_per_image_q3']:.3f})"
    return text


def speed_sentence(cost: dict[str, Any], subject: str = "candidate trunk") -> str:
    """The candidate's speed, from the very medians shown beside it, with the per-round spread.

    Returns:
        e.g. ``"4.020 ms (IQR ...) -> 4.577 ms (IQR ...) per image: candidate trunk is
        1.14x slower (per-round 1.10x-1.18x slower, 20 rounds on the same batches, interleaved)"``.
    """
    line = (f"{_ms(cost, 'teacher')} -> {_ms(cost, 'student')} per image: "
            f"{speed_phrase(subject, cost['teacher_ms_per_image'], cost['student_ms_per_image'])}")
    if "speedup_q1" in cost:
        low, high = cost["speedup_q1"], cost["speedup_q3"]
        faster = cost["teacher_ms_per_image"] >= cost["student_ms_per_image"]
        # The spread in the sentence's own direction: "slower" ratios are the inverse of "faster" ones.
        a, b = (low, high) if faster else (1 / high if high > 0 else float("inf"), 1 / low if low > 0 else float("inf"))
        word = "faster" if faster else "slower"
        line += (f" (per-round ratios IQR {a:.2f}x-{b:.2f}x {word}, {int(cost.get('rounds', 0))} rounds "
                 f"on the same batches, interleaved)")
    return line


def trunk_line(result, cost: dict[str, Any]) -> str:
    """One line: the two trunks' size, FLOPs and measured speed, in one direction."""
    prod_v, cand_v = result.production.trunk_version, result.candidate_version
    line = (f"trunk v{prod_v} -> v{cand_v} ({result.candidate.model_name}): "
            f"{cost['teacher_gflops']:.4g} -> {cost['student_gflops']:.4g} GFLOPs/image "
            f"({_flops_words(cost['flops_ratio'])}), "
            f"{cost['teacher_params']:,.0f} -> {cost['student_params']:,.0f} params")
    if cost.get("same_input"):
        line += "; " + speed_sentence(cost)
    return line


def _flops_words(ratio: float) -> str:
    """FLOPs change in one direction, like speed: ``2.00x fewer`` or ``1.50x more``."""
    if not 0 < ratio < float("inf"):
        return "FLOPs ratio not measured"
    if round(ratio, 2) == 1:
        return "the same FLOPs"
    return f"{ratio:.2f}x fewer" if ratio > 1 else f"{1 / ratio:.2f}x more"


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


def panels(rows: Sequence[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """The figure's panels that have something to show: ``(title, production value, candidate value)``.

    Val accuracy always; the worst slice only when some head has slices (an empty panel
    would read as "every slice scored 0").
    """
    out = [("val accuracy", lambda r: r["_prod_acc"], lambda r: r["_cand_acc"])]
    if any(r["_worst"] is not None or r["_prod_worst"] is not None for r in rows):
        out.append(("worst slice accuracy", lambda r: (r["_prod_worst"] or (None, None))[1],
                    lambda r: (r["_worst"] or (None, None))[1]))
    return out


def figure(result, rows: Sequence[dict[str, Any]], title_extra: str = ""):
    """The report's matplotlib figure (see :func:`plot`); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["head"] for r in rows]
    x = list(range(len(names)))
    shown = panels(rows)
    fig, axes = plt.subplots(1, len(shown), figsize=(max(4, 1.6 * len(names) + 2) * len(shown), 4.5), sharey=True,
                             squeeze=False)
    axes = list(axes[0])
    for ax, (title, prod_of, cand_of) in zip(axes, shown):
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
    return fig


def plot(result, rows: Sequence[dict[str, Any]], path: Path, title_extra: str = "") -> Path:
    """Production vs candidate val accuracy per head, and each one's worst slice when there are slices; red bars block."""
    import matplotlib.pyplot as plt

    fig = figure(result, rows, title_extra)
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
    out = report_folder(workspace.root, f"cascade-{result.cascade_id}")
    markdown = out / "cascade_report.md"
    markdown.write_text(format_markdown(result, rows, trunk_text))
    speed = ("; " + speed_phrase("candidate trunk", cost["teacher_ms_per_image"], cost["student_ms_per_image"])
             if cost.get("same_input") else "")
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
        # Production time / candidate time of the medians in the report (above 1: faster), and its spread.
        metrics["trunk_speedup"] = cost["speedup"]
        metrics.update({f"trunk_speedup_{q}": cost[f"speedup_{q}"] for q in ("q1", "q3") if f"speedup_{q}" in cost})
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
