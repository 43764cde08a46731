"""The accuracy/cost knob, made visible: one head trained at several taps, logged to MLflow.

Each tap's variant is a version of ``head.<name>`` (tag ``tap``), trained as
:func:`registry.jobs.train.train_head_job` trains any head but never promoted; the sweep's run in
experiment ``reports`` holds one metric per tap (``val_accuracy.<tap>``,
``added_gflops.<tap>``), the table, and a PNG of accuracy against added GFLOPs with the
Pareto front. The answer a team wants is the cheapest tap within ``tolerance`` of the best.
"""

from __future__ import annotations

import copy
import tempfile
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from heads.checks.tradeoff import (
    Point,
    cheapest_within,
    format_tradeoff,
    pareto_front,
    plot_tradeoff,
)
from heads.spec import HeadSpec, validate
from registry.jobs.train import HeadJobResult, train_head_job
from registry.store.heads import safe_key
from registry.store.runs import tracked_run
from registry.reports.summary import narrator
from registry.store.workspace import Workspace
from trunk.model import POOLED

log = logging.getLogger(__name__)

BRANCH_TARGET = "heads.branch.BranchHead"
LINEAR_TARGET = "heads.modules.LinearHead"


@dataclass
class Sweep:
    points: list[Point]
    front: list[Point]
    chosen: Point
    table: str
    png: Path
    run_id: str
    jobs: dict[str, HeadJobResult]


def variant(spec: HeadSpec, tap: str, pooled_train: Mapping[str, Any] | None = None,
            branch_train: Mapping[str, Any] | None = None) -> HeadSpec:
    """The head's config with ``attach.tap`` set.

    At an earlier tap the module becomes a branch unless it is one; at ``pooled`` a branch
    becomes a linear head. A head trained on cached features and a branch trained from
    images want different settings (hundreds of cheap epochs against a few dear ones), so
    ``pooled_train`` / ``branch_train`` override ``train`` for the variants of the other kind.
    """
    config = copy.deepcopy(spec.config)
    config["attach"]["tap"] = tap
    is_branch = config["module"]["_target_"] == BRANCH_TARGET
    if tap == POOLED and is_branch:
        config["module"] = {"_target_": LINEAR_TARGET}
        config["train"].update(pooled_train or {})
    elif tap != POOLED and not is_branch:
        config["module"] = {"_target_": BRANCH_TARGET}
        config["train"].update(branch_train or {})
    return validate(config, f"{spec.source} [attach.tap={tap}]", expected_name=spec.name)


def sweep_taps(client: MlflowClient, spec: HeadSpec, taps: Sequence[str], *, workspace: Workspace,
               tolerance: float, trunk_version: str | int, batch_size: int, num_workers: int, device: str,
               progress: bool, pooled_train: Mapping[str, Any] | None = None,
               branch_train: Mapping[str, Any] | None = None,
               echo: Callable[[str], None] | None = None) -> Sweep:
    """Train ``spec`` at every tap in ``taps``; log the trade-off; name the cheapest within tolerance."""
    say = narrator(log, echo)
    jobs: dict[str, HeadJobResult] = {}
    points = []
    for tap in taps:
        job = train_head_job(client, variant(spec, tap, pooled_train, branch_train), workspace=workspace, trunk_version=trunk_version,
                             batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
                             promote=False)
        m = job.result.metrics
        jobs[tap] = job
        points.append(Point(tap, float(m["val_accuracy"]), float(m["added_gflops"]),
                            {"version": job.version, "added_ms_per_image": m["added_ms_per_image"],
                             "params": m["params"]}))
        say(f"  {tap:<12} val_accuracy {m['val_accuracy']:.4f}  added_gflops {m['added_gflops']:.4g}  "
             f"head.{spec.name} v{job.version}")
    chosen = cheapest_within(points, tolerance)
    table = format_tradeoff(points, chosen, tolerance)
    with tempfile.TemporaryDirectory(prefix="tradeoff-") as tmp:
        png = plot_tradeoff(points, Path(tmp) / f"tradeoff_{spec.name}.png", title=f"head {spec.name}: accuracy vs cost "
                            f"by tap", chosen=chosen)
        (Path(tmp) / f"tradeoff_{spec.name}.md").write_text("```\n" + table + "\n```\n")
        metrics = {}
        for p in points:
            metrics[safe_key(f"val_accuracy.{p.label}")] = p.accuracy
            metrics[safe_key(f"added_gflops.{p.label}")] = p.cost
        with tracked_run(client, "reports", run_name=f"tradeoff-{spec.name}",
                         tags={"head": spec.name, "chosen_tap": chosen.label}) as run:
            run.log(params={"tolerance": tolerance}, metrics=metrics)
            run.log_folder(tmp)
        out = workspace.root / "reports" / f"tradeoff_{spec.name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png.read_bytes())
    return Sweep(points, pareto_front(points), chosen, table, out, run.run_id, jobs)
