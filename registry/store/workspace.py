"""Where everything lives inside one workspace folder.

``workspace=<dir>`` on every tool picks it (default ``./workspace``, or ``$VTP_WORKSPACE``)::

    <workspace>/mlflow.db        MLflow tracking + model registry (SQLite)
    <workspace>/mlartifacts/     MLflow artifacts, one folder per experiment
    <workspace>/cache/           feature cache: <trunk_id>/<tap>/<preprocess_key>-<dtype>/shard-*.safetensors
    <workspace>/runs/            per-job scratch output (head training plots, trunk checkpoints)
    <workspace>/predictions/     the demo's bulk classification output
    <workspace>/reports/         leaderboard tables and accuracy-vs-cost plots (also in MLflow)
    <workspace>/data/            data sets the platform generates (the demo's synthetic shapes)
    <workspace>/hydra/           Hydra's logs and resolved configs of every tool run

A workspace is one movable unit: the only absolute paths the platform reads or writes
through are MLflow's artifact URIs (params may record data paths, as history), and
:func:`registry.store.tracking.connect` re-points those at a copied or moved workspace's own
``mlartifacts/`` before use. No separate identity file is kept: the
store itself records where it was created, also in workspaces made before this check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Workspace:
        path = Path(root).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"workspace {path} exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def content_hashes(self, verify: bool = False):
        """The cache's content-hash index (:class:`trunk.hashindex.ContentHashes`): unchanged files are not re-read."""
        from trunk.hashindex import ContentHashes

        return ContentHashes(self.cache, verify=verify)

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def run_dir(self, kind: str, name: str) -> Path:
        """A fresh folder for one job's files, e.g. ``runs/head/colour/20261123-101500-123``."""
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"
        path = self.root / "runs" / kind / name / stamp
        path.mkdir(parents=True, exist_ok=False)
        return path
