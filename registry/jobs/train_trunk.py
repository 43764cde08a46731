"""The trunk training job: train a trunk multi-task on heads' labelled data, register it, adopt it.

:func:`train_trunk_job` ties :func:`trunk.train.train_trunk` to the registry: it trains on
the heads' training splits only, never on an image (by content) that any of them
validates or checks on, and stores what it trained on and its recipe; a trunk
trained before from the same recipe is reused. :func:`adopt_trunk` decides whether a new
trunk serves at once (nothing depends on production's) or waits as ``candidate`` for
the refresh cascade.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient

from heads.checks.golden import read_golden
from heads.spec import HeadSpec
from heads.training.data import data_roots, load_labelled_data
from registry.jobs.train import JobError
from registry.store.releases import CANDIDATE, PRODUCTION, Release, create_release, get_release
from registry.store.trunks import (
    find_trunk_version,
    find_trunk_version_by_tag,
    load_trunk,
    register_trunk,
    set_trunk_alias,
    trunk_metrics,
    trunk_recipe,
    trunk_run,
    trunk_trained_on,
)
from registry.store.runs import RunLog
from registry.store.workspace import Workspace
from trunk import distributed
from trunk.decode import ImageError
from trunk.model import Trunk
from trunk.seen import SeenImages, content_sha
from trunk.train import Task, train_trunk

log = logging.getLogger(__name__)

RECIPE_TAG = "train_recipe"
# Dataset input of a trunk training run: the training set, named so, digest its fingerprint.
TRAINING_SET = "trunk_training_set"


def trunk_curve_names(row: Mapping[str, Any]) -> dict[str, str]:
    """``{history field: metric name}`` for a trunk training epoch row, logged live per epoch.

    The names are the run's final figures (the last epoch's: trunk training restores no
    best epoch), so MLflow's latest value of each curve is that figure: ``loss`` ->
    ``train_loss``, ``loss_<task>`` -> ``train_loss_<task>``, ``accuracy_<task>`` ->
    ``train_accuracy_<task>``, ``seconds`` -> ``epoch_seconds``; ``val_accuracy_<task>``
    and ``lr`` keep theirs.
    """
    names = {"loss": "train_loss", "seconds": "epoch_seconds"}
    for key in row:
        if key.startswith("loss_"):
            names[key] = "train_" + key
        elif key.startswith("accuracy_"):
            names[key] = "train_" + key
    return names


def live_curves(run: RunLog, names: Callable[[Mapping[str, Any]], Mapping[str, str]]
                ) -> Callable[[Mapping[str, Any]], None]:
    """A training loop's ``on_epoch`` callback: each row logged into ``run`` under ``names(row)``."""
    def on_epoch(row: Mapping[str, Any]) -> None:
        run.epoch_logger(names(row))(row)
    return on_epoch


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
    """What :func:`train_trunk_job` gives back.

    Attributes:
        version: the ``trunk`` version.
        trunk: the trunk.
        metrics: its run's figures (``val_accuracy_<task>``, ``excluded_eval_images``, ...).
        status: what happened (``production``, ``candidate``, ``reused (same recipe), ...``).
        release: the release made when it went to production at once.
        recipe: the recipe it was trained with (:func:`trunk_recipe_of`).
        history: one row per epoch (empty when reused).
    """

    version: int
    trunk: Trunk
    metrics: dict[str, float]
    status: str
    release: Release | None
    recipe: dict[str, Any] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


# The recipe fields a refresh compares with production's (base_trunk_id, what it started from, always differs).
RECIPE_FIELDS = ("model_name", "model_kwargs", "data_config", "tasks", "augment", "epochs", "batch_size", "lr",
                 "weight_decay", "seed")
# The training settings a refresh inherits from production's recipe unless the command line sets them.
SETTING_FIELDS = ("augment", "epochs", "batch_size", "lr", "weight_decay", "seed")


