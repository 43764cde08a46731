"""Runs in MLflow: one run of a platform experiment, open while its work goes on.

:func:`tracked_run` is the one way a job or a report logs a run: it creates the run in an
experiment (``trunks``, ``heads``, ``reports``, ``cascades``, ...) with its name and tags,
yields a :class:`RunLog` to log params, metrics and artifacts through, and ends the run
``FINISHED`` when the block completes, ``FAILED`` when it raises (the exception goes on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.utils.time import get_current_time_millis

from registry.store.tracking import experiment_id

# MLflow's limit on one param value; longer values are cut, not refused.
MAX_PARAM_CHARS = 6000


def params_batch(params: Mapping[str, Any]) -> list[Param]:
    """MLflow params from a flat mapping (values stringified, cut to MLflow's limit)."""
    return [Param(str(k), str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]


def metrics_batch(metrics: Mapping[str, Any]) -> list[Metric]:
    """MLflow metrics at step 0 from a flat mapping of numbers."""
    now = get_current_time_millis()
    return [Metric(str(k), float(v), now, 0) for k, v in metrics.items()]


@dataclass(frozen=True)
class RunLog:
    """An open MLflow run: what :func:`tracked_run` yields.

    Attributes:
        client: the client the run was created with.
        run_id: the run's id.
        artifact_uri: where its artifacts go (model versions point into it).
    """

    client: MlflowClient
    run_id: str
    artifact_uri: str

    def log(self, *, params: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None) -> None:
        """Log params (stringified, cut to MLflow's limit) and metrics (at step 0) in one batch."""
        self.client.log_batch(self.run_id, metrics=metrics_batch(metrics or {}), params=params_batch(params or {}))

    def log_steps(self, rows: Mapping[int, Mapping[str, Any]]) -> None:
        """Log metrics per step (e.g. per epoch: ``{1: {"val_accuracy_x": 0.8}, 2: {...}}``) in one batch."""
        now = get_current_time_millis()
        batch = [Metric(str(k), float(v), now, int(step)) for step, row in rows.items() for k, v in row.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_file(self, path: str | Path) -> None:
        """Upload one file to the run's artifact root."""
        self.client.log_artifact(self.run_id, str(path))

    def log_folder(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Upload a folder's contents to the run's artifact root, or under ``artifact_path``."""
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=artifact_path)


@contextlib.contextmanager
def tracked_run(client: MlflowClient, experiment: str, *, run_name: str,
                tags: Mapping[str, str] | None = None) -> Iterator[RunLog]:
    """A run in one of the platform's experiments, ended when the block ends.

    Args:
        client: from :func:`registry.store.tracking.connect`.
        experiment: the experiment's name (one of :data:`registry.store.tracking.EXPERIMENTS`).
        run_name: the run's name.
        tags: the run's tags.

    Yields:
        The open run. It ends ``FINISHED`` when the block completes and ``FAILED`` when it
        raises (anything, KeyboardInterrupt included), so no run is left ``RUNNING``.

    Raises:
        RegistryError: the experiment does not exist.
    """
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=dict(tags or {}))
    log = RunLog(client, run.info.run_id, run.info.artifact_uri)
    try:
        yield log
    except BaseException:
        client.set_terminated(log.run_id, "FAILED")
        raise
    client.set_terminated(log.run_id, "FINISHED")
