"""Distillation that keeps the heads (issue 14): accuracy each production head keeps, and the speed-up.

For each setting, a fresh copy of a workspace with a production release (the demo's:
``python -m tools.demo workspace=<dir>``) builds a distilled candidate
(:func:`registry.jobs.refresh.distill_candidate`) and runs the cascade on it without
promoting (``promote=False``): every production head is retrained on the student from its
own stored config and seed and scored on its own validation split. Per head the table
gives production's and the candidate's ``val_accuracy`` and the share kept
(candidate / production); per setting the student's speed against its teacher
(:func:`trunk.speed.compare_trunks`: the same batches, interleaved in one run), the wall
time and the cascade's verdict. ``head_loss_weight=0`` is the feature-only distillation
(``pooled`` and the branch taps' maps); above 0 the student also learns the frozen
production heads' softened outputs.

    python -c "from benchmarks.distill import *; print(format_distill_table(run_distill_benchmark('/tmp/ws')))"

Goal: at least 98% kept on every head at at least 2x the teacher's speed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
# Feature-only (today's) against head-aware distillation, at the same student and epochs.
DEFAULT_SETTINGS: tuple[dict[str, Any], ...] = (
    {"head_loss_weight": 0.0},
    {"head_loss_weight": 1.0, "temperature": 2.0},
)
GOAL_KEPT = 0.98
GOAL_SPEEDUP = 2.0


def default_augment() -> list:
    """The ``augment: default`` group's ops (what ``tools.refresh`` uses unless told otherwise)."""
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "augment" / "default.yaml").ops, resolve=True)


def default_distill() -> dict[str, Any]:
    """The ``distill`` block of ``conf/refresh.yaml``: what a run leaves unset comes from it."""
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "refresh.yaml").distill, resolve=True)


def run_distill_benchmark(workspace: str | Path, settings: Sequence[Mapping[str, Any]] = DEFAULT_SETTINGS, *,
                          root: str | Path | None = None, device: str = "cpu", num_workers: int = 0,
                          batch_size: int = 64, augment_ops: list | None = None) -> dict[str, Any]:
    """Build and gate one distilled candidate per setting, each on its own copy of ``workspace``.

    Args:
        workspace: a workspace with a production release (left untouched: each setting
            works on a copy).
        settings: per run, ``distill`` settings over the ``conf/refresh.yaml`` block
            (``epochs``, ``head_loss_weight``, ``temperature``, ``teacher``, ``student``, ...).
        root: where the copies go (default: a temporary folder, removed after).
        device, num_workers, batch_size: as the refresh tool takes them (batch_size: the cascade's).
        augment_ops: distillation's augmentation (default: the ``augment: default`` group).

    Returns:
        ``{"runs": [{"settings", "heads": {name: {"production", "candidate", "kept"}}, "min_kept",
        "speedup", "flops_ratio", "seconds", "verdict", "figures"}], "goal": {...}}``.
    """
    from heads.checks.contract import Tolerances
    from registry.jobs.refresh import distill_candidate, refresh_job
    from registry.store.tracking import connect
    from registry.store.workspace import Workspace

    augment_ops = default_augment() if augment_ops is None else augment_ops
    tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="distill-bench-")
    base = Path(root if root is not None else tmp.name)
    runs = []
    try:
        for i, overrides in enumerate(settings):
            d = {**default_distill(), **dict(overrides)}
            student = {**d["student"], **dict(overrides.get("student", {}))}
            copy = base / f"run{i}"
            shutil.copytree(workspace, copy, symlinks=True)
            client, ws = connect(copy), Workspace.at(copy)
            started = time.perf_counter()
            built, cascade = refresh_job(
                client, ws, build=lambda: distill_candidate(
                    client, ws, model_name=student["model_name"], model_kwargs=student["model_kwargs"],
                    student_seed=student["seed"], input=d["input"], taps=d["taps"], epochs=d["epochs"],
                    batch_size=d["batch_size"], lr=d["lr"], weight_decay=d["weight_decay"], augment_ops=augment_ops,
                    seed=d["seed"], device=device, num_workers=num_workers, progress=False, teacher=d["teacher"],
                    head_loss_weight=d["head_loss_weight"], temperature=d["temperature"]),
                tolerances=Tolerances(), batch_size=batch_size, num_workers=num_workers, device=device,
                progress=False, promote=False)
            heads = {}
            for name, o in sorted(cascade.outcomes.items()):
                prod = o.production_metrics.get("val_accuracy")
                cand = (o.candidate_metrics or {}).get("val_accuracy")
                heads[name] = {"production": prod, "candidate": cand,
                               "kept": cand / prod if cand is not None and prod else None}
            kept = [h["kept"] for h in heads.values()]
            runs.append({"settings": dict(overrides), "heads": heads,
                         "min_kept": min(kept) if kept and None not in kept else None,
                         "speedup": built.figures.get("speedup_vs_teacher"),
                         "flops_ratio": built.figures.get("flops_ratio_vs_teacher"),
                         "seconds": time.perf_counter() - started, "verdict": cascade.verdict,
                         "figures": dict(built.figures)})
            if root is None:
                shutil.rmtree(copy, ignore_errors=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"runs": runs, "goal": {"kept": GOAL_KEPT, "speedup": GOAL_SPEEDUP}}


def _label(settings: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def format_distill_table(result: Mapping[str, Any]) -> str:
    """One row per setting: each head's production -> candidate accuracy (share kept), speed-up, verdict."""
    runs = result["runs"]
    names = sorted({n for r in runs for n in r["heads"]})
    lines = ["| setting | " + " | ".join(names) + " | min kept | speed-up | wall | verdict |",
             "| --- |" + " --- |" * (len(names) + 4)]
    for r in runs:
        cells = []
        for n in names:
            h = r["heads"].get(n)
            if h is None or h["candidate"] is None:
                cells.append("failed")
            else:
                cells.append(f"{h['production']:.3f} → {h['candidate']:.3f} ({100 * h['kept']:.1f}%)")
        kept = "n/a" if r["min_kept"] is None else f"{100 * r['min_kept']:.1f}%"
        speed = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {_label(r['settings'])} | " + " | ".join(cells) +
                     f" | {kept} | {speed} | {r['seconds']:.0f} s | {r['verdict']} |")
    goal = result["goal"]
    lines.append(f"goal: >= {100 * goal['kept']:.0f}% kept on every head at >= {goal['speedup']:.0f}x the teacher's "
                 f"speed (student vs teacher on the same batches, one run)")
    return "\n".join(lines)