def trunk_recipe_of(base: Trunk, task_names: Sequence[str], *, epochs: int, batch_size: int, lr: float,
                    weight_decay: float, augment_ops: list | None, seed: int) -> dict[str, Any]:
    """The full recipe of a trunk trained from ``base``: what ``recipe.json`` holds (JSON-able)."""
    return json.loads(json.dumps({
        "model_name": base.model_name, "model_kwargs": dict(base.model_kwargs), "data_config": dict(base.data_config),
        "tasks": list(task_names), "augment": list(augment_ops or []), "epochs": int(epochs),
        "batch_size": int(batch_size), "lr": float(lr), "weight_decay": float(weight_decay), "seed": int(seed),
        "base_trunk_id": base.trunk_id,
    }, default=str))


def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per recipe field that differs, ``field: old -> new`` (tasks compared as sets)."""
    lines = []
    for key in RECIPE_FIELDS:
        a, b = old.get(key), new.get(key)
        if key == "tasks" and a is not None and b is not None:
            a, b = sorted(a), sorted(b)
        if a != b:
            lines.append(f"{key}: {json.dumps(a, sort_keys=True)} -> {json.dumps(b, sort_keys=True)}")
    return lines


@dataclass
class TrunkTrainingSet:
    """The trunk's tasks with evaluation images kept out, by content.

    Attributes:
        tasks: one per spec: its training split minus every evaluation image, and its own
            validation split as the task's validation images.
        shas: content hash per training path (files that cannot be read have none).
        excluded: per task, how many of its training images are some head's validation or
            golden image.
        excluded_images: distinct images (by content) kept out of training for that reason.
        eval_images: distinct evaluation images (every head's val split and golden set).
        fingerprint: a hash over what was trained on: (task, content hash, label) rows,
            train and val, so a change of split, golden set or file content changes it.
        sources: per task, the folder or manifest its labelled data came from.
    """

    tasks: list[Task]
    shas: dict[str, str]
    excluded: dict[str, int]
    excluded_images: int
    eval_images: int
    fingerprint: str
    sources: dict[str, str] = field(default_factory=dict)

    def log_to(self, run: RunLog) -> None:
        """Record the training set as the run's input (context ``training``, digest its fingerprint)."""
        sources = sorted(set(self.sources.values()))
        source = sources[0] if len(sources) == 1 else json.dumps({"uris": sources})
        run.log_dataset(TRAINING_SET, self.fingerprint, source, context="training",
                        profile={"num_rows": sum(len(t.paths) for t in self.tasks),
                                 "tasks": ",".join(t.name for t in self.tasks)})


def _sha_or_none(path: str, cache: dict[str, str | None]) -> str | None:
    key = os.path.normpath(os.path.abspath(path))
    if key not in cache:
        try:
            cache[key] = content_sha(path)
        except ImageError:  # unreadable: trunk.train skips and counts it; it cannot match any image either
            cache[key] = None
    return cache[key]


def trunk_training_set(specs: Sequence[HeadSpec]) -> TrunkTrainingSet:
    """Every head's training split, minus every image (by content) that is any head's validation or golden image.

    Heads label the same images with independent splits, so one head's training split
    holds another's validation images: they are kept out of every task, or that head's
    validation figure would be measured on images the trunk learned from.
    """
    cache: dict[str, str | None] = {}
    loaded = [(spec, load_labelled_data(spec)) for spec in specs]
    evaluation: set[str] = set()
    for spec, data in loaded:
        paths = [s.path for s in data.val]
        golden = spec.gate.get("golden")
        if golden:
            paths += [p for p, _ in read_golden(golden, data.classes, spec.source, allow_roots=data_roots(spec))]
        evaluation.update(sha for sha in (_sha_or_none(p, cache) for p in paths) if sha is not None)
    tasks, excluded, kept_out, rows = [], {}, set(), []
    for spec, data in loaded:
        train = []
        for s in data.train:
            sha = _sha_or_none(s.path, cache)
            if sha is not None and sha in evaluation:
                kept_out.add(sha)
                continue
            train.append(s)
            rows.append([spec.name, "train", sha or s.path, s.label])
        excluded[spec.name] = len(data.train) - len(train)
        rows += [[spec.name, "val", _sha_or_none(s.path, cache) or s.path, s.label] for s in data.val]
        tasks.append(Task(spec.name, data.classes, [s.path for s in train], [s.label for s in train],
                          val_paths=[s.path for s in data.val], val_labels=[s.label for s in data.val]))
        rows.append([spec.name, "classes", data.classes])
    shas = {p: sha for p, sha in cache.items() if sha is not None}
    fingerprint = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    return TrunkTrainingSet(tasks, shas, excluded, len(kept_out), len(evaluation), fingerprint,
                            {spec.name: str(data.source) for spec, data in loaded})


def inherited_seen(client: MlflowClient, base: Trunk) -> SeenImages:
    """What a trunk trained from ``base`` has seen before its own training: ``base``'s record.

    Fine-tuning keeps what the base learned, so a validation image the base trained on is
    as seen by the new trunk as by the base. A base the registry has no record for (a
    random-init or hub-pretrained trunk) adds nothing: pretraining data outside the
    platform is not known to it.
    """
    version = find_trunk_version(client, base.trunk_id)
    record = trunk_trained_on(client, version) if version is not None else None
    return record if record is not None else SeenImages()


def train_trunk_job(client: MlflowClient | None, base: Trunk, specs: Sequence[HeadSpec], *, workspace: Workspace,
                    epochs: int, batch_size: int, lr: float, weight_decay: float, augment_ops: list | None,
                    seed: int, device: str, num_workers: int, progress: bool, adopt: bool = True,
                    retrain: bool = False, tags: Mapping[str, str] | None = None) -> TrunkJobResult | None:
    """Train ``base`` multi-task on the training splits of ``specs``; register it as a ``trunk`` version.

    The trunk never trains on an evaluation image: any image (by content,
    :func:`trunk.seen.content_sha`) in some head's validation split or golden set is kept
    out of every task (metric ``excluded_eval_images``). Each task's own validation split
    is scored every epoch (``val_accuracy_<task>``, per epoch in MLflow). The content
    hashes of exactly the images trained on, plus what ``base`` had seen
    (:func:`inherited_seen`), are stored with the version
    (:func:`registry.store.trunks.trunk_trained_on`), and so is the full recipe
    (``recipe.json``, :func:`registry.store.trunks.trunk_recipe`).

    A trunk trained before from the same recipe (base trunk_id, the training and
    validation images by content with their labels, each task's classes, the settings and
    augmentation) is reused rather than trained again, unless ``retrain``; the recipe's
    hash is the version tag ``train_recipe``.

    Data-parallel (torchrun, :mod:`trunk.distributed`): every rank calls this with the same
    arguments; only rank 0 talks to MLflow (the other ranks may pass ``client=None``). Rank 0
    decides reuse and tells the others; all ranks train; rank 0 registers and adopts, the
    others wait for its version and return None. The recipe and its hash do not name the
    number of processes: a trunk trained by N ranks is reused by one process, and the reverse.

    Args:
        tags: extra version tags (a refresh records its recipe difference from production).

    Returns:
        The result on rank 0 (or alone); None on the other ranks of a data-parallel run.
    """
    main = distributed.is_main()
    if main and client is None:
        raise ValueError("train_trunk_job: rank 0 (or a single process) needs an MLflow client")
    if not specs:
        raise JobError("tasks is empty: name at least one head config whose data trains the trunk")
    data = trunk_training_set(specs)
    for task in data.tasks:
        if not task.paths:
            raise JobError(f"task '{task.name}': every training image is another head's validation or golden "
                           f"image; nothing is left to train the trunk on")
    log.info("trunk training: kept %d images out of training that are some head's validation or golden images "
             "(by content; %s)", data.excluded_images,
             ", ".join(f"{name} {n}" for name, n in data.excluded.items()))
    recipe = trunk_recipe_of(base, [s.name for s in specs], epochs=epochs, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, augment_ops=augment_ops, seed=seed)
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                "augment": augment_ops}
    # "leak-free/1": trunks trained before evaluation images were kept out must not be reused.
    fingerprint = hashlib.sha256(json.dumps(["leak-free/1", base.trunk_id, data.fingerprint, settings],
                                            sort_keys=True, default=str).encode()).hexdigest()[:16]
    if not retrain:
        done = find_trunk_version_by_tag(client, RECIPE_TAG, fingerprint) if main else None
        done = distributed.broadcast_int(done)  # rank 0's decision; alone, itself
        if done is not None and not main:
            return None
        if done is not None:  # the same base, data and settings were trained before: reuse it
            trunk = load_trunk(client, done)
            status, release = adopt_trunk(client, done) if adopt else ("registered", None)
            return TrunkJobResult(done, trunk, trunk_metrics(client, done), f"reused (same recipe), {status}",
                                  release, trunk_recipe(client, done) or recipe)
    if not main:  # train alongside rank 0, then wait for its version: only rank 0 registers
        train_trunk(base, data.tasks, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                    augment_ops=augment_ops, seed=seed, device=device, num_workers=num_workers, progress=False)
        distributed.broadcast_int(None)
        return None
    # The run spans the training: a job that fails on the way ends it FAILED and registers nothing.
    with trunk_run(client, "trunk-training", tags={"base_trunk_id": base.trunk_id, RECIPE_TAG: fingerprint}) as run:
        data.log_to(run)
        version, trained, metrics = _train_and_register(client, base, specs, data, recipe, fingerprint, run,
                                                        epochs=epochs, batch_size=batch_size, lr=lr,
                                                        weight_decay=weight_decay, augment_ops=augment_ops, seed=seed,
                                                        device=device, num_workers=num_workers, progress=progress,
                                                        tags=tags)
    status, release = adopt_trunk(client, version) if adopt else ("registered", None)
    distributed.broadcast_int(version)  # the other ranks wait here until the version is registered
    return TrunkJobResult(version, trained.trunk, metrics, status, release, recipe, trained.history)


