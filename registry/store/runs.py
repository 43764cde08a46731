"""Runs in MLflow: one run of a platform experiment, open while its work goes on.

:func:`tracked_run` is the one way a job or a report logs a run: it creates the run in an
experiment (``trunks``, ``heads``, ``reports``, ``cascades``, ...) with its name and tags,
yields a :class:`RunLog` to log params, metrics and artifacts through, and ends the run
``FINISHED`` when the block completes, ``FAILED`` when it raises (the exception goes on).
A job opens its run before its work starts, so the run's start and end times are the
work's own (a head's or a trunk's training), and logs into it as the work goes: per-epoch
curves through :meth:`RunLog.epoch_logger` (a plain callable, so ``trunk/`` and ``heads/``
never see MLflow), the datasets it read through :meth:`RunLog.log_dataset`.

Every run carries the source and user tags MLflow's fluent API adds (``mlflow.user``,
``mlflow.source.name``, ``mlflow.source.type``, ``mlflow.source.git.commit`` when the
entry point is in a git checkout), resolved by MLflow's own context providers. A long
run may also record MLflow's system metrics (``system/*``: CPU, memory, disk, network,
GPU) while it is open; that needs ``psutil``, and without it the run goes on without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.time import get_current_time_millis

from registry.store.tracking import experiment_id

# MLflow's limit on one param value; longer values are cut, not refused.
MAX_PARAM_CHARS = 6000
# MLflow's limit on a tag value is 8000 characters; longer values are cut.
MAX_TAG_CHARS = 8000
# Seconds between two system-metrics samples of a run that records them (MLflow's own
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it).
SYSTEM_METRICS_INTERVAL_S = 10.0

log = logging.getLogger(__name__)


def params_batch(params: Mapping[str, Any]) -> list[Param]:
    """MLflow params from a flat mapping (values stringified, cut to MLflow's limit)."""
    return [Param(str(k), str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]


def metrics_batch(metrics: Mapping[str, Any]) -> list[Metric]:
    """MLflow metrics at step 0 from a flat mapping of numbers."""
    now = get_current_time_millis()
    return [Metric(str(k), float(v), now, 0) for k, v in metrics.items()]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunLog:
    """An open MLflow run: what :func:`tracked_run` yields.

    Attributes:
        client: the client the run was created with.
        run_id: the run's id.
        artifact_uri: where its artifacts go (model versions point into it).
        curves: the metric keys logged per step (:meth:`log_steps`, :meth:`epoch_logger`)
            so far; a caller logging final figures at step 0 leaves these out, since
            MLflow's latest value of a key is the one at its largest step.
    """

    client: MlflowClient
    run_id: str
    artifact_uri: str
    curves: set[str] = field(default_factory=set, compare=False)

    def log(self, *, params: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None) -> None:
        """Log params (stringified, cut to MLflow's limit) and metrics (at step 0) in one batch."""
        self.client.log_batch(self.run_id, metrics=metrics_batch(metrics or {}), params=params_batch(params or {}))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified, cut to MLflow's limit) in one batch."""
        batch = [RunTag(str(k), str(v)[:MAX_TAG_CHARS]) for k, v in tags.items()]
        if batch:
            self.client.log_batch(self.run_id, tags=batch)

    def rename(self, name: str) -> None:
        """Give the run another name (a trunk's run is named after its trunk_id, known only once trained)."""
        self.client.update_run(self.run_id, name=name)

    def log_steps(self, rows: Mapping[int, Mapping[str, Any]]) -> None:
        """Log metrics per step (e.g. per epoch: ``{1: {"val_accuracy_x": 0.8}, 2: {...}}``) in one batch."""
        now = get_current_time_millis()
        batch = [Metric(str(k), float(v), now, int(step)) for step, row in rows.items() for k, v in row.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)
            self.curves.update(m.key for m in batch)

    def epoch_logger(self, rename: Mapping[str, str] | None = None, *,
                     step_key: str = "epoch") -> Callable[[Mapping[str, Any]], None]:
        """A callback for a training loop's epoch rows that logs each row as it comes.

        Each numeric field of a row (not ``step_key``, not booleans) is logged at step
        ``row[step_key]``, timestamped when the epoch ended. A row that cannot be logged
        (a tracking server that is briefly away) is skipped with a warning: a training run
        is not stopped for a curve.

        Args:
            rename: ``{field: metric name}`` for fields logged under another name (a
                field whose name is a run's final figure, say); other fields keep theirs.
            step_key: the row's field holding the step.
        """
        names = dict(rename or {})

        def on_epoch(row: Mapping[str, Any]) -> None:
            step = int(row[step_key])
            values = {names.get(k, k): float(v) for k, v in row.items() if k != step_key and _is_number(v)}
            try:
                self.log_steps({step: values})
            except MlflowException as e:
                log.warning("run %s: epoch %d's metrics were not logged: %s", self.run_id, step,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)

        return on_epoch

    def log_dataset(self, name: str, digest: str, source: str | Path, *, context: str,
                    profile: Mapping[str, Any] | None = None, source_type: str = "local") -> None:
        """Record a dataset the run read (MLflow's run inputs, the UI's "Datasets used").

        Args:
            name: the dataset's name (e.g. ``colour.train``).
            digest: its content digest as the platform computes it (a head's ``data_sha``,
                a trunk's training-set fingerprint).
            source: the folder or manifest it was read from; stored as MLflow's local
                source (``{"uri": ...}``), or a JSON object given as a string as it is.
            context: ``training``, ``validation``, ... (input tag ``mlflow.data.context``).
            profile: small JSON-able figures (``{"num_rows": 80}``).
            source_type: MLflow's source type.
        """
        text = str(source)
        if not text.startswith("{"):
            text = json.dumps({"uri": text})
        dataset = Dataset(name=name, digest=str(digest), source_type=source_type, source=text,
                          profile=json.dumps(dict(profile), sort_keys=True) if profile else None)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT,
                                                                                             context)])])

    def log_table(self, data: Any, artifact_file: str) -> None:
        """Log a pandas DataFrame as an MLflow table artifact (sortable and filterable in the UI)."""
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def log_file(self, path: str | Path) -> None:
        """Upload one file to the run's artifact root."""
        self.client.log_artifact(self.run_id, str(path))

    def log_folder(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Upload a folder's contents to the run's artifact root, or under ``artifact_path``."""
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=artifact_path)


def _system_metrics_monitor(client: MlflowClient, run_id: str) -> Any:
    """MLflow's system-metrics monitor for a run, started; None when psutil is missing or it fails to start."""
    try:
        import psutil  # noqa: F401  (MLflow's CPU, memory and disk monitors need it)
    except ImportError:
        log.info("run %s: no system metrics (psutil is not installed)", run_id)
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                       tracking_uri=client.tracking_uri)
        monitor.start()
    except Exception as e:  # an optional extra: never stop a run for it
        log.warning("run %s: system metrics not recorded: %s", run_id, e)
        return None
    return monitor


