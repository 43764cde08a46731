"""Trunk versions in MLflow: registered model ``trunk``, one version per ``trunk_id``.

A version's artifacts are exactly what :meth:`trunk.model.Trunk.save` writes
(safetensors weights plus a JSON spec), under the run's artifact path ``trunk``; loading
rebuilds the trunk from them and checks that the weights still hash to the version's
``trunk_id`` tag. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from registry.store.runs import tracked_run
from registry.store.tracking import (
    RegistryError,
    all_pages,
    ensure_registered_model,
    is_not_found,
    run_metrics,
    tagged_artifact,
)
from trunk.model import Trunk
from trunk.seen import SeenImages

TRUNK_MODEL = "trunk"
ARTIFACT_PATH = "trunk"
# What a trunk trained on, by content (trunk.seen): artifact, and version tags naming its digest and size.
TRAINED_ON_ARTIFACT = "trained_on/images.safetensors"
TRAINED_ON_TAG = "trained_on_digest"
TRAINED_ON_COUNT_TAG = "trained_on_images"
# How a trunk was trained (trunk.train settings, augmentation, tasks, model): artifact, and a tag with its hash.
RECIPE_ARTIFACT = "recipe.json"
RECIPE_SHA_TAG = "recipe_sha"

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


def register_trunk(client: MlflowClient, trunk: Trunk, *, description: str = "",
                   params: Mapping[str, Any] | None = None,
                   metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None,
                   trained_on: SeenImages | None = None, recipe: Mapping[str, Any] | None = None,
                   epoch_metrics: Mapping[int, Mapping[str, float]] | None = None) -> int:
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
            ``val_accuracy_<task>``); a key logged here is not logged again at step 0.

    Returns:
        The version number: the existing one when a version with the same ``trunk_id``
        exists (the same id means the same features, so a second copy is useless).
    """
    existing = find_trunk_version(client, trunk.trunk_id)
    if existing is not None:
        return existing
    ensure_registered_model(client, TRUNK_MODEL, "Shared image backbones; one version per trunk_id.")
    tags = {**(tags or {}), "trunk_id": trunk.trunk_id, "model_name": trunk.model_name}
    if trained_on is not None:
        tags.update({TRAINED_ON_TAG: trained_on.digest, TRAINED_ON_COUNT_TAG: str(len(trained_on))})
    recipe_text = None
    if recipe is not None:
        recipe_text = json.dumps(recipe, sort_keys=True, indent=2, default=str) + "\n"
        tags[RECIPE_SHA_TAG] = hashlib.sha256(recipe_text.encode()).hexdigest()[:16]
    curves = {int(k): dict(v) for k, v in (epoch_metrics or {}).items()}
    curve_keys = {k for row in curves.values() for k in row}
    with tracked_run(client, "trunks", run_name=f"trunk-{trunk.trunk_id}",
                     tags={**tags, **({"mlflow.note.content": description} if description else {})}) as run:
        all_params: dict[str, Any] = {"model_name": trunk.model_name, "trunk_id": trunk.trunk_id,
                                      "preprocess_key": trunk.preprocess_key}
        all_params.update({f"data_config.{k}": v for k, v in trunk.data_config.items()})
        all_params.update({f"model_kwargs.{k}": v for k, v in trunk.model_kwargs.items()})
        all_params.update(params or {})
        run.log(params=all_params, metrics={k: v for k, v in (metrics or {}).items() if k not in curve_keys})
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
