"""The trunk training job: train a trunk multi-task on heads' labelled data, register it, adopt it.

:func:`train_trunk_job` ties :func:`trunk.train.train_trunk` to the registry; a trunk
trained before from the same recipe is reused. :func:`adopt_trunk` decides whether a new
trunk serves at once (nothing depends on production's) or waits as ``candidate`` for
the refresh cascade.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from mlflow import MlflowClient

from heads.spec import HeadSpec
from heads.training.data import load_labelled_data
from registry.jobs.train import JobError
from registry.store.releases import CANDIDATE, PRODUCTION, Release, create_release, get_release
from registry.store.trunks import find_trunk_version_by_tag, load_trunk, register_trunk, set_trunk_alias, trunk_metrics
from registry.store.workspace import Workspace
from trunk.model import Trunk
from trunk.train import Task, train_trunk

log = logging.getLogger(__name__)

RECIPE_TAG = "train_recipe"


def adopt_trunk(client: MlflowClient, version: int) -> tuple[str, Release | None]:
    """Make a freshly registered trunk serve when nothing depends on the current one.

    With no production release, or one without heads, production moves to a release of
    just this trunk. With heads in production the trunk becomes ``candidate``: those heads
    must be retrained on it first (the refresh cascade), so production is left alone.
    """
    current = get_release(client, PRODUCTION)
    if current is not None and current.trunk_version == version:
        return "already in production", current
    if current is None or not current.heads:
        release = create_release(client, version, {}, expected_production=current.version if current else None,
                                 note=f"trunk v{version}, no heads yet")
        return "production", release
    set_trunk_alias(client, CANDIDATE, version)
    return "candidate", None


@dataclass
class TrunkJobResult:
    version: int
    trunk: Trunk
    metrics: dict[str, float]
    status: str
    release: Release | None


def train_trunk_job(client: MlflowClient, base: Trunk, specs: Sequence[HeadSpec], *, workspace: Workspace,
                    epochs: int, batch_size: int, lr: float, weight_decay: float, augment_ops: list | None,
                    seed: int, device: str, num_workers: int, progress: bool, adopt: bool = True,
                    retrain: bool = False) -> TrunkJobResult:
    """Train ``base`` multi-task on the labelled data of ``specs``; register it as a ``trunk`` version.

    A trunk trained before from the same recipe (base trunk_id, each task's data_sha and
    classes, the settings and augmentation) is reused rather than trained again, unless
    ``retrain``; the recipe's hash is the version tag ``train_recipe``.
    """
    if not specs:
        raise JobError("tasks is empty: name at least one head config whose data trains the trunk")
    tasks, recipe = [], []
    for spec in specs:
        data = load_labelled_data(spec)
        tasks.append(Task(spec.name, data.classes, [s.path for s in data.train], [s.label for s in data.train]))
        recipe.append([spec.name, data.data_sha, data.classes])
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                "augment": augment_ops}
    fingerprint = hashlib.sha256(json.dumps([base.trunk_id, recipe, settings], sort_keys=True,
                                            default=str).encode()).hexdigest()[:16]
    if not retrain:
        done = find_trunk_version_by_tag(client, RECIPE_TAG, fingerprint)
        if done is not None:  # the same base, data and settings were trained before: reuse it
            trunk = load_trunk(client, done)
            status, release = adopt_trunk(client, done) if adopt else ("registered", None)
            return TrunkJobResult(done, trunk, trunk_metrics(client, done), f"reused (same recipe), {status}", release)
    trained = train_trunk(base, tasks, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                          augment_ops=augment_ops, seed=seed, device=device, num_workers=num_workers,
                          progress=progress)
    params = {"base_trunk_id": base.trunk_id, "tasks": ",".join(s.name for s in specs), "epochs": epochs,
              "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed}
    version = register_trunk(client, trained.trunk, description=f"multi-task on {params['tasks']}",
                             params=params, metrics=trained.metrics, tags={RECIPE_TAG: fingerprint})
    status, release = adopt_trunk(client, version) if adopt else ("registered", None)
    return TrunkJobResult(version, trained.trunk, dict(trained.metrics), status, release)
