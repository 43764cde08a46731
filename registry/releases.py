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

Every release made for ``production`` carries the version tag ``previous_production``:
the version production pointed at when it moved there (``none`` for the first). That
chain is what :func:`rollback` follows: it moves production back to an existing,
consistent release (by the same compare-and-swap, :func:`move_alias`) and tags the
release it returned to with ``rolled_back_from``. Nothing is deleted, so a rollback can
itself be undone with ``rollback(client, to=<version>)``.
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
# Version tags: where production pointed before it moved to this release ("none" for the
# first), and which release production left when a rollback returned to this one.
PREVIOUS_PRODUCTION = "previous_production"
ROLLED_BACK_FROM = "rolled_back_from"
# Tags the platform sets itself; callers' extra tags may not overwrite them.
_RESERVED_TAGS = frozenset({"trunk_id", "trunk_version", "heads", PREVIOUS_PRODUCTION, ROLLED_BACK_FROM})


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
                   expected_production: int | None, note: str = "", alias: str = PRODUCTION,
                   tags: Mapping[str, str] | None = None) -> Release:
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
        tags: extra tags for the new version and its run (e.g. a refresh cascade's id);
            they may not use the platform's own keys (``trunk_id``, ``trunk_version``,
            ``heads``, ``previous_production``, ``rolled_back_from``). For
            ``production`` the version also gets ``previous_production``: the version
            the alias pointed at when it moved here (``none`` when there was none).

    Returns:
        The new release, now behind ``alias``.

    Raises:
        ReleaseError: a head is on another trunk_id or failed its gate, a version does
            not exist, an extra tag uses a reserved key, or the alias moved since the
            caller read it. In each case the alias is unchanged and no release version
            is left behind.
    """
    extra = {str(k): str(v) for k, v in (tags or {}).items()}
    reserved = sorted(_RESERVED_TAGS.intersection(extra))
    if reserved:
        raise ReleaseError(f"tag(s) {', '.join(reserved)} are set by the platform; pick other keys for extra "
                           f"release tags")
    try:
        manifest = _manifest(client, trunk_version, heads)
    except RegistryError as e:
        raise ReleaseError(str(e)) from None
    manifest["note"] = note
    current = _alias_version(client, alias)
    if current != expected_production:
        raise _moved(expected_production, current, alias)

    ensure_registered_model(client, RELEASE_MODEL, "Manifests: one trunk version plus one version of every head.")
    tags = {**extra, "trunk_id": manifest["trunk"]["trunk_id"], "trunk_version": str(int(trunk_version))}
    version_tags = dict(tags)
    if alias == PRODUCTION:
        # The swap below only happens while the alias still points at expected_production,
        # so this is exactly where production was when it moved here.
        version_tags[PREVIOUS_PRODUCTION] = "none" if expected_production is None else str(int(expected_production))
    run = client.create_run(experiment_id(client, "releases"), run_name=f"release-trunk-v{trunk_version}",
                            tags={**tags, "heads": ",".join(f"{n}:v{h['version']}" for n, h in
                                                            manifest["heads"].items())})
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="release-") as tmp:
            (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            client.log_artifact(run_id, str(Path(tmp) / MANIFEST))
        mv = client.create_model_version(RELEASE_MODEL, source=f"{run.info.artifact_uri}/{MANIFEST}",
                                         run_id=run_id, tags=version_tags, description=note or None)
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


def _release_versions(client: MlflowClient, filter_string: str) -> list[Any]:
    """Every ``release`` model version matching the filter, across result pages."""
    found: list[Any] = []
    token = None
    while True:
        try:
            page = client.search_model_versions(filter_string, page_token=token)
        except MlflowException as e:
            if is_not_found(e):
                return []
            raise
        found.extend(page)
        token = page.token
        if not token:
            return found


def find_releases_by_tag(client: MlflowClient, key: str, value: str) -> list[int]:
    """The ``release`` versions whose tag ``key`` equals ``value``.

    Args:
        client: from :func:`registry.tracking.connect`.
        key: a version tag, e.g. an extra tag given to :func:`create_release`.
        value: the exact value to match.

    Returns:
        Version numbers, ascending; empty when none match or ``release`` does not exist yet.
    """
    key, value = str(key), str(value)
    quote = "'" if "'" not in value else '"'
    if "`" in key or quote in value:
        # MLflow's filter grammar cannot quote this; match on our side instead.
        found = [mv for mv in _release_versions(client, f"name='{RELEASE_MODEL}'") if mv.tags.get(key) == value]
    else:
        found = _release_versions(client, f"name='{RELEASE_MODEL}' and tags.`{key}`={quote}{value}{quote}")
    return sorted(int(mv.version) for mv in found)


def _consistent_release(client: MlflowClient, version: int) -> Release:
    """Read ``release`` v<version> and check it can still serve as it is.

    Raises:
        ReleaseError: it does not exist, its manifest cannot be read, its trunk or one
            of its head versions is gone, a head's trunk_id differs from the trunk's, a
            head failed its gate, or the trunk's trunk_id is not the one recorded.
    """
    try:
        release = read_release(client, version)
    except (MlflowException, OSError, KeyError, TypeError, ValueError) as e:
        raise ReleaseError(f"release v{version}'s manifest cannot be read: {str(e).splitlines()[0]}") from None
    try:
        manifest = _manifest(client, release.trunk_version, release.heads)
    except RegistryError as e:
        raise ReleaseError(f"release v{release.version} is not consistent: {e}") from None
    if manifest["trunk"]["trunk_id"] != release.trunk_id:
        raise ReleaseError(f"release v{release.version} is not consistent: it recorded trunk_id {release.trunk_id} "
                           f"for trunk v{release.trunk_version}, which is now tagged {manifest['trunk']['trunk_id']}")
    return release


def move_alias(client: MlflowClient, version: int, *, expected: int | None, alias: str = PRODUCTION,
               note: str = "") -> Release:
    """Point the alias at an existing release version, by compare-and-swap.

    The release is checked first: its trunk version and every head version must exist,
    every head's ``trunk_id`` must equal the trunk's, and no head may have failed its
    gate. The alias is then re-read under the same lock :func:`create_release` uses and
    moved only if it still points at ``expected``.

    Args:
        client: from :func:`registry.tracking.connect`.
        version: the ``release`` version to move the alias to.
        expected: the version the alias points at now, as the caller last read it (None:
            the alias does not exist yet).
        alias: the alias to move (default ``production``).
        note: why; when given, stored on the target version as tag ``<alias>_note``.

    Returns:
        The release now behind ``alias``.

    Raises:
        ReleaseError: the release does not exist or is not consistent, or the alias
            moved since the caller read it. In each case nothing changes.
    """
    target = _consistent_release(client, version)
    current = _alias_version(client, alias)
    if current != expected:
        raise _moved(expected, current, alias)
    with _alias_lock(client):
        current = _alias_version(client, alias)
        if current != expected:
            raise _moved(expected, current, alias)
        client.set_registered_model_alias(RELEASE_MODEL, alias, str(target.version))
    if note:
        client.set_model_version_tag(RELEASE_MODEL, str(target.version), f"{alias}_note", note)
    return target


def _previous_release(client: MlflowClient, current: int) -> int:
    """Where a rollback from ``release`` v<current> goes when no version is named."""
    tag = client.get_model_version(RELEASE_MODEL, str(current)).tags.get(PREVIOUS_PRODUCTION)
    if tag == "none":
        raise ReleaseError(f"release v{current} was the first production release (previous_production is none); "
                           f"there is nothing to roll back to (pass to=<version> to pick a release)")
    if tag is not None:
        try:
            previous = int(tag)
        except ValueError:
            raise ReleaseError(f"release v{current} has tag previous_production='{tag}', not a version number; "
                               f"pass to=<version> to pick a release") from None
        try:
            _consistent_release(client, previous)
        except ReleaseError as e:
            raise ReleaseError(f"cannot roll back from release v{current} to its previous production v{previous}: "
                               f"{e} (pass to=<version> to pick another release)") from None
        return previous
    # Releases made before previous_production existed: the newest older one that can serve.
    older = sorted((int(mv.version) for mv in _release_versions(client, f"name='{RELEASE_MODEL}'")
                    if int(mv.version) < current), reverse=True)
    for version in older:
        try:
            _consistent_release(client, version)
        except ReleaseError:
            continue
        return version
    raise ReleaseError(f"release v{current} has no previous_production tag and no consistent release below it; "
                       f"there is nothing to roll back to")


def rollback(client: MlflowClient, to: int | None = None) -> tuple[Release, Release]:
    """Move ``production`` back to an earlier release, by compare-and-swap.

    Without ``to``, production goes to the version in the current release's
    ``previous_production`` tag; for releases made before that tag existed, to the
    highest release version below the current one that is still consistent. A second
    rollback follows the restored release's own ``previous_production``, and so on back.
    The restored version gets the tag ``rolled_back_from=<the version production left>``.

    Args:
        client: from :func:`registry.tracking.connect`.
        to: the ``release`` version to restore; default: the previous production.

    Returns:
        ``(from, to)``: the release production left and the one it now points at.

    Raises:
        ReleaseError: there is no production release, nothing to roll back to, ``to`` is
            production already, the target is missing or not consistent (see
            :func:`move_alias`), or production moved meanwhile. Production is then unchanged.
    """
    current = production_version(client, PRODUCTION)
    if current is None:
        raise ReleaseError("there is no production release, so there is nothing to roll back")
    target = _previous_release(client, current) if to is None else int(to)
    if target == current:
        raise ReleaseError(f"release v{current} is production already; name another version to roll back to")
    source = read_release(client, current)
    restored = move_alias(client, target, expected=current, alias=PRODUCTION)
    client.set_model_version_tag(RELEASE_MODEL, str(restored.version), ROLLED_BACK_FROM, str(current))
    return source, restored


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
