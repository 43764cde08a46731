"""Held-out figures in MLflow: one run per head per scoring, in the experiment ``heldout``.

A head version's own run (experiment ``heads``) is its registration record: its
validation figures, fixed when it was trained. Held-out figures belong to a labelled set
that may be scored many times, against many versions, so each scoring gets a run of its
own, named after the head, in the experiment ``heldout``:

- tags ``head``, ``head_version``, ``release_version``, ``trunk_version``, ``trunk_id``,
  ``labels`` (the labels file), ``labels_sha256`` (its content hash), ``output`` (the
  classification folder), ``fingerprint`` (the job's) and ``heldout_key`` (a hash of
  fingerprint, labels hash, head and version: the same scoring is logged once);
- metrics ``heldout_accuracy``, ``heldout_macro_f1``, ``heldout_images``,
  ``heldout_errors``, ``heldout_recall.<class>``, ``heldout_slice_accuracy.<slice>``,
  ``heldout_slice_size.<slice>`` and, when the trunk recorded what it trained on,
  ``heldout_seen_by_trunk``, ``heldout_seen_share``, ``heldout_unseen_images``,
  ``heldout_accuracy_unseen``, ``heldout_macro_f1_unseen``;
- artifacts ``heldout_confusion.png`` and ``heldout.json`` (every figure, the confusion
  counts in class order).

Compare versions of a head in the MLflow UI by filtering on ``tags.head``.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient

from heads.checks.heldout import HeldoutScore, confusion_json
from heads.training.evaluate import plot_confusion
from registry.store.heads import safe_key
from registry.store.runs import tracked_run
from registry.store.tracking import experiment_id

EXPERIMENT = "heldout"
KEY_TAG = "heldout_key"


def heldout_key(fingerprint: str, labels_sha256: str, head: str, version: int) -> str:
    """16 hex digits naming one scoring: this job's output, this labels file, this head version."""
    blob = "\0".join((fingerprint, labels_sha256, head, str(int(version)))).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def find_heldout_run(client: MlflowClient, key: str) -> str | None:
    """The id of the finished ``heldout`` run tagged ``heldout_key=key``, or None."""
    runs = client.search_runs([experiment_id(client, EXPERIMENT)],
                              f"tags.{KEY_TAG} = '{key}' and attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def log_heldout(client: MlflowClient, result: HeldoutScore, *, tags: Mapping[str, str]) -> str:
    """Log one head's held-out figures as a run of the experiment ``heldout``; returns its id.

    Args:
        client: from :func:`registry.store.tracking.connect`.
        result: the head's figures.
        tags: the run's tags (see the module docstring); ``head`` is set from ``result``.
    """
    tags = {**{k: str(v) for k, v in tags.items()}, "head": result.head}
    with tracked_run(client, EXPERIMENT, run_name=result.head, tags=tags) as run:
        run.log(metrics={safe_key(k): v for k, v in result.metrics().items()})
        with tempfile.TemporaryDirectory(prefix="heldout-") as tmp:
            (Path(tmp) / "heldout.json").write_text(confusion_json(result) + "\n")
            if result.confusion:
                plot_confusion(result.confusion, result.classes, Path(tmp) / "heldout_confusion.png",
                               title=f"{result.head} v{tags.get('head_version', '?')} (held-out)")
            run.log_folder(tmp)
    return run.run_id
