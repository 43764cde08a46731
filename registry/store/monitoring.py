"""Monitoring in MLflow: one run per classification job in the experiment ``monitoring``.

A run (named after the output folder) holds:

- tags ``release_version``, ``trunk_version``, ``trunk_id``, ``output``, ``fingerprint``
  (the job's), ``monitor_key`` (a hash of fingerprint and output folder: the same job into
  the same folder is logged once), ``heads`` (assessed, comma-separated),
  ``unreferenced`` (heads without a reference), ``<head>.verdict`` and ``<head>.version``;
- metrics per head: ``<head>.label_psi``, ``<head>.label_js``, ``<head>.label_p``,
  ``<head>.feature_p``, ``<head>.mmd2``, ``<head>.mean_shift_rms``,
  ``<head>.low_confidence_share``, ``<head>.low_confidence_reference``, ``<head>.predictions``
  and ``<head>.verdict_level`` (0 ok, 1 watch, 2 drift); figures not judged are not logged;
- artifacts: ``_MONITOR.safetensors`` (the job's stats), ``drift.json`` (every head's
  :meth:`heads.monitor.drift.HeadDrift.to_dict`) and ``report/`` (Markdown + PNG per head).

The production version of every head flagged ``drift`` or ``watch`` gets the tags
``drift=<verdict>`` and ``drift_run=<run id>`` (a later ``ok`` run clears ``drift`` to ``ok``),
so the registry UI shows which heads need retraining.

The only module that talks to MLflow about monitoring (tests/registry/test_door.py).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from heads.monitor.drift import VERDICTS, DriftThresholds, HeadDrift
from registry.store.heads import model_name, safe_key
from registry.store.runs import tracked_run
from registry.store.tracking import all_pages, experiment_id
from trunk.files import write_json_atomic

EXPERIMENT = "monitoring"
KEY_TAG = "monitor_key"
DRIFT_TAG = "drift"
DRIFT_RUN_TAG = "drift_run"
# HeadDrift fields logged as metrics <head>.<field>.
METRIC_FIELDS = ("label_psi", "label_js", "label_p", "feature_p", "mmd2", "mean_shift_rms", "mean_shift_max",
                 "low_confidence_reference", "low_confidence_run")


def drift_metrics(drift: HeadDrift) -> dict[str, float]:
    """One head's figures as ``{<head>.<figure>: value}`` (figures not judged are left out)."""
    h = drift.head
    out = {f"{h}.{name}": float(getattr(drift, name)) for name in METRIC_FIELDS if getattr(drift, name) is not None}
    if drift.low_confidence_run is not None:
        out[f"{h}.low_confidence_share"] = float(drift.low_confidence_run)
    out[f"{h}.predictions"] = float(drift.n_run)
    out[f"{h}.verdict_level"] = float(VERDICTS.index(drift.verdict))
    return {safe_key(k): v for k, v in out.items()}


def monitoring_key(fingerprint: str, output: str | Path) -> str:
    """16 hex digits naming one job's output: its fingerprint and its (absolute) folder."""
    return hashlib.sha256(f"{fingerprint}\0{Path(output).resolve()}".encode()).hexdigest()[:16]


def find_monitoring_run(client: MlflowClient, key: str) -> str | None:
    """The id of the finished ``monitoring`` run tagged ``monitor_key=key``, or None."""
    runs = client.search_runs([experiment_id(client, EXPERIMENT)],
                              f"tags.{KEY_TAG} = '{key}' and attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def log_monitoring(client: MlflowClient, drifts: Sequence[HeadDrift], *, tags: Mapping[str, str],
                   versions: Mapping[str, int], stats_file: str | Path, report_folder: str | Path | None,
                   run_name: str) -> str:
    """Log one job's drift assessment as a run of ``monitoring``; returns its id.

    Args:
        drifts: one assessment per head with a reference.
        tags: release / trunk / output / fingerprint tags (see the module docstring).
        versions: ``{head: version}`` of the release.
        stats_file: the job's ``_MONITOR.safetensors``.
        report_folder: what :func:`registry.reports.drift.write_drift_report` wrote (uploaded under ``report/``).
        run_name: the run's name.
    """
    run_tags = {str(k): str(v) for k, v in tags.items()}
    run_tags["heads"] = ",".join(d.head for d in drifts)
    for d in drifts:
        run_tags[safe_key(f"{d.head}.verdict")] = d.verdict
        if d.head in versions:
            run_tags[safe_key(f"{d.head}.version")] = str(int(versions[d.head]))
    with tracked_run(client, EXPERIMENT, run_name=run_name, tags=run_tags) as run:
        metrics: dict[str, float] = {}
        for d in drifts:
            metrics.update(drift_metrics(d))
        run.log(metrics=metrics)
        run.log_file(stats_file)
        with tempfile.TemporaryDirectory(prefix="monitoring-") as tmp:
            write_json_atomic(Path(tmp) / "drift.json", [d.to_dict() for d in drifts], indent=1)
            run.log_file(Path(tmp) / "drift.json")
        if report_folder is not None:
            run.log_folder(report_folder, artifact_path="report")
    return run.run_id