@contextlib.contextmanager
def tracked_run(client: MlflowClient, experiment: str, *, run_name: str,
                tags: Mapping[str, str] | None = None, system_metrics: bool = False) -> Iterator[RunLog]:
    """A run in one of the platform's experiments, ended when the block ends.

    Args:
        client: from :func:`registry.store.tracking.connect`.
        experiment: the experiment's name (one of :data:`registry.store.tracking.EXPERIMENTS`).
        run_name: the run's name.
        tags: the run's tags, beside (and over) MLflow's source and user tags
            (``mlflow.user``, ``mlflow.source.name``, ``mlflow.source.type``,
            ``mlflow.source.git.commit`` when known).
        system_metrics: record MLflow's system metrics (``system/*``) while the run is
            open (needs psutil; without it the run has none). The monitor's thread is
            stopped before the run ends, whatever way the block ends.

    Yields:
        The open run. It ends ``FINISHED`` when the block completes and ``FAILED`` when it
        raises (anything, KeyboardInterrupt included), so no run is left ``RUNNING``.

    Raises:
        RegistryError: the experiment does not exist.
    """
    eid = experiment_id(client, experiment)
    run = client.create_run(eid, run_name=run_name, tags=resolve_tags(dict(tags or {})))
    log_ = RunLog(client, run.info.run_id, run.info.artifact_uri)
    monitor = _system_metrics_monitor(client, log_.run_id) if system_metrics else None
    status = "FAILED"
    try:
        yield log_
        status = "FINISHED"
    finally:
        if monitor is not None:
            monitor.finish()  # joins its thread and flushes what it sampled
        client.set_terminated(log_.run_id, status)
