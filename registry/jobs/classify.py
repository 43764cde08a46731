"""Bulk classification: every head of one release on one trunk pass per image (``tools.classify``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from heads.bank import HeadBank
from heads.classify.engine import classify as classify_paths
from heads.classify.output import JOB_FILE, read_json
from registry.jobs.train import JobError
from registry.store.releases import (
    PRODUCTION,
    Release,
    get_release,
    load_release,
    production_version,
    read_release,
)
from trunk.images import resolve_inputs

log = logging.getLogger(__name__)


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
                 ray_options: dict[str, Any] | None = None, allow_foreign_files: bool = False) -> dict[str, Any]:
    """Classify a folder, manifest or fsspec URI with every head of one release.

    The release is resolved once, here (see :func:`release_for_output`), and its trunk and
    heads are loaded by version, so a promotion during the job cannot mix versions.
    """
    chosen = release_for_output(client, output, release)
    trunk, heads = load_release(client, chosen)
    if not heads:
        raise JobError(f"release v{chosen.version} has no heads; promote one with tools.train_head")
    paths = resolve_inputs(input)
    return classify_paths(trunk, HeadBank(heads), paths, output, release=chosen.as_dict(), batch_size=batch_size,
                          num_workers=num_workers, device=device, rows_per_shard=rows_per_shard, progress=progress,
                          draft=draft, backend=backend, ray_options=ray_options,
                          allow_foreign_files=allow_foreign_files)
