"""Drift of a classification job against each head's reference, and the history across jobs (``tools.monitor``).

:func:`monitor_output` runs after every classification job (``tools.classify``): it reads
the job's streamed stats (``_MONITOR.safetensors``), assesses every head that has a
reference (:func:`heads.monitor.drift.assess`, thresholds per head, ``family_size`` = the
number of heads assessed, so the whole job's false-alarm rate is what the thresholds
promise), writes the Markdown + PNG report into the workspace's run folder
``runs/monitor/<output name>/<time>/`` (or ``<output>.monitor/`` beside the output when no
workspace is given; never inside it: the output folder holds only what the classification
contract lists), logs one run to the
MLflow experiment ``monitoring`` and tags the production version of every head flagged
``watch`` or ``drift`` (:mod:`registry.store.monitoring`). Re-running it for the same job
logs nothing new.

:func:`history` and :func:`recommendations` read the experiment back for ``tools.monitor``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from heads.classify.output import MONITOR_FILE
from heads.monitor.drift import DriftThresholds, HeadDrift, assess, attention_lines
from heads.monitor.reference import HeadReference
from heads.monitor.stats import load_run_stats
from registry.reports.drift import write_drift_report
from registry.store.monitoring import (
    EXPERIMENT,
    KEY_TAG,
    find_monitoring_run,
    head_thresholds,
    log_monitoring,
    monitoring_history,
    monitoring_key,
    tag_drifted_versions,
)
from registry.store.releases import Release
from registry.store.workspace import Workspace

log = logging.getLogger(__name__)
REPORT_SUFFIX = ".monitor"


def report_folder(output: str | Path, workspace: Workspace | None = None) -> Path:
    """Where a job's drift report goes: a fresh workspace run folder, else ``<output>.monitor/`` beside the output."""
    out = Path(output)
    if workspace is not None:
        return workspace.run_dir("monitor", out.name or "output")
    return out.parent / f"{out.name}{REPORT_SUFFIX}"


def registry_references(client: MlflowClient, release: Release) -> dict[str, HeadReference | None]:
    """Every head's reference as registered (None for versions registered before references existed)."""
    from registry.store.heads import head_reference

    return {name: head_reference(client, name, int(v)) for name, v in sorted(release.heads.items())}


def registry_thresholds(client: MlflowClient, release: Release) -> dict[str, DriftThresholds]:
    """Every head's thresholds from its registered config's ``monitor:`` block (platform defaults otherwise)."""
    return {name: head_thresholds(client, name, int(v)) for name, v in sorted(release.heads.items())}


def assess_job(stats_file: str | Path, references: Mapping[str, HeadReference | None],
               thresholds: Mapping[str, DriftThresholds], seed: int = 0) -> tuple[list[HeadDrift], list[str]]:
    """Assess every head with a reference against the job's stats.

    Args:
        stats_file: the job's ``_MONITOR.safetensors``.
        references: ``{head: reference or None}`` for the release's heads.
        thresholds: ``{head: thresholds}`` (defaults for a head left out).
        seed: the permutation tests' seed.

    Returns:
        ``(drifts, unreferenced)``: one :class:`HeadDrift` per head with a reference and stats,
        and the heads without a reference, sorted.
    """
    predictions, features, _ = load_run_stats(stats_file)
    assessed = {h: r for h, r in references.items() if r is not None and h in predictions}
    unreferenced = sorted(h for h, r in references.items() if r is None)
    family = max(len(assessed), 1)
    drifts = [assess(ref, predictions[h], features.get(ref.tap), thresholds.get(h), family_size=family, head=h,
                     seed=seed) for h, ref in sorted(assessed.items())]
    return drifts, unreferenced


def monitor_output(client: MlflowClient, release: Release, output: str | Path, success: Mapping[str, Any], *,
                   references: Mapping[str, HeadReference | None] | None = None,
                   thresholds: Mapping[str, DriftThresholds] | None = None,
                   workspace: Workspace | None = None) -> dict[str, Any] | None:
    """Assess, report and log the drift of a finished classification job (see the module docstring).

    Args:
        client: the registry.
        release: the release the job ran.
        output: the job's output folder.
        success: its ``_SUCCESS.json`` content.
        references: ``{head: reference}``; None: the registered ones (:func:`registry_references`).
        thresholds: ``{head: thresholds}``; None: the registered configs' (:func:`registry_thresholds`).
        workspace: where the report goes (:func:`report_folder`).

    Returns:
        ``experiment``, ``run_id``, ``report`` (folder), ``heads`` (``{head: HeadDrift.to_dict()}``),
        ``unreferenced``, ``tagged`` (``{head: verdict}``) and ``attention`` (summary lines);
        None when the job recorded no stats (run with ``monitor=false``).
    """
    stats_file = Path(output) / MONITOR_FILE
    if not success.get("monitor") or not stats_file.is_file():
        return None
    references = registry_references(client, release) if references is None else references
    thresholds = registry_thresholds(client, release) if thresholds is None else thresholds
    drifts, unreferenced = assess_job(stats_file, references, thresholds)
    fingerprint = str(success["fingerprint"])
    key = monitoring_key(fingerprint, output)
    run_id = find_monitoring_run(client, key)
    tagged: dict[str, str] = {}
    folder = None
    if run_id is None:
        folder = report_folder(output, workspace) if drifts else None
        context = {"release": f"v{release.version}", "trunk": f"v{release.trunk_version}", "output": str(output),
                   "job": fingerprint[:16], "without reference": ", ".join(unreferenced) or "none"}
        written = write_drift_report(drifts, folder, title=f"Drift report: {Path(output).name}", context=context) \
            if drifts else None
        run_id = log_monitoring(client, drifts, tags={
            "release_version": str(release.version), "trunk_version": str(release.trunk_version),
            "trunk_id": release.trunk_id, "output": str(output), "fingerprint": fingerprint, KEY_TAG: key,
            "unreferenced": ",".join(unreferenced)}, versions=release.heads, stats_file=stats_file,
            report_folder=folder if written else None, run_name=Path(output).name)
        tagged = tag_drifted_versions(client, drifts, release.heads, run_id)
    return {"experiment": EXPERIMENT, "run_id": run_id, "report": str(folder) if folder else None,
            "heads": {d.head: d.to_dict() for d in drifts}, "unreferenced": unreferenced, "tagged": tagged,
            "attention": attention_lines(drifts)}