def tag_drifted_versions(client: MlflowClient, drifts: Sequence[HeadDrift], versions: Mapping[str, int],
                         run_id: str) -> dict[str, str]:
    """Tag each assessed head's version ``drift=<verdict>``, ``drift_run=<run id>``; returns ``{head: verdict}`` tagged.

    Versions flagged ``watch`` or ``drift`` get the tags; an ``ok`` verdict on a version that
    carries a ``drift`` tag sets it back to ``ok`` (the latest job speaks).
    """
    tagged: dict[str, str] = {}
    for d in drifts:
        if d.head not in versions:
            continue
        name, version = model_name(d.head), str(int(versions[d.head]))
        if not d.needs_attention and DRIFT_TAG not in client.get_model_version(name, version).tags:
            continue
        client.set_model_version_tag(name, version, DRIFT_TAG, d.verdict)
        client.set_model_version_tag(name, version, DRIFT_RUN_TAG, run_id)
        tagged[d.head] = d.verdict
    return tagged


def _number(text: str) -> int | float | str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def head_thresholds(client: MlflowClient, name: str, version: int) -> DriftThresholds:
    """A head version's drift thresholds: its config's ``monitor:`` block (logged as ``monitor.*`` params), else defaults.

    Raises:
        heads.monitor.drift.DriftConfigError: a bad setting, naming the head version and the field.
    """
    mv = client.get_model_version(model_name(name), str(int(version)))
    params = client.get_run(mv.run_id).data.params if mv.run_id else {}
    block = {k.split(".", 1)[1]: _number(v) for k, v in params.items() if k.startswith("monitor.")}
    return DriftThresholds.from_config(block, source=f"{model_name(name)} v{version} config")


def monitoring_history(client: MlflowClient, *, head: str | None = None,
                       release: int | None = None) -> list[dict[str, Any]]:
    """Every finished ``monitoring`` run (oldest first), optionally of one head or one release version.

    Returns:
        One dict per run: ``run_id``, ``time`` (start, seconds since the epoch), ``tags`` and
        ``heads``: ``{head: {"verdict": ..., "version": ..., <figure>: value}}``.
    """
    filters = ["attributes.status = 'FINISHED'"]
    if release is not None:
        filters.append(f"tags.release_version = '{int(release)}'")
    eid = experiment_id(client, EXPERIMENT)
    runs = all_pages(lambda f, page_token=None: client.search_runs([eid], f, page_token=page_token),
                     " and ".join(filters))
    out = []
    for r in runs:
        tags, metrics = r.data.tags, r.data.metrics
        names = [h for h in tags.get("heads", "").split(",") if h]
        if head is not None:
            names = [h for h in names if h == head]
            if not names:
                continue
        heads = {}
        for h in names:
            figures: dict[str, Any] = {"verdict": tags.get(f"{h}.verdict", "ok"), "version": tags.get(f"{h}.version")}
            for key, value in metrics.items():
                if key.startswith(f"{h}."):
                    figures[key[len(h) + 1:]] = value
            heads[h] = figures
        out.append({"run_id": r.info.run_id, "time": r.info.start_time / 1000.0, "tags": dict(tags), "heads": heads})
    return sorted(out, key=lambda p: (p["time"], p["run_id"]))