def _train_and_register(client: MlflowClient, base: Trunk, specs: Sequence[HeadSpec], data: TrunkTrainingSet,
                        recipe: dict[str, Any], fingerprint: str, run: RunLog, *, epochs: int, batch_size: int,
                        lr: float, weight_decay: float, augment_ops: list | None, seed: int, device: str,
                        num_workers: int, progress: bool, tags: Mapping[str, str] | None):
    trained = train_trunk(base, data.tasks, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                          augment_ops=augment_ops, seed=seed, device=device, num_workers=num_workers,
                          progress=progress, on_epoch=live_curves(run, trunk_curve_names))
    seen = SeenImages(data.shas[os.path.normpath(os.path.abspath(p))] for p in trained.paths)
    seen = inherited_seen(client, base).union(seen)
    metrics = {**trained.metrics, "excluded_eval_images": float(data.excluded_images),
               "eval_images": float(data.eval_images)}
    for name, n in data.excluded.items():
        metrics[f"excluded_eval_images_{name}"] = float(n)
    params = {"base_trunk_id": base.trunk_id, "tasks": ",".join(s.name for s in specs), "epochs": epochs,
              "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
              "augment": json.dumps(recipe["augment"], sort_keys=True)}
    version = register_trunk(client, trained.trunk, description=f"multi-task on {params['tasks']}",
                             params=params, metrics=metrics, tags={**(tags or {}), RECIPE_TAG: fingerprint},
                             trained_on=seen, recipe=recipe, run=run, cost_device=device)
    return version, trained, metrics