def monitor_lines(report: Mapping[str, Any] | None) -> list[str]:
    """Classify's summary lines: only heads that need attention, else one line saying all are ok."""
    if report is None:
        return ["  drift: not monitored (no _MONITOR.safetensors: the job ran with monitor=false)"]
    heads = report["heads"]
    lines = []
    if report["attention"]:
        where = f" (report {report['report']})" if report["report"] else ""
        lines.append(f"  drift: {len(report['attention'])} of {len(heads)} heads need attention{where}:")
        lines += [f"    {line}" for line in report["attention"]]
    elif heads:
        lines.append(f"  drift: all {len(heads)} heads ok against their references")
    if report["unreferenced"]:
        lines.append(f"  drift: no reference recorded, not assessed: {', '.join(report['unreferenced'])}")
    lines.append(f"  logged to MLflow experiment '{report['experiment']}', run {report['run_id']}")
    return lines


# ----------------------------------------------------------------------------- history (tools.monitor)


def history(client: MlflowClient, *, head: str | None = None, release: int | None = None) -> list[dict[str, Any]]:
    """The monitoring runs of a head or a release version, oldest first (see :func:`registry.store.monitoring.monitoring_history`)."""
    return monitoring_history(client, head=head, release=release)


def head_points(runs: Sequence[Mapping[str, Any]], head: str) -> list[dict[str, Any]]:
    """One point per job for :func:`registry.reports.drift.plot_history`: the head's figures plus ``time`` and ``job``."""
    return [{**r["heads"][head], "time": r["time"], "job": r["tags"].get("output", r["run_id"]),
             "run_id": r["run_id"]} for r in runs if head in r["heads"]]


def recommendations(runs: Sequence[Mapping[str, Any]], last: int = 3) -> dict[str, list[str]]:
    """Heads whose verdict was ``drift`` in each of their last ``last`` jobs: ``{head: [run ids]}``.

    One drifted job may be a bad batch of images; drift that persists is the images changing,
    which retraining on fresh labelled data answers.
    """
    if last < 1:
        raise ValueError(f"field 'last': must be at least 1, got {last}")
    heads = sorted({h for r in runs for h in r["heads"]})
    out = {}
    for h in heads:
        recent = [r for r in runs if h in r["heads"]][-last:]
        if len(recent) == last and all(r["heads"][h]["verdict"] == "drift" for r in recent):
            out[h] = [r["run_id"] for r in recent]
    return out


def retrain(heads: Sequence[str], train: Callable[[str], Any]) -> dict[str, Any]:
    """Start retraining each flagged head with ``train(head)`` (``tools.monitor`` passes ``train_head_job``)."""
    return {h: train(h) for h in heads}


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def history_lines(runs: Sequence[Mapping[str, Any]], what: str, folder: str | Path, *, last: int,
                  retrain_offered: bool = True) -> tuple[list[str], dict[str, list[str]]]:
    """``tools.monitor``'s table, one time-series PNG per head in ``folder``, and the recommendations.

    Args:
        runs: from :func:`history`, oldest first (not empty).
        what: ``head colour`` or ``release v3``, for the title.
        folder: where the PNGs go (created).
        last: a head is recommended for retraining when it drifted in each of its last ``last`` jobs.
        retrain_offered: say that ``retrain=true`` would start it.

    Returns:
        ``(lines, {head: run ids})`` (:func:`recommendations`).
    """
    from datetime import UTC, datetime

    from registry.reports.drift import plot_history

    lines = [f"drift of {what} across {len(runs)} jobs (MLflow experiment 'monitoring'):",
             f"  {'time (UTC)':<17} {'head':<12} {'ver':>4} {'verdict':<7} {'label PSI':>9} {'feature p':>9} "
             f"{'low conf':>8}  output"]
    for r in runs:
        when = datetime.fromtimestamp(r["time"], tz=UTC).strftime("%Y-%m-%d %H:%M")
        for h, f in sorted(r["heads"].items()):
            lines.append(f"  {when:<17} {h:<12} {f.get('version') or '-'!s:>4} {f['verdict']:<7} "
                         f"{_num(f.get('label_psi')):>9} {_num(f.get('feature_p'), '{:.2g}'):>9} "
                         f"{_num(f.get('low_confidence_share'), '{:.1%}'):>8}  {r['tags'].get('output', '')}")
    for h in sorted({h for r in runs for h in r["heads"]}):
        lines.append(f"  plot: {plot_history(head_points(runs, h), h, Path(folder) / f'history-{h}.png')}")
    flagged = recommendations(runs, last=last)
    if not flagged:
        lines.append(f"no head drifted in each of its last {last} jobs: no retraining recommended")
    for h in sorted(flagged):
        lines.append(f"RETRAIN {h}: drift in each of its last {last} jobs (runs {', '.join(flagged[h])}); "
                     f"refresh its labelled data and run python -m tools.train_head head={h}"
                     + (", or rerun this with retrain=true" if retrain_offered else ""))
    return lines, flagged
