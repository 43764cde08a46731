"""Releases: one trunk version plus one version of every head, behind alias ``production``.

A release version is a version of the registered model ``release`` whose run (experiment
``releases``) holds one artifact, ``release.json``::

    {"trunk": {"version": 3, "trunk_id": "..."},
     "heads": {"colour": {"version": 2, "tap": "pooled", "trunk_id": "..."}}, "note": "..."}

Every head in a release shares the trunk's ``trunk_id``. Batch jobs read the alias
``production``; moving it is the promotion. It moves by compare-and-swap: the caller
says which version it expects production to be, the alias is re-read just before it is
set, and if someone else moved it meanwhile nothing changes. For a local SQLite store
a file lock beside the database makes that read-then-set atomic between processes; a
tracking server has no such primitive, so there the window is one round trip.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from heads.store import LoadedHead
from registry.heads import get_head_version, load_head_version, model_name
from registry.tracking import RegistryError, client_uri, ensure_registered_model, experiment_id, is_not_found, \
    sqlite_path
from registry.trunks import get_trunk_version, load_trunk
from trunk.model import Trunk

RELEASE_MODEL = "release"
MANIFEST = "release.json"
PRODUCTION = "production"
CANDIDATE = "candidate"


class ReleaseError(RegistryError):
    """A release cannot be made or moved; production is unchanged."""


@dataclass
class Release:
    """One version of ``release``.

    Attributes:
        version: the ``release`` model version.
        trunk_version: the ``trunk`` version it serves.
        trunk_id: that trunk's id, shared by every head.
        heads: ``{head name: head version}``.
        note: why it was made.
    """

    version: int
    trunk_version: int
    trunk_id: str
    heads: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "trunk_version": self.trunk_version, "trunk_id": self.trunk_id,
                "heads": dict(sorted(self.heads.items())), "note": self.note}


def _alias_version(client: MlflowClient, alias: str) -> int | None:
    try:
        aliases = client.get_registered_model(RELEASE_MODEL).aliases
    except MlflowException as e:
        if is_not_found(e):
            return None
        raise
    version = aliases.get(alias)
    return None if version is None else int(version)


def production_version(client: MlflowClient, alias: str = PRODUCTION) -> int | None:
    """The ``release`` version the alias points at, or None when it points nowhere."""
    return _alias_version(client, alias)


def read_release(client: MlflowClient, version: int) -> Release:
    """Read ``release`` v<version> from its manifest.

    Raises:
        ReleaseError: no such version.
    """
    try:
        mv = client.get_model_version(RELEASE_MODEL, str(int(version)))
    except MlflowException as e:
        if is_not_found(e):
            raise ReleaseError(f"release v{version} does not exist in the registry") from None
        raise
    with tempfile.TemporaryDirectory(prefix="release-") as tmp:
        manifest = json.loads(Path(client.download_artifacts(mv.run_id, MANIFEST, tmp)).read_text())
    return Release(version=int(mv.version), trunk_version=int(manifest["trunk"]["version"]),
                   trunk_id=manifest["trunk"]["trunk_id"],
                   heads={name: int(h["version"]) for name, h in manifest["heads"].items()},
                   note=manifest.get("note", ""))


def get_release(client: MlflowClient, alias: str = PRODUCTION) -> Release | None:
    """The release an alias points at (default ``production``), or None."""
    version = _alias_version(client, alias)
    return None if version is None else read_release(client, version)


@contextlib.contextmanager
def _alias_lock(client: MlflowClient) -> Iterator[None]:
    db = sqlite_path(client_uri(client))
    if db is None:
        yield
        return
    with open(db.with_name(db.name + ".release.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _moved(expected: int | None, current: int | None, alias: str) -> ReleaseError:
    def v(x: int | None) -> str:
        return "none" if x is None else f"v{x}"

    return ReleaseError(f"{alias} moved from {v(expected)} to {v(current)} since you began; nothing changed "
                        f"(re-read {alias} and try again)")


def _manifest(client: MlflowClient, trunk_version: int, heads: Mapping[str, int]) -> dict[str, Any]:
    trunk_id = get_trunk_version(client, trunk_version).tags.get("trunk_id")
    entries: dict[str, Any] = {}
    for name, version in sorted(heads.items()):
        try:
            tags = get_head_version(client, name, version).tags
        except RegistryError as e:
            raise ReleaseError(str(e)) from None
        if tags.get("trunk_id") != trunk_id:
            raise ReleaseError(f"{model_name(name)} v{version} was trained on trunk_id {tags.get('trunk_id')} but "
                               f"the release's trunk is {trunk_id}; retrain it on trunk v{trunk_version}")
        if tags.get("gate") == "failed":
            raise ReleaseError(f"{model_name(name)} v{version} failed its gate; it cannot enter a release "
                               f"(see gate.txt on its run)")
        entries[name] = {"version": int(version), "tap": tags.get("tap"), "trunk_id": tags.get("trunk_id")}
    return {"trunk": {"version": int(trunk_version), "trunk_id": trunk_id}, "heads": entries}


def create_release(client: MlflowClient, trunk_version: int, heads: Mapping[str, int], *,
                   expected_production: int | None, note: str = "", alias: str = PRODUCTION) -> Release:
    """Make a new release version and move the alias to it, by compare-and-swap.

    Args:
        client: from :func:`registry.tracking.connect`.
        trunk_version: the ``trunk`` version it serves.
        heads: ``{head name: head version}``; every one must share the trunk's trunk_id
            and must not have failed its gate.
        expected_production: the version the alias points at now, as the caller last
            read it (None: the alias does not exist yet).
        note: why, stored in the manifest.
        alias: the alias to move (``production``, or ``candidate`` for evaluation).

    Returns:
        The new release, now behind ``alias``.

    Raises:
        ReleaseError: a head is on another trunk_id or failed its gate, a version does
            not exist, or the alias moved since the caller read it. In each case the
            alias is unchanged and no release version is left behind.
    """
    try:
        manifest = _manifest(client, trunk_version, heads)
    except RegistryError as e:
        raise ReleaseError(str(e)) from None
    manifest["note"] = note
    current = _alias_version(client, alias)
    if current != expected_production:
        raise _moved(expected_production, current, alias)

    ensure_registered_model(client, RELEASE_MODEL, "Manifests: one trunk version plus one version of every head.")
    tags = {"trunk_id": manifest["trunk"]["trunk_id"], "trunk_version": str(int(trunk_version))}
    run = client.create_run(experiment_id(client, "releases"), run_name=f"release-trunk-v{trunk_version}",
                            tags={**tags, "heads": ",".join(f"{n}:v{h['version']}" for n, h in
                                                            manifest["heads"].items())})
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="release-") as tmp:
            (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            client.log_artifact(run_id, str(Path(tmp) / MANIFEST))
        mv = client.create_model_version(RELEASE_MODEL, source=f"{run.info.artifact_uri}/{MANIFEST}",
                                         run_id=run_id, tags=tags, description=note or None)
        with _alias_lock(client):
            current = _alias_version(client, alias)
            if current != expected_production:
                # Leave no orphan behind: the caller's release never existed.
                client.delete_model_version(RELEASE_MODEL, mv.version)
                client.delete_run(run_id)
                raise _moved(expected_production, current, alias)
            client.set_registered_model_alias(RELEASE_MODEL, alias, mv.version)
    except BaseException:
        with contextlib.suppress(MlflowException):
            client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return Release(version=int(mv.version), trunk_version=int(trunk_version), trunk_id=tags["trunk_id"],
                   heads={n: h["version"] for n, h in manifest["heads"].items()}, note=note)


def promote_head(client: MlflowClient, name: str, version: int) -> Release:
    """Put ``head.<name>`` v<version> into production: the production trunk, every current
    production head, and this one (replacing an older version of the same head).

    Raises:
        ReleaseError: no production release yet, a trunk_id mismatch, a failed gate, or
            production moved meanwhile.
    """
    prod = get_release(client, PRODUCTION)
    if prod is None:
        raise ReleaseError(f"there is no production release yet, so {model_name(name)} v{version} has no trunk to "
                           f"join; bootstrap one with a trunk first (registry.releases.bootstrap_release)")
    heads = {**prod.heads, name: int(version)}
    return create_release(client, prod.trunk_version, heads, expected_production=prod.version,
                          note=f"promote {model_name(name)} v{version}")


def bootstrap_release(client: MlflowClient, trunk_version: int) -> Release:
    """A release of a trunk with no heads, made production.

    Used when production does not exist yet, or to switch to a new trunk with zero heads.
    """
    return create_release(client, trunk_version, {}, expected_production=production_version(client),
                          note=f"bootstrap trunk v{trunk_version}")


def load_release(client: MlflowClient, release: Release) -> tuple[Trunk, dict[str, LoadedHead]]:
    """The trunk and every head of a release, ready to run.

    Raises:
        ReleaseError: a loaded head's trunk_id differs from the loaded trunk's.
    """
    trunk = load_trunk(client, release.trunk_version)
    heads: dict[str, LoadedHead] = {}
    for name, version in sorted(release.heads.items()):
        head = load_head_version(client, name, version)
        if head.meta.get("trunk_id") != trunk.trunk_id:
            raise ReleaseError(f"{model_name(name)} v{version} was trained on trunk_id {head.meta.get('trunk_id')} "
                               f"but release v{release.version}'s trunk is {trunk.trunk_id}")
        heads[name] = head
    return trunk, heads
