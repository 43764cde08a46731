"""Trunk versions in MLflow: registered model ``trunk``, one version per ``trunk_id``.

A version's artifacts are exactly what :meth:`trunk.model.Trunk.save` writes
(safetensors weights plus a JSON spec), under the run's artifact path ``trunk``; loading
rebuilds the trunk from them and checks that the weights still hash to the version's
``trunk_id`` tag. Nothing is unpickled.

Every version records its own cost (:func:`measure_trunk_cost`): run metrics ``params``,
``gflops_per_image`` and ``ms_per_image``, the same figures as version tags, and tags
``cost_batch_size`` and ``cost_device`` saying how the time was taken. A trunk trained or
distilled by a job is registered into the job's own run (:func:`trunk_run`), opened before
training, so the run's duration is the training's and its curves are logged epoch by epoch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from registry.store.runs import RunLog, tracked_run
from registry.store.tracking import (
    RegistryError,
    all_pages,
    ensure_registered_model,
    is_not_found,
    run_metrics,
    tagged_artifact,
)
from trunk.device import resolve_device
from trunk.model import POOLED, Trunk
from trunk.seen import SeenImages
from trunk.speed import trunk_size
from trunk.timing import interleaved, spread

TRUNK_MODEL = "trunk"
ARTIFACT_PATH = "trunk"
# What a trunk trained on, by content (trunk.seen): artifact, and version tags naming its digest and size.
TRAINED_ON_ARTIFACT = "trained_on/images.safetensors"
TRAINED_ON_TAG = "trained_on_digest"
TRAINED_ON_COUNT_TAG = "trained_on_images"
# How a trunk was trained (trunk.train settings, augmentation, tasks, model): artifact, and a tag with its hash.
RECIPE_ARTIFACT = "recipe.json"
RECIPE_SHA_TAG = "recipe_sha"
# A version's cost: how many images a timed batch holds, and how many batches are timed
# (after one untimed): a few, so a big trunk on a CPU costs seconds, not minutes.
COST_BATCH_SIZE = 8
COST_REPEATS = 3
COST_TAGS = ("params", "gflops_per_image", "ms_per_image", "cost_batch_size", "cost_device")

log = logging.getLogger(__name__)


def find_trunk_version(client: MlflowClient, trunk_id: str) -> int | None:
    """The lowest ``trunk`` version tagged with this trunk_id, or None."""
    return find_trunk_version_by_tag(client, "trunk_id", trunk_id)


def find_trunk_version_by_tag(client: MlflowClient, key: str, value: str) -> int | None:
    """The lowest ``trunk`` version whose tag ``key`` equals ``value``, or None."""
    found = client.search_model_versions(f"name='{TRUNK_MODEL}' and tags.{key}='{value}'")
    versions = sorted(int(v.version) for v in found)
    return versions[0] if versions else None


def trunk_version_tags(client: MlflowClient, version: int) -> dict[str, str]:
    """The tags of one ``trunk`` version.

    Raises:
        RegistryError: no such version.
    """
    return dict(get_trunk_version(client, version).tags)


def get_trunk_version(client: MlflowClient, version: int):
    """The MLflow ``ModelVersion`` of ``trunk`` v<version>; RegistryError when missing."""
    try:
        return client.get_model_version(TRUNK_MODEL, str(int(version)))
    except MlflowException as e:
        if is_not_found(e):
            raise RegistryError(f"trunk v{version} does not exist in the registry") from None
        raise


def trunk_metrics(client: MlflowClient, version: int) -> dict[str, float]:
    """The metrics logged on the run of ``trunk`` v<version>; RegistryError when missing."""
    return run_metrics(client, get_trunk_version(client, version).run_id)


def trunk_versions(client: MlflowClient) -> list[Any]:
    """Every MLflow ``ModelVersion`` of ``trunk``, across result pages (empty when none)."""
    return all_pages(client.search_model_versions, f"name='{TRUNK_MODEL}'")


def trunk_alias_versions(client: MlflowClient) -> dict[str, int]:
    """``{alias: version}`` for the aliases of ``trunk`` (e.g. ``candidate``); {} when it is not registered."""
    try:
        aliases = client.get_registered_model(TRUNK_MODEL).aliases
    except MlflowException as e:
        if is_not_found(e):
            return {}
        raise
    return {alias: int(version) for alias, version in aliases.items()}


def set_trunk_alias(client: MlflowClient, alias: str, version: int) -> None:
    """Point the ``trunk`` alias ``alias`` at a version."""
    client.set_registered_model_alias(TRUNK_MODEL, alias, str(int(version)))


def clear_trunk_alias(client: MlflowClient, alias: str, version: int) -> bool:
    """Delete the ``trunk`` alias ``alias`` if it points at ``version``.

    An alias is a convenience: when MLflow refuses, this logs a warning and goes on.

    Returns:
        True when the alias was deleted.
    """
    try:
        if str(client.get_registered_model(TRUNK_MODEL).aliases.get(alias)) == str(version):
            client.delete_registered_model_alias(TRUNK_MODEL, alias)
            return True
    except MlflowException as e:
        log.warning("could not clear trunk alias '%s': %s", alias, e)
    return False


def measure_trunk_cost(trunk: Trunk, *, device: str | torch.device = "cpu", batch_size: int = COST_BATCH_SIZE,
                       repeats: int = COST_REPEATS) -> dict[str, Any]:
    """What one image through the trunk's ``pooled`` forward costs: parameters, GFLOPs, milliseconds.

    GFLOPs are counted on one image at the trunk's input size (:func:`trunk.speed.trunk_size`);
    time is the median of ``repeats`` timed batches of ``batch_size`` random images after one
    untimed one (:func:`trunk.timing.interleaved`), on a copy of the trunk in eval mode, so
    the trunk itself is left where it was.

    Returns:
        ``{"params", "gflops_per_image", "ms_per_image", "ms_per_image_spread"}`` (the spread:
        interquartile range per image) and ``"batch_size"``, ``"device"`` (the resolved name).
    """
    dev = resolve_device(device)
    size = trunk_size(trunk)
    x = torch.randn(batch_size, *trunk.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    probe = copy.deepcopy(trunk).to(dev).eval()
    x = x.to(dev)
    with torch.inference_mode():
        times = interleaved({"trunk": lambda: probe(x, [POOLED])}, warmup=1, repeats=repeats, device=dev)["trunk"]
    ms = spread(times)
    return {"params": int(size["params"]), "gflops_per_image": float(size["gflops"]),
            "ms_per_image": ms["median"] / batch_size, "ms_per_image_spread": ms["iqr"] / batch_size,
            "batch_size": int(batch_size), "device": str(dev)}


@contextlib.contextmanager
def trunk_run(client: MlflowClient, run_name: str, *, tags: Mapping[str, str] | None = None) -> Iterator[RunLog]:
    """The run of a trunk's training or distillation (experiment ``trunks``), open while it trains.

    Pass it to :func:`register_trunk` as ``run``, which renames it ``trunk-<trunk_id>``
    once the trunk exists. It records MLflow's system metrics (``system/*``) while open
    when psutil is installed, and ends ``FAILED`` when the block raises (then no version
    is registered).

    Args:
        client: from :func:`registry.store.tracking.connect`.
        run_name: its name until registration (``trunk-training``, ``trunk-distill``).
        tags: its starting tags.
    """
    with tracked_run(client, "trunks", run_name=run_name, tags=tags, system_metrics=True) as run:
        yield run


def register_trunk(client: MlflowClient, trunk: Trunk, *, description: str = "",
                   params: Mapping[str, Any] | None = None,
                   metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None,
                   trained_on: SeenImages | None = None, recipe: Mapping[str, Any] | None = None,
                   epoch_metrics: Mapping[int, Mapping[str, float]] | None = None,
                   run: RunLog | None = None, cost_device: str | torch.device = "cpu",
                   cost_batch_size: int = COST_BATCH_SIZE) -> int:
    """Register a trunk as a version of ``trunk``, unless its trunk_id already is one.

    Args:
        client: from :func:`registry.store.tracking.connect`.
        trunk: the trunk to store.
        description: free text on the run and the model version.
        params: extra run params (e.g. training settings).
        metrics: run metrics (e.g. training accuracies).
        tags: extra version tags (e.g. the training recipe's fingerprint).
        trained_on: the images the trunk was trained on, by content; stored as the
            artifact ``trained_on/images.safetensors`` and tagged with its digest, so
            heads and cascades can tell seen validation images from unseen ones. None
            (a trunk from timm or a weights file): unknown.
        recipe: how the trunk was trained (JSON-able): stored as the artifact
            ``recipe.json``, tagged ``recipe_sha``, read back by :func:`trunk_recipe`;
            a refresh starts from it.
        epoch_metrics: per epoch (the step), metrics to log as curves (e.g.
            ``val_accuracy_<task>``); a key logged here, or live into ``run``, is not
            logged again at step 0.
        run: the training job's run (:func:`trunk_run`), opened before training and left
            open: it is renamed ``trunk-<trunk_id>``, gets the version's tags and
            everything is logged into it. None opens and ends a run here (a trunk from
            timm or a weights file).
        cost_device: where ``ms_per_image`` is timed (:func:`measure_trunk_cost`).
        cost_batch_size: images per timed batch.

    Returns:
        The version number: the existing one when a version with the same ``trunk_id``
        exists (the same id means the same features, so a second copy is useless); a
        given ``run`` is then tagged ``trunk_version`` with it and nothing else is logged.
    """
    existing = find_trunk_version(client, trunk.trunk_id)
    if existing is not None:
        if run is not None:
            run.set_tags({"trunk_id": trunk.trunk_id, "trunk_version": str(existing)})
        return existing
    cost = measure_trunk_cost(trunk, device=cost_device, batch_size=cost_batch_size)
    ensure_registered_model(client, TRUNK_MODEL, "Shared image backbones; one version per trunk_id.")
    tags = {**(tags or {}), "trunk_id": trunk.trunk_id, "model_name": trunk.model_name,
            "params": str(cost["params"]), "gflops_per_image": f"{cost['gflops_per_image']:.6g}",
            "ms_per_image": f"{cost['ms_per_image']:.6g}", "cost_batch_size": str(cost["batch_size"]),
            "cost_device": cost["device"]}
    if trained_on is not None:
        tags.update({TRAINED_ON_TAG: trained_on.digest, TRAINED_ON_COUNT_TAG: str(len(trained_on))})
    recipe_text = None
    if recipe is not None:
        recipe_text = json.dumps(recipe, sort_keys=True, indent=2, default=str) + "\n"
        tags[RECIPE_SHA_TAG] = hashlib.sha256(recipe_text.encode()).hexdigest()[:16]
    curves = {int(k): dict(v) for k, v in (epoch_metrics or {}).items()}
    curve_keys = {k for row in curves.values() for k in row}
    run_tags = {**tags, **({"mlflow.note.content": description} if description else {})}
    given = run is not None
    with contextlib.nullcontext(run) if given else tracked_run(client, "trunks", run_name=f"trunk-{trunk.trunk_id}",
                                                               tags=run_tags) as run:
        if given:
            run.rename(f"trunk-{trunk.trunk_id}")
            run.set_tags(run_tags)
        curve_keys |= run.curves
        all_params: dict[str, Any] = {"model_name": trunk.model_name, "trunk_id": trunk.trunk_id,
                                      "preprocess_key": trunk.preprocess_key}
        all_params.update({f"data_config.{k}": v for k, v in trunk.data_config.items()})
        all_params.update({f"model_kwargs.{k}": v for k, v in trunk.model_kwargs.items()})
        all_params.update(params or {})
        figures = {**(metrics or {}), "params": cost["params"], "gflops_per_image": cost["gflops_per_image"],
                   "ms_per_image": cost["ms_per_image"], "ms_per_image_spread": cost["ms_per_image_spread"]}
        run.log(params=all_params, metrics={k: v for k, v in figures.items() if k not in curve_keys})
        run.log_steps(curves)
        if recipe_text is not None:
            with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
                (Path(tmp) / RECIPE_ARTIFACT).write_text(recipe_text)
                run.log_file(Path(tmp) / RECIPE_ARTIFACT)
        with tempfile.TemporaryDirectory(prefix="trunk-") as tmp:
            trunk.save(tmp)
            run.log_folder(tmp, artifact_path=ARTIFACT_PATH)
        if trained_on is not None:
            with tempfile.TemporaryDirectory(prefix="trained-on-") as tmp:
                local = trained_on.save(Path(tmp) / Path(TRAINED_ON_ARTIFACT).name)
                run.log_folder(str(local.parent), artifact_path=str(Path(TRAINED_ON_ARTIFACT).parent))
        mv = client.create_model_version(TRUNK_MODEL, source=f"{run.artifact_uri}/{ARTIFACT_PATH}",
                                         run_id=run.run_id, tags=tags, description=description or None)
    return int(mv.version)


def load_trunk(client: MlflowClient, version: int) -> Trunk:
    """Rebuild ``trunk`` v<version> from its artifacts.

    Raises:
        RegistryError: no such version, or its weights do not hash to its ``trunk_id`` tag.
    """
    mv = get_trunk_version(client, version)
    with tempfile.TemporaryDirectory(prefix="trunk-") as tmp:
        local = client.download_artifacts(mv.run_id, ARTIFACT_PATH, tmp)
        trunk = Trunk.load(Path(local))
    tagged = mv.tags.get("trunk_id")
    if tagged and tagged != trunk.trunk_id:
        raise RegistryError(f"trunk v{version}: tag 'trunk_id' says {tagged} but its weights hash to "
                            f"{trunk.trunk_id}; the stored artifacts were altered")
    return trunk


def _read_recipe(path: Path, sha: str) -> dict[str, Any]:
    text = path.read_text()
    if hashlib.sha256(text.encode()).hexdigest()[:16] != sha:
        raise ValueError(f"{RECIPE_ARTIFACT} does not hash to its tag '{RECIPE_SHA_TAG}' {sha}; "
                         f"the stored artifact was altered")
    return json.loads(text)


def trunk_recipe(client: MlflowClient, version: int) -> dict[str, Any] | None:
    """The recipe ``trunk`` v<version> was trained with (``recipe.json``), or None when it has none.

    A trunk registered from timm or a weights file (or by a platform before recipes were
    stored) has none.

    Raises:
        RegistryError: no such version, or the stored recipe is missing, unreadable, not
            JSON, or does not hash to the version's ``recipe_sha`` tag.
    """
    return tagged_artifact(client, get_trunk_version(client, version), RECIPE_SHA_TAG, RECIPE_ARTIFACT, _read_recipe,
                           f"trunk v{version}", "recipe")


def trunk_trained_on(client: MlflowClient, version: int) -> SeenImages | None:
    """The images ``trunk`` v<version> was trained on (by content), or None when it has no record.

    A trunk registered from timm or a weights file has no record: what it saw is unknown.

    Raises:
        RegistryError: no such version, or the stored set is missing, unreadable or does
            not hash to the version's ``trained_on_digest`` tag.
    """
    return tagged_artifact(client, get_trunk_version(client, version), TRAINED_ON_TAG, TRAINED_ON_ARTIFACT,
                           lambda path, digest: SeenImages.load(path, expected_digest=digest), f"trunk v{version}",
                           "record of training images")
