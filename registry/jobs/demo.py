"""The embedded demo: the whole platform on a synthetic data set it generates itself.

Runs offline on a CPU in a few minutes: generate shapes -> train a small trunk multi-task
on some attributes -> train heads for every attribute from ``conf/heads/`` (including ones
the trunk never saw) -> one release with every head that passes its gate -> classify the
held-out folder -> classify a colour-shifted copy of it, to show drift monitoring flag the
heads whose inputs moved -> leaderboard and held-out accuracy against chance.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from mlflow import MlflowClient

from demo.shapes import generate_shapes, shifted_copy
from heads.spec import resolve_head
from registry.jobs.classify import classify_job
from registry.jobs.monitor import monitor_lines
from registry.jobs.train import train_head_job
from registry.jobs.train_trunk import train_trunk_job
from registry.reports.report import log_report
from registry.reports.summary import classify_lines, narrator
from registry.store.releases import PRODUCTION, create_release, get_release
from registry.store.workspace import Workspace
from trunk.model import Trunk

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    trunk_version: int
    release_version: int
    heads: dict[str, int]
    holdout: dict[str, dict[str, Any]]  # head -> {accuracy, chance, attribute, tap, trunk_trained, ...}
    predictions: Path
    report: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    drift: dict[str, str] = field(default_factory=dict)  # head -> verdict on the colour-shifted copy


def holdout_accuracy(predictions: Path, labels_csv: Path, attributes: Mapping[str, str]) -> dict[str, float]:
    """Accuracy of each head's ``<head>_label`` column against the held-out labels, by file name.

    Args:
        attributes: ``{head: attribute}``, the column of ``labels_csv`` the head predicts.
    """
    with open(labels_csv, newline="") as f:
        truth = {Path(row["path"]).name: row for row in csv.DictReader(f)}
    table = pq.read_table(predictions).to_pydict()
    out = {}
    for head, attr in attributes.items():
        pairs = [(label, truth[Path(p).name][attr]) for p, label in zip(table["path"], table[f"{head}_label"])
                 if Path(p).name in truth and attr in truth[Path(p).name]]
        out[head] = sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")
    return out


def run_demo(client: MlflowClient, ws: Workspace, *, base: Trunk, head_dirs: Sequence[Path],
             data: Mapping[str, Any], trunk_tasks: Sequence[str], head_names: Sequence[str],
             train: Mapping[str, Any], augment_ops: list | None, device: str, batch_size: int, num_workers: int,
             progress: bool, echo: Callable[[str], None] | None = None) -> DemoResult:
    """Run every step of the demo in ``ws``; each step's line is logged and handed to ``echo`` (the tool: ``print``)."""
    echo = narrator(log, echo)
    seconds: dict[str, float] = {}
    context = {"workspace": str(ws.root)}

    def step(name: str, t0: float) -> None:
        seconds[name] = time.perf_counter() - t0
        echo(f"  ({seconds[name]:.1f} s)")

    t = time.perf_counter()
    echo(f"[1/7] generating the synthetic shapes data set in {ws.data / 'shapes'}")
    dataset = generate_shapes(ws.data / "shapes", progress=progress, **dict(data))
    echo(f"      {dataset.n_images} labelled images, {dataset.n_holdout} held out")
    step("generate", t)

    t = time.perf_counter()
    echo(f"[2/7] training trunk {base.model_name} multi-task on {', '.join(trunk_tasks)}")
    trunk_specs = [resolve_head(n, head_dirs, context) for n in trunk_tasks]
    trunk_job = train_trunk_job(client, base, trunk_specs, workspace=ws, epochs=train["epochs"],
                                batch_size=train["batch_size"], lr=train["lr"], weight_decay=train["weight_decay"],
                                augment_ops=augment_ops, seed=train["seed"], device=device,
                                num_workers=num_workers, progress=progress, adopt=False)
    tv = trunk_job.version
    how = "reused: trained before from the same recipe" if trunk_job.status.startswith("reused") else "registered"
    echo(f"      trunk v{tv} (trunk_id {trunk_job.trunk.trunk_id}) {how}")
    step("train_trunk", t)

    t = time.perf_counter()
    echo(f"[3/7] training heads {', '.join(head_names)} on trunk v{tv}'s cached features")
    versions: dict[str, int] = {}
    for name in head_names:
        job = train_head_job(client, resolve_head(name, head_dirs, context), workspace=ws, trunk_version=tv,
                             batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
                             promote=False)
        verdict = "passes its gate" if job.gate.passed else "FAILS its gate"
        echo(f"      head.{name} v{job.version}: val_accuracy {job.result.metrics['val_accuracy']:.3f}, {verdict}")
        if job.gate.passed:
            versions[name] = job.version
    step("train_heads", t)

    t = time.perf_counter()
    current = get_release(client, PRODUCTION)
    release = create_release(client, tv, versions, expected_production=current.version if current else None,
                             note="tools.demo")
    echo(f"[4/7] release v{release.version} (trunk v{tv}, {len(versions)} heads) is production")
    step("release", t)

    t = time.perf_counter()
    out = ws.predictions / f"demo-holdout-release-{release.version}"
    echo(f"[5/7] classifying {dataset.holdout_dir} with release@production")
    success = classify_job(client, dataset.holdout_dir, out, batch_size=batch_size, num_workers=num_workers,
                           device=device, progress=progress, workspace=ws)
    for line in classify_lines(success, str(out)) + monitor_lines(success.get("drift")):
        echo("      " + line.strip())
    step("classify", t)

    t = time.perf_counter()
    shifted_dir = ws.data / "shapes-colour-shifted"
    echo(f"[6/7] classifying {shifted_dir} (the held-out images with colour channels rotated) with "
         f"release@production")
    shifted = shifted_copy(dataset.holdout_dir, shifted_dir, progress=progress)
    shifted_out = ws.predictions / f"demo-colour-shifted-release-{release.version}"
    moved = classify_job(client, shifted, shifted_out, batch_size=batch_size, num_workers=num_workers,
                         device=device, progress=progress, workspace=ws)
    for line in monitor_lines(moved.get("drift")):
        echo("      " + line.strip())
    drift = {name: h["verdict"] for name, h in (moved.get("drift") or {}).get("heads", {}).items()}
    flagged = sorted(n for n, v in drift.items() if v != "ok")
    echo(f"      drifted on the shifted set: {', '.join(f'{n} ({drift[n]})' for n in flagged) or 'none'}")
    step("classify_shifted", t)

    t = time.perf_counter()
    echo("[7/7] leaderboard")
    report = log_report(client, ws.root)
    step("report", t)

    specs = {name: resolve_head(name, head_dirs, context) for name in versions}
    # The demo's heads read the shapes manifests: manifests/<attribute>.csv.
    attributes = {name: Path(spec.data["manifest"]).stem for name, spec in specs.items()}
    accuracy = holdout_accuracy(out, dataset.holdout_labels, attributes)
    trained_attrs = {Path(s.data["manifest"]).stem for s in trunk_specs}
    rows = {r["head"]: r for r in report["rows"]}
    holdout = {}
    for name, acc in accuracy.items():
        n_classes = len(_labels(specs[name].data["manifest"]))
        holdout[name] = {"accuracy": acc, "chance": 1.0 / n_classes, "attribute": attributes[name],
                         "tap": specs[name].tap, "trunk_trained": attributes[name] in trained_attrs,
                         "val_accuracy": rows.get(name, {}).get("val_accuracy"),
                         "added_gflops": rows.get(name, {}).get("added_gflops")}
    return DemoResult(tv, release.version, versions, holdout, out, report, seconds, drift)


