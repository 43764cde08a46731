"""Bulk classification: every head of one release on one trunk pass per image (``tools.classify``).

With ``labels`` (a labels file, see :mod:`heads.checks.heldout`), the job also scores every
head the file labels on its own output: the labels are checked against the release's heads
before any image is classified, then joined with the Parquet rows by path; each head's
held-out figures are logged as a run of the experiment ``heldout``
(:mod:`registry.store.heldout`) and returned under ``heldout``.

Every job also streams monitoring stats (unless ``monitor=False``) and is then assessed for
drift against each head's reference (:func:`registry.jobs.monitor.monitor_output`): report
beside the output, one run in the experiment ``monitoring``, returned under ``drift``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from heads.bank import HeadBank
from heads.checks.heldout import LabelsFile, read_labels_file, score_classified
from heads.classify.engine import classify as classify_paths
from heads.classify.output import CLAIM_LEASE_S, JOB_FILE, read_json
from heads.monitor.drift import DriftThresholds
from heads.monitor.reference import HeadReference
from registry.jobs.monitor import monitor_output
from registry.jobs.train import JobError
from registry.store.heldout import EXPERIMENT as HELDOUT_EXPERIMENT
from registry.store.heldout import KEY_TAG, find_heldout_run, heldout_key, log_heldout
from registry.store.releases import (
    PRODUCTION,
    Release,
    get_release,
    load_release,
    production_version,
    read_release,
)
from registry.store.trunks import trunk_trained_on
from registry.store.workspace import Workspace
from trunk.images import InputStream
from trunk.seen import content_sha

log = logging.getLogger(__name__)
# Above this many classes a printed confusion row is unreadable (the PNG in MLflow remains).
MAX_PRINTED_CLASSES = 10


def release_for_output(client: MlflowClient, output: str | Path, release: str | int | None = None) -> Release:
    """The release a classification job into ``output`` runs, resolved once.

    Args:
        client: the registry.
        output: the job's output folder.
        release: a release version, ``production`` (the alias), or None: the release the
            unfinished job already in ``output`` started with (so a job restarted after a
            promotion does not mix versions), else production.

    Raises:
        JobError: no production release, or ``release`` contradicts the job in ``output``.
    """
    job_path = Path(output) / JOB_FILE
    started = None
    if job_path.is_file():
        started = read_json(job_path).get("release", {}).get("version")
    if release is None and started is not None:
        current = production_version(client)
        if current is not None and int(current) != int(started):
            log.warning("resuming %s with release v%s, the release it started with (production is now v%s)",
                        output, started, current)
        return read_release(client, int(started))
    if release is None or str(release) == PRODUCTION:
        found = get_release(client, PRODUCTION)
        if found is None:
            raise JobError("there is no production release: train and promote heads first (python -m tools.demo)")
        return found
    try:
        return read_release(client, int(release))
    except ValueError:
        raise JobError(f"release '{release}' is neither a version number nor '{PRODUCTION}'") from None


def classify_job(client: MlflowClient, input: str | Path, output: str | Path, *, batch_size: int, num_workers: int,
                 device: str, progress: bool, rows_per_shard: int = 10000, release: str | int | None = None,
                 backend: str = "local", draft: bool = True,
                 ray_options: dict[str, Any] | None = None, allow_foreign_files: bool = False,
                 labels: str | Path | None = None, monitor: bool = True,
                 references: Mapping[str, HeadReference | None] | None = None,
                 thresholds: Mapping[str, DriftThresholds] | None = None,
                 workspace: Workspace | None = None, head_weights: str | None = None,
                 claim_lease_s: float = CLAIM_LEASE_S) -> dict[str, Any]:
    """Classify a folder, manifest or fsspec URI with every head of one release.

    The release is resolved once, here (see :func:`release_for_output`), and its trunk and
    heads are loaded by version, so a promotion during the job cannot mix versions.

    Args:
        labels: a labels file (``path``, one column per head name, optional ``slice``) to
            score the release's heads on; None: no scoring.
        monitor: stream monitoring stats and assess drift (False: the bare job).
        references: ``{head: reference}`` to assess against; None: the registered ones.
        thresholds: ``{head: drift thresholds}``; None: the registered configs'.
        workspace: the drift report goes into its ``runs/monitor/`` (None: beside the output).
        head_weights: the head bank's weight precision (``bfloat16`` / ``float16`` / ``int8``;
            None or ``float32``: the heads' own float32). Hundreds of 1000-class heads are bound
            by reading their weights each batch; bf16/fp16 halve that, int8 with per-row scales
            quarters it and runs on the quantized CPU engine (see :mod:`heads.bank`). Part of the
            job's settings.
        claim_lease_s: how long this run's shard claims hold unrenewed (runs sharing one output
            on several hosts take over a dead host's shards after it).

    Returns:
        The ``_SUCCESS.json`` content plus ``drift`` (:func:`registry.jobs.monitor.monitor_output`;
        None without stats); with ``labels``, plus ``heldout`` (see :func:`score_output`).

    Raises:
        heads.checks.heldout.LabelsError: a bad labels file (one line naming the file, row
            and column), before any image is classified.
    """
    chosen = release_for_output(client, output, release)
    trunk, heads = load_release(client, chosen)
    if not heads:
        raise JobError(f"release v{chosen.version} has no heads; promote one with tools.train_head")
    labelled = read_labels_file(labels, {n: h.classes for n, h in heads.items()}) if labels is not None else None
    # Streamed: a folder walk or manifest of tens of millions of entries is never held as a list.
    paths = InputStream(input)
    bank = HeadBank(heads, weight_dtype=None if head_weights == "float32" else head_weights)
    success = classify_paths(trunk, bank, paths, output, release=chosen.as_dict(), batch_size=batch_size,
                             num_workers=num_workers, device=device, rows_per_shard=rows_per_shard,
                             progress=progress, draft=draft, backend=backend, ray_options=ray_options,
                             allow_foreign_files=allow_foreign_files, monitor=monitor, claim_lease_s=claim_lease_s)
    drift = monitor_output(client, chosen, output, success, references=references, thresholds=thresholds,
                           workspace=workspace) if monitor else None
    success = {**success, "drift": drift}
    if labelled is None:
        return success
    return {**success, "heldout": score_output(client, chosen, heads, labelled, output, success["fingerprint"])}


def score_output(client: MlflowClient, release: Release, heads: dict[str, Any], labels: LabelsFile,
                 output: str | Path, fingerprint: str) -> dict[str, Any]:
    """Score a finished classification against a labels file; log each head's figures once.

    Each scored head gets a run in the experiment ``heldout`` (tagged with the release,
    trunk and head versions, the labels file and its hash, and the job); scoring the same
    output with the same labels again logs nothing new and gives the same run ids.

    Returns:
        ``labels``, ``labels_sha256``, ``rows`` (labelled rows), ``unmatched`` (rows with
        no image in the output), ``skipped`` (heads without a column), ``ignored``
        (columns naming no head), ``experiment`` and ``heads``: ``{head: figures}``
        (:meth:`heads.checks.heldout.HeldoutScore.as_dict` plus ``version``, ``run_id``,
        ``metrics``).
    """
    if labels.skipped:
        log.info("heads without a column in %s, not scored: %s", labels.path, ", ".join(labels.skipped))
    if labels.ignored:
        log.warning("columns of %s naming no head of release v%s, ignored: %s", labels.path, release.version,
                    ", ".join(labels.ignored))
    # A held-out figure on images the trunk trained on is no held-out figure: count them.
    seen = trunk_trained_on(client, release.trunk_version)
    classes_of = {name: head.classes for name, head in heads.items()}
    scores, unmatched = score_classified(output, labels, classes_of, seen=seen)
    if unmatched:
        log.warning("%d labelled rows of %s have no image in %s", unmatched, labels.path, output)
    labels_sha = content_sha(labels.path)
    report: dict[str, Any] = {"labels": labels.path, "labels_sha256": labels_sha,
                              "rows": sum(bool(r.labels) for r in labels.rows), "unmatched": unmatched,
                              "skipped": labels.skipped, "ignored": labels.ignored,
                              "experiment": HELDOUT_EXPERIMENT, "heads": {}}
    for name, result in scores.items():
        version = int(release.heads[name])
        key = heldout_key(fingerprint, labels_sha, name, version)
        run_id = find_heldout_run(client, key)
        if run_id is None:
            run_id = log_heldout(client, result, tags={
                KEY_TAG: key, "head_version": str(version), "release_version": str(release.version),
                "trunk_version": str(release.trunk_version), "trunk_id": release.trunk_id,
                "labels": labels.path, "labels_sha256": labels_sha, "output": str(output),
                "fingerprint": fingerprint})
        report["heads"][name] = {**result.as_dict(), "version": version, "run_id": run_id,
                                 "metrics": result.metrics()}
    return report


def heldout_lines(report: dict[str, Any]) -> list[str]:
    """The summary lines of held-out scoring (``report``: :func:`score_output`'s)."""
    lines = [f"held-out scoring against {report['labels']}: {report['rows']} labelled images"
             + (f", {report['unmatched']} not in the output (not scored)" if report["unmatched"] else "")]
    for name, h in sorted(report["heads"].items()):
        failed = f"; {h['errors']} failed to decode, not scored" if h["errors"] else ""
        if h["accuracy"] is None:
            lines.append(f"  {name} v{h['version']}: no decoded labelled images{failed}")
            continue
        lines.append(f"  {name} v{h['version']}: accuracy {h['accuracy']:.3f}, macro-F1 {h['macro_f1']:.3f} "
                     f"on {h['images']} images{failed}")
        seen = h["seen_by_trunk"]
        if seen.get("heldout_seen_by_trunk"):
            unseen = seen.get("heldout_accuracy_unseen")
            lines.append(f"    {int(seen['heldout_seen_by_trunk'])} of them ({seen['heldout_seen_share']:.0%}) the "
                         f"trunk trained on; accuracy on the other {int(seen['heldout_unseen_images'])}: "
                         + (f"{unseen:.3f}" if unseen is not None else "n/a"))
        if h["slice_accuracy"]:
            lines.append("    slices: " + ", ".join(f"{s} {a:.3f} ({h['slice_sizes'][s]})"
                                                    for s, a in h["slice_accuracy"].items()))
        if len(h["classes"]) <= MAX_PRINTED_CLASSES:
            rows = ", ".join(f"{c} [{' '.join(map(str, r))}]" for c, r in zip(h["classes"], h["confusion"]))
            lines.append(f"    confusion (true [predicted {' '.join(h['classes'])}]): {rows}")
    if report["skipped"]:
        lines.append(f"  not scored (no column in the labels file): {', '.join(report['skipped'])}")
    if report["ignored"]:
        lines.append(f"  columns naming no head, ignored: {', '.join(report['ignored'])}")
    if report["heads"]:
        lines.append(f"  logged to MLflow experiment '{report['experiment']}', one run per head: "
                     + ", ".join(f"{n} {h['run_id']}" for n, h in sorted(report["heads"].items())))
    return lines