def _labels(manifest: str | None) -> set[str]:
    with open(manifest, newline="") as f:
        return {row["label"] for row in csv.DictReader(f)}


def format_demo(result: DemoResult, ws: Workspace, tracking_uri: str) -> list[str]:
    """The demo's closing lines: leaderboard, held-out accuracy vs chance, where things are."""
    lines = ["", result.report["table"], "", "held-out accuracy (images no head or trunk saw):"]
    for name, h in sorted(result.holdout.items()):
        seen = "trunk trained on it" if h["trunk_trained"] else "trunk NOT trained on it"
        lines.append(f"  {name:<13} {h['accuracy']:.3f}  (chance {h['chance']:.3f}, "
                     f"{h['accuracy'] / h['chance']:.1f}x; {seen}; tap {h['tap']})")
    pooled = {h["attribute"]: (n, h) for n, h in result.holdout.items() if h["tap"] == "pooled"}
    for name, h in sorted(result.holdout.items()):
        if h["tap"] != "pooled" and h["attribute"] in pooled:
            base_name, base = pooled[h["attribute"]]
            lines.append(f"branch vs pooled on {h['attribute']}: {name} at {h['tap']} {h['accuracy']:.3f} held-out, "
                         f"+{h['added_gflops']:.2g} GFLOPs/image; {base_name} at pooled {base['accuracy']:.3f}, "
                         f"+{base['added_gflops']:.2g} GFLOPs/image")
    if result.drift:
        flagged = [f"{n} ({v})" for n, v in sorted(result.drift.items()) if v != "ok"]
        lines.append(f"drift on the colour-shifted held-out copy: {', '.join(flagged) or 'no head flagged'}; "
                     f"ok: {', '.join(n for n, v in sorted(result.drift.items()) if v == 'ok') or 'none'}")
    total = sum(result.seconds.values())
    lines += [
        "",
        f"predictions: {result.predictions}  (Parquet; _SUCCESS.json lists release, trunk and head versions)",
        f"accuracy vs cost plot: {result.report['png']}",
        f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)",
        f"serve it: MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve -m models:/release@production "
        f"--env-manager local -p 5001   (or in Python: registry.serving.load_release)",
        f"demo took {total:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()),
    ]
    return lines
