"""Releases: one trunk version plus one version of every head, behind alias ``production``.

A release version is a version of the registered model ``release`` whose run (experiment
``releases``) holds the manifest ``release.json``::

    {"trunk": {"version": 3, "trunk_id": "..."},
     "heads": {"colour": {"version": 2, "tap": "pooled", "trunk_id": "..."}}, "note": "..."}

and, for a release with heads, the artifact ``model/``: the release as a self-contained
MLflow pyfunc model (:mod:`registry.serving`: the trunk's files and every head in one
pack, ``heads.safetensors`` + ``heads.json``, checked against their recorded hashes, plus a
manifest of their sha256), which is the version's ``source``, so
``mlflow.pyfunc.load_model("models:/release@production")`` and ``mlflow models serve`` run
it. ``release.json`` then also says where that pack is and its sha256: ``"pack": {"dir":
"model/artifacts/bundle", "files": {"heads.json": ..., "heads.safetensors": ...}}``. A new
release takes the heads it keeps from the pack of the release it replaces, and
:func:`load_release` reads a release's heads from its pack: a constant number of requests
whatever the head count (each head still checked against the hashes its version recorded). Releases made before this (source ``release.json``) and a
bootstrap release with no heads have no model; :func:`read_release` reads every one.

What the registry UI shows: a release version's description names why it was made, its
trunk and every head with version and tap (:func:`release_description`), its tags
``heads`` (``colour:v2,shape:v1``) and ``head_count`` say the same, and the trunk version and
every head version production serves carry alias ``production`` on their own models,
moved with each promotion and rollback (:func:`mark_serving`; a sweep,
:func:`sync_serving_aliases`, repairs markers a killed promoter left behind).

Every head in a release shares the trunk's ``trunk_id``. Batch jobs read the alias
``production``; moving it is the promotion. It moves by compare-and-swap: the caller
says which version it expects production to be, the alias is re-read under the
promotion lock and set only if it still points there. The lock (:mod:`registry.store.lease`)
is a ticket queue with a lease, built on the one thing every store numbers atomically,
model versions, so it works the same on a local SQLite store and through a tracking
server; a crashed promoter blocks the others for at most one lease. Everything that
moves an alias of ``release`` (:func:`create_release`, :func:`promote_head`,
:func:`move_alias`, :func:`rollback`) holds it, and a release version is created only
while its promoter holds it.

:func:`promote_head` is the team's promotion: under the lock it re-reads production and
builds the release on top of whatever production is then (its heads plus this head's
new version), so a promotion that lost the race to another team is rebuilt, not
dropped. It is refused only when the same head moved meanwhile (another version of it
reached production since the caller started) or the trunk changed under it.

Leftovers of a promoter killed mid-way (a ``release`` run still RUNNING, a version that
never became production) are marked, never deleted: the next holder of the lock that
finds a dead ticket, and :func:`reap_leftovers` (run by ``tools.report``), set such runs
to KILLED and tag them and their versions ``orphan=true``; a run whose release is
serving is set FINISHED. Moving production to an orphan (a refresh cascade resuming
after a crash) clears the tag.

Every release made for ``production`` carries the version tag ``previous_production``:
the version production pointed at when it moved there (``none`` for the first). That
chain is what :func:`rollback` follows: it moves production back to an existing,
consistent release (by the same compare-and-swap, :func:`move_alias`) and tags the
release it returned to with ``rolled_back_from``. Nothing is deleted, so a rollback can
itself be undone with ``rollback(client, to=<version>)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from heads.store import HeadArtifactError, LoadedHead
from registry.serving.pack import PackSource
from registry.serving.package import build_release_model, fetch_pack, release_pack
from registry.serving.runtime import ServingError
from registry.store.heads import recorded_digests, head_versions, load_head_version, model_name
from registry.store.lease import Lease, LeaseError, hold
from registry.store.tracking import (
    RegistryError,
    all_pages,
    client_cache,
    ensure_registered_model,
    experiment_id,
    fetch_artifact,
    is_not_found,
)
from registry.store.trunks import TRUNK_MODEL, get_trunk_version, load_trunk
from trunk.model import Trunk

log = logging.getLogger(__name__)

RELEASE_MODEL = "release"
MANIFEST = "release.json"
# The run artifact holding the release as an MLflow pyfunc model (registry.serving); the version's source.
MODEL_ARTIFACT = "model"
# release.json's key for where that model keeps its heads pack: {"dir": <run artifact path>, "files": {name: sha256}}.
PACK = "pack"
PRODUCTION = "production"
CANDIDATE = "candidate"
# Version tags: where production pointed before it moved to this release ("none" for the
# first), and which release production left when a rollback returned to this one.
PREVIOUS_PRODUCTION = "previous_production"
ROLLED_BACK_FROM = "rolled_back_from"
# On a release version and its run left behind by a promoter that died before production moved.
ORPHAN = "orphan"
# Tags the platform sets itself; callers' extra tags may not overwrite them.
_RESERVED_TAGS = frozenset({"trunk_id", "trunk_version", "heads", "head_count", PREVIOUS_PRODUCTION,
                            ROLLED_BACK_FROM, ORPHAN})


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
    # release.json as read (its per-head entries: version, tap, trunk_id); not part of equality.
    manifest: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # The version's source (``<run>/model`` or ``<run>/release.json``); "" when not known.
    source: str = field(default="", repr=False, compare=False)

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
    manifest = _read_manifest(client, mv)
    return Release(version=int(mv.version), trunk_version=int(manifest["trunk"]["version"]),
                   trunk_id=manifest["trunk"]["trunk_id"],
                   heads={name: int(h["version"]) for name, h in manifest["heads"].items()},
                   note=manifest.get("note", ""), manifest=manifest, source=str(mv.source or ""))


def _read_manifest(client: MlflowClient, mv: Any) -> dict[str, Any]:
    """A release version's ``release.json``: one request, then kept for the client's life.

    The manifest is logged before its version is created and never rewritten, so the copy
    kept per run cannot go stale. It is fetched by URI beside the version's source
    (``<run>/model`` or ``<run>/release.json``).
    """
    cache = client_cache(client, "release_manifests")
    if mv.run_id in cache:
        return cache[mv.run_id]
    source = str(mv.source or "").rstrip("/")
    with tempfile.TemporaryDirectory(prefix="release-") as tmp:
        if source.endswith(f"/{MANIFEST}") or source.endswith(f"/{MODEL_ARTIFACT}"):
            uri = f"{source.rpartition('/')[0]}/{MANIFEST}"
            local = fetch_artifact(client, uri, Path(tmp) / MANIFEST)
        else:  # a source this platform did not write: MLflow's own look-up
            local = Path(client.download_artifacts(mv.run_id, MANIFEST, tmp))
        manifest = json.loads(local.read_text())
    cache[mv.run_id] = manifest
    return manifest


def get_release(client: MlflowClient, alias: str = PRODUCTION) -> Release | None:
    """The release an alias points at (default ``production``), or None."""
    version = _alias_version(client, alias)
    return None if version is None else read_release(client, version)


@contextlib.contextmanager
def _alias_lock(client: MlflowClient, purpose: str) -> Iterator[Lease]:
    """Hold the promotion lock (:func:`registry.store.lease.hold`); mark what dead holders left behind."""
    try:
        with hold(client, purpose=purpose) as lease:
            if lease.reaped:
                # A ticket was taken from a dead or expired contender: it may have died
                # half-way through creating a release. Nobody else creates one now.
                _mark_leftovers(client)
            yield lease
    except LeaseError as e:
        raise ReleaseError(str(e)) from None


class ProductionMoved(ReleaseError):
    """The alias no longer points where the caller expected; nothing changed."""


def _base_release(client: MlflowClient, version: int | None) -> Release | None:
    """``release`` v<version> to build the next release on, or None (no version, or it cannot be read:
    the next release is then built from its heads' own files)."""
    if version is None:
        return None
    try:
        return read_release(client, version)
    except (MlflowException, OSError, KeyError, TypeError, ValueError) as e:
        log.warning("release v%s cannot be read (%s); the new release is built from its heads' own files", version,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def _pack_source(client: MlflowClient, release: Release) -> PackSource | None:
    """Where ``release`` keeps its heads pack, as its ``release.json`` records it; None for a
    release made before packs (its model holds each head's files) or one with no model."""
    pack = release.manifest.get(PACK)
    if not isinstance(pack, dict) or not isinstance(pack.get("dir"), str) or not isinstance(pack.get("files"), dict):
        return None
    source = release.source or str(client.get_model_version(RELEASE_MODEL, str(release.version)).source or "")
    root, _, tail = source.rstrip("/").rpartition("/")
    if tail != MODEL_ARTIFACT:
        return None
    return PackSource(uri=f"{root}/{pack['dir']}", files=dict(pack["files"]), heads=dict(release.heads),
                      label=f"release v{release.version}")


def _require_alias(client: MlflowClient, alias: str, expected: int | None) -> None:
    """Raise :class:`ProductionMoved` unless ``alias`` still points at ``expected``."""
    current = _alias_version(client, alias)
    if current != expected:
        raise _moved(expected, current, alias)


def _moved(expected: int | None, current: int | None, alias: str) -> ReleaseError:
    def v(x: int | None) -> str:
        return "none" if x is None else f"v{x}"

    return ProductionMoved(f"{alias} moved from {v(expected)} to {v(current)} since you began; nothing changed "
                           f"(re-read {alias} and try again)")


def _manifest(client: MlflowClient, trunk_version: int, heads: Mapping[str, int]) -> dict[str, Any]:
    trunk_id = get_trunk_version(client, trunk_version).tags.get("trunk_id")
    entries: dict[str, Any] = {}
    try:
        # One search per 100 heads (versions seen before by this client: none), not a call per head.
        versions = head_versions(client, heads)
    except RegistryError as e:
        raise ReleaseError(str(e)) from None
    for name, version in sorted(heads.items()):
        tags = versions[name].tags
        if tags.get("trunk_id") != trunk_id:
            raise ReleaseError(f"{model_name(name)} v{version} was trained on trunk_id {tags.get('trunk_id')} but "
                               f"the release's trunk is {trunk_id}; retrain it on trunk v{trunk_version}")
        if tags.get("gate") == "failed":
            raise ReleaseError(f"{model_name(name)} v{version} failed its gate; it cannot enter a release "
                               f"(see gate.txt on its run)")
        entries[name] = {"version": int(version), "tap": tags.get("tap"), "trunk_id": tags.get("trunk_id")}
    return {"trunk": {"version": int(trunk_version), "trunk_id": trunk_id}, "heads": entries}


def _checked_manifest(client: MlflowClient, trunk_version: int, heads: Mapping[str, int]) -> dict[str, Any]:
    try:
        return _manifest(client, trunk_version, heads)
    except RegistryError as e:
        raise ReleaseError(str(e)) from None


def _extra_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    extra = {str(k): str(v) for k, v in (tags or {}).items()}
    reserved = sorted(_RESERVED_TAGS.intersection(extra))
    if reserved:
        raise ReleaseError(f"tag(s) {', '.join(reserved)} are set by the platform; pick other keys for extra "
                           f"release tags")
    return extra


# MLflow's limit on a model version's description and tag values in the SQL stores is 5000
# characters; the lists below stop short of it (release.json always holds them whole).
_LIST_LIMIT = 4000


def _listed(items: list[str], limit: int = _LIST_LIMIT) -> str:
    """``items`` joined by ", ", cut before ``limit`` characters with how many were left out."""
    text, shown = "", 0
    for item in items:
        candidate = f"{text}, {item}" if text else item
        if len(candidate) > limit:
            return f"{text}, ... and {len(items) - shown} more (release.json lists them all)"
        text, shown = candidate, shown + 1
    return text


def release_description(manifest: Mapping[str, Any], note: str = "") -> str:
    """A release version's description, as the registry UI shows it: why, its trunk and every head.

    For example::

        promote head.colour v2

        trunk v3 (trunk_id 1f2e...)
        5 heads: colour v2 (pooled), count v1 (pooled), count_branch v1 (layer2), ...
    """
    heads = manifest["heads"]
    trunk = manifest["trunk"]
    listed = _listed([f"{n} v{h['version']} ({h.get('tap')})" for n, h in sorted(heads.items())]) or "none"
    lines = [note, ""] if note else []
    lines += [f"trunk v{trunk['version']} (trunk_id {trunk['trunk_id']})", f"{len(heads)} heads: {listed}"]
    return "\n".join(lines)


def contents_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Version tags naming what a release holds: ``heads`` (``colour:v2,shape:v1``) and ``head_count``."""
    heads = manifest["heads"]
    return {"heads": _listed([f"{n}:v{h['version']}" for n, h in sorted(heads.items())]).replace(", ", ","),
            "head_count": str(len(heads))}


def _set_alias(client: MlflowClient, model: str, alias: str, version: int | None) -> None:
    if version is None:
        with contextlib.suppress(MlflowException):  # gone already
            client.delete_registered_model_alias(model, alias)
    else:
        client.set_registered_model_alias(model, alias, str(int(version)))


def mark_serving(client: MlflowClient, release: Release, *, previous: int | None | Release = None) -> list[str]:
    """Move alias ``production`` of ``trunk`` and of every ``head.<name>`` to the versions ``release`` serves.

    The alias on ``release`` is the one pointer batch jobs read; these follow it so that the
    registry's model list shows, per model, which version serves. Only the models whose
    serving version changed against ``previous`` (the release production left, as a version
    or a :class:`Release`) are touched; a head that left the release loses the alias. With
    ``previous=None`` every head model is compared (a full resync). A marker that cannot be
    moved is logged and left for the next promotion or ``tools.report`` to repair
    (:func:`sync_serving_aliases`): production itself has already moved.

    Returns:
        The models whose alias moved, e.g. ``["head.colour", "trunk"]``.
    """
    try:
        if isinstance(previous, Release):
            before = previous
        elif previous is not None:
            before = read_release(client, int(previous))
        else:
            before = None
        if before is None:
            served = _serving_aliases(client)
            old_heads, old_trunk = served["heads"], served["trunk"]
        else:
            old_heads, old_trunk = dict(before.heads), before.trunk_version
        moved = []
        for name in sorted(set(old_heads) | set(release.heads)):
            if old_heads.get(name) != release.heads.get(name):
                _set_alias(client, model_name(name), PRODUCTION, release.heads.get(name))
                moved.append(model_name(name))
        if old_trunk != release.trunk_version:
            _set_alias(client, TRUNK_MODEL, PRODUCTION, release.trunk_version)
            moved.append(TRUNK_MODEL)
        return moved
    except (MlflowException, ReleaseError) as e:
        log.warning("production moved to release v%s, but the production markers on its trunk and heads did not "
                    "all follow (%s); the next promotion or tools.report repairs them", release.version,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return []


def _serving_aliases(client: MlflowClient) -> dict[str, Any]:
    """Where alias ``production`` points today on every ``head.<name>`` and on ``trunk``."""
    heads: dict[str, int] = {}
    for rm in all_pages(client.search_registered_models, "name LIKE 'head.%'"):
        version = rm.aliases.get(PRODUCTION)
        if version is not None:
            heads[rm.name[len("head."):]] = int(version)
    try:
        trunk = client.get_registered_model(TRUNK_MODEL).aliases.get(PRODUCTION)
    except MlflowException as e:
        if not is_not_found(e):
            raise
        trunk = None
    return {"heads": heads, "trunk": None if trunk is None else int(trunk)}


def sync_serving_aliases(client: MlflowClient) -> list[str]:
    """Repair the ``production`` markers on ``trunk`` and the heads against release@production.

    Run by ``tools.report`` (through :func:`reap_leftovers`); cheap when nothing drifted (one
    search of the head models). Returns the models whose alias moved.
    """
    current = get_release(client, PRODUCTION)
    if current is None:
        return []
    return mark_serving(client, current, previous=None)


def _make_release(client: MlflowClient, lease: Lease, manifest: dict[str, Any], *, expected: int | None,
                  note: str, alias: str, extra: Mapping[str, str], before: Release | None = None) -> Release:
    """Create the release version and move ``alias`` to it; the caller holds the lock and has
    checked that the alias points at ``expected``.

    A release with heads is also written as an MLflow pyfunc model (run artifact ``model/``,
    the version's source; :func:`registry.serving.build_release_model`), from the trunk's
    and heads' files checked against their recorded hashes; a file that fails the check
    refuses the release (:class:`ReleaseError`). Its heads are one pack; those ``before``
    (the release the alias pointed at) holds in the same version are taken from its pack,
    so a promotion downloads that pack and the promoted head's files, not every head's.

    If anything fails before the alias moves (the lease is lost, the store errs, a file
    fails its check), the version and its run are withdrawn: nothing is left behind.
    """
    trunk_version = int(manifest["trunk"]["version"])
    manifest = {**manifest, "note": note}
    ensure_registered_model(client, RELEASE_MODEL, "Manifests: one trunk version plus one version of every head.")
    tags = {**extra, "trunk_id": manifest["trunk"]["trunk_id"], "trunk_version": str(trunk_version)}
    version_tags = dict(tags)
    if alias == PRODUCTION:
        # Checked under the lock we hold: exactly where production is when it moves here.
        version_tags[PREVIOUS_PRODUCTION] = "none" if expected is None else str(int(expected))
    run = client.create_run(experiment_id(client, "releases"), run_name=f"release-trunk-v{trunk_version}",
                            tags={**tags, "heads": ",".join(f"{n}:v{h['version']}" for n, h in
                                                            manifest["heads"].items())})
    run_id, mv = run.info.run_id, None
    try:
        with tempfile.TemporaryDirectory(prefix="release-") as tmp:
            source = f"{run.info.artifact_uri}/{MANIFEST}"
            if manifest["heads"]:
                # The release as an MLflow pyfunc model: trunk and heads copied in, verified;
                # heads that ``before`` holds in the same version come from its pack.
                # Copying the weights takes a while: start it on a full lease (VTP_PROMOTION_LEASE_S).
                lease.check()
                lease.renew()
                model = Path(tmp) / MODEL_ARTIFACT
                try:
                    build_release_model(client, manifest, model,
                                        base=None if before is None else _pack_source(client, before))
                    pack = release_pack(model)
                except (ServingError, HeadArtifactError, RegistryError) as e:
                    raise ReleaseError(f"the release's pyfunc model cannot be built: {e}") from None
                manifest = {**manifest, PACK: {"dir": f"{MODEL_ARTIFACT}/{pack['dir']}", "files": pack["files"]}}
                source = f"{run.info.artifact_uri}/{MODEL_ARTIFACT}"
            (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            client.log_artifact(run_id, str(Path(tmp) / MANIFEST))
            if manifest["heads"]:
                client.log_artifacts(run_id, str(Path(tmp) / MODEL_ARTIFACT), MODEL_ARTIFACT)
        mv = client.create_model_version(RELEASE_MODEL, source=source, run_id=run_id,
                                         tags={**version_tags, **contents_tags(manifest)},
                                         description=release_description(manifest, note))
        lease.check()
        client.set_registered_model_alias(RELEASE_MODEL, alias, mv.version)
    except BaseException:
        # The alias did not move: the caller's release never existed.
        with contextlib.suppress(MlflowException):
            # Unless the store applied the move before failing: then it serves, withdraw nothing.
            if mv is None or _alias_version(client, alias) != int(mv.version):
                if mv is not None:
                    client.delete_model_version(RELEASE_MODEL, mv.version)
                client.set_terminated(run_id, "FAILED")
                client.delete_run(run_id)
        raise
    client.set_terminated(run_id, "FINISHED")
    made = Release(version=int(mv.version), trunk_version=trunk_version, trunk_id=tags["trunk_id"],
                   heads={n: h["version"] for n, h in manifest["heads"].items()}, note=note, manifest=manifest,
                   source=source)
    client_cache(client, "release_manifests")[run_id] = manifest
    if alias == PRODUCTION:
        # ``before`` is release v<expected>, read under the lock: no second read of it.
        mark_serving(client, made, previous=before if before is not None and before.version == expected
                     else expected)
    return made


def create_release(client: MlflowClient, trunk_version: int, heads: Mapping[str, int], *,
                   expected_production: int | None, note: str = "", alias: str = PRODUCTION,
                   tags: Mapping[str, str] | None = None) -> Release:
    """Make a new release version and move the alias to it, by compare-and-swap.

    The alias is re-read under the promotion lock and the release is made only if it
    still points at ``expected_production``; two callers expecting the same version can
    never both succeed, on any store.

    Args:
        client: from :func:`registry.store.tracking.connect`.
        trunk_version: the ``trunk`` version it serves.
        heads: ``{head name: head version}``; every one must share the trunk's trunk_id
            and must not have failed its gate.
        expected_production: the version the alias points at now, as the caller last
            read it (None: the alias does not exist yet).
        note: why, stored in the manifest.
        alias: the alias to move (``production``, or ``candidate`` for evaluation).
        tags: extra tags for the new version and its run (e.g. a refresh cascade's id);
            they may not use the platform's own keys (``trunk_id``, ``trunk_version``,
            ``heads``, ``previous_production``, ``rolled_back_from``, ``orphan``). For
            ``production`` the version also gets ``previous_production``: the version
            the alias pointed at when it moved here (``none`` when there was none).

    Returns:
        The new release, now behind ``alias``.

    Raises:
        ReleaseError: a head is on another trunk_id or failed its gate, a version does
            not exist, an extra tag uses a reserved key, the lock could not be held, or
            the alias moved since the caller read it (:class:`ProductionMoved`). In each
            case the alias is unchanged and no release version is left behind.
    """
    extra = _extra_tags(tags)
    manifest = _checked_manifest(client, trunk_version, heads)
    _require_alias(client, alias, expected_production)
    with _alias_lock(client, f"create release ({note or alias})") as lease:
        _require_alias(client, alias, expected_production)
        # What the alias points at now: its pack holds the heads this release keeps (and,
        # for production, it is what mark_serving compares against).
        before = _base_release(client, expected_production) if manifest["heads"] or alias == PRODUCTION else None
        return _make_release(client, lease, manifest, expected=expected_production, note=note, alias=alias,
                             extra=extra, before=before)


def promote_head(client: MlflowClient, name: str, version: int, *, started_from: Release | None = None) -> Release:
    """Put ``head.<name>`` v<version> into production: the production trunk, every current
    production head, and this one (replacing an older version of the same head).

    Under the promotion lock production is read again: if another promotion landed since
    ``started_from``, the release is rebuilt on top of it (its heads plus this one) rather
    than refused. It is refused when this head itself moved meanwhile: production then
    holds a version of it other than the one it held in ``started_from``.

    Args:
        client: from :func:`registry.store.tracking.connect`.
        name: the head.
        version: the ``head.<name>`` version to promote.
        started_from: production as the caller saw it when its work began (a training
            job: before training); default: production as read on entry here.

    Returns:
        The release now behind ``production`` (production itself when another promotion
        put this very version there meanwhile).

    Raises:
        ReleaseError: no production release yet, a trunk_id mismatch (production moved
            to another trunk), a failed gate, the same head moved meanwhile, or the lock
            could not be held. Production is then unchanged.
    """
    prod = get_release(client, PRODUCTION)
    if prod is None:
        raise ReleaseError(f"there is no production release yet, so {model_name(name)} v{version} has no trunk to "
                           f"join; bootstrap one with a trunk first (registry.store.releases.bootstrap_release)")
    version, base = int(version), started_from or prod
    note = f"promote {model_name(name)} v{version}"
    # Built before queueing for the lock, so the lock is held for one write when nothing moved.
    manifest = _checked_manifest(client, prod.trunk_version, {**prod.heads, name: version})
    with _alias_lock(client, note) as lease:
        current = get_release(client, PRODUCTION)
        if current is None:
            raise ReleaseError(f"production was removed while promoting {model_name(name)} v{version}; nothing changed")
        was, now = base.heads.get(name), current.heads.get(name)
        if now != was and now == version:
            return current  # someone promoted this very version meanwhile: it is there
        if now != was:
            def v(x: int | None) -> str:
                return "none" if x is None else f"v{x}"

            raise ReleaseError(f"{model_name(name)} moved in production from {v(was)} to {v(now)} since this job "
                               f"started (release v{base.version} -> v{current.version}); v{version} was not "
                               f"promoted: compare it with {v(now)} and promote again if it should replace it")
        if current.version != prod.version:
            log.info("production moved from v%s to v%s while %s waited; rebuilding on top of it", prod.version,
                     current.version, note)
            manifest = _checked_manifest(client, current.trunk_version, {**current.heads, name: version})
        elif current.version != base.version:
            log.info("production moved from v%s to v%s since %s started; building on top of it", base.version,
                     current.version, note)
        return _make_release(client, lease, manifest, expected=current.version, note=note, alias=PRODUCTION,
                             extra={}, before=current)


def bootstrap_release(client: MlflowClient, trunk_version: int) -> Release:
    """A release of a trunk with no heads, made production.

    Used when production does not exist yet, or to switch to a new trunk with zero heads.
    """
    return create_release(client, trunk_version, {}, expected_production=production_version(client),
                          note=f"bootstrap trunk v{trunk_version}")


def _release_versions(client: MlflowClient, filter_string: str) -> list[Any]:
    """Every ``release`` model version matching the filter, across result pages."""
    try:
        return all_pages(client.search_model_versions, filter_string)
    except MlflowException as e:
        if is_not_found(e):
            return []
        raise


def find_releases_by_tag(client: MlflowClient, key: str, value: str) -> list[int]:
    """The ``release`` versions whose tag ``key`` equals ``value``.

    Args:
        client: from :func:`registry.store.tracking.connect`.
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
        client: from :func:`registry.store.tracking.connect`.
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
    _require_alias(client, alias, expected)
    with _alias_lock(client, f"move {alias} to release v{target.version}") as lease:
        _require_alias(client, alias, expected)
        lease.check()
        client.set_registered_model_alias(RELEASE_MODEL, alias, str(target.version))
        if alias == PRODUCTION:
            mark_serving(client, target, previous=expected)
    _adopt(client, target.version)
    if note:
        client.set_model_version_tag(RELEASE_MODEL, str(target.version), f"{alias}_note", note)
    return target


def _adopt(client: MlflowClient, version: int) -> None:
    """A release an alias now points at is no orphan: clear the mark a sweep may have left."""
    mv = client.get_model_version(RELEASE_MODEL, str(version))
    if mv.tags.get(ORPHAN) != "true":
        return
    client.delete_model_version_tag(RELEASE_MODEL, str(version), ORPHAN)
    if mv.run_id:
        with contextlib.suppress(MlflowException):
            client.delete_tag(mv.run_id, ORPHAN)
            # Its manifest was complete (the version is created only after it is logged).
            client.set_terminated(mv.run_id, "FINISHED")


def reap_leftovers(client: MlflowClient, *, wait_s: float | None = None) -> dict[str, list[str]]:
    """Mark what promoters killed mid-way left behind, so nothing dead looks live.

    Release runs are created and finished only while their promoter holds the promotion
    lock, so with the lock held every run of the experiment ``releases`` still RUNNING
    belongs to a promoter that died. Such a run whose version an alias points at (it died
    after moving production) is set FINISHED; any other is set KILLED and tagged
    ``orphan=true``, and so are its ``release`` versions (created, never made production);
    an orphan an alias points at again (a move killed before it cleared the mark) is cleared.
    Nothing is deleted: a refresh cascade resuming after a crash still finds its release by
    its ``cascade`` tag, and moving production there clears the mark.

    Args:
        client: from :func:`registry.store.tracking.connect`.
        wait_s: how long to queue for the lock (default: the lock's own default).

    It also repairs the ``production`` markers on ``trunk`` and every head
    (:func:`sync_serving_aliases`) that a promoter killed after moving production left behind.

    Returns:
        ``{"killed_runs": [...], "finished_runs": [...], "orphan_versions": [...],
        "serving_markers_moved": [model names]}``.

    Raises:
        ReleaseError: the lock could not be held within ``wait_s``.
    """
    try:
        with hold(client, purpose="mark leftovers", wait_s=wait_s):
            found = _mark_leftovers(client)
            # A promoter killed between moving production and its markers left them behind too.
            found["serving_markers_moved"] = sync_serving_aliases(client)
            return found
    except LeaseError as e:
        raise ReleaseError(str(e)) from None


def _mark_leftovers(client: MlflowClient) -> dict[str, list[str]]:
    """:func:`reap_leftovers`' work; the caller holds the promotion lock."""
    found: dict[str, list[str]] = {"killed_runs": [], "finished_runs": [], "orphan_versions": []}
    exp = client.get_experiment_by_name("releases")
    if exp is None:
        return found
    try:
        aliased = {str(v) for v in client.get_registered_model(RELEASE_MODEL).aliases.values()}
    except MlflowException as e:
        if not is_not_found(e):
            raise
        aliased = set()
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", page_token=token)
        for run in page:
            run_id = run.info.run_id
            versions = _release_versions(client, f"name='{RELEASE_MODEL}' and run_id='{run_id}'")
            if any(str(mv.version) in aliased for mv in versions):
                client.set_terminated(run_id, "FINISHED")
                found["finished_runs"].append(run_id)
                continue
            for mv in versions:
                client.set_model_version_tag(RELEASE_MODEL, str(mv.version), ORPHAN, "true")
                found["orphan_versions"].append(str(mv.version))
            client.set_tag(run_id, ORPHAN, "true")
            client.set_terminated(run_id, "KILLED")
            found["killed_runs"].append(run_id)
        token = page.token
        if not token:
            break
    # A move to an orphan (a resumed cascade) killed before it cleared the mark: it serves.
    for mv in _release_versions(client, f"name='{RELEASE_MODEL}' and tags.`{ORPHAN}`='true'"):
        if str(mv.version) in aliased:
            _adopt(client, int(mv.version))
    if any(found.values()):
        log.warning("marked leftovers of killed promoters: %d run(s) KILLED, %d FINISHED (serving), release "
                    "version(s) %s tagged orphan=true", len(found["killed_runs"]), len(found["finished_runs"]),
                    ", ".join(f"v{v}" for v in found["orphan_versions"]) or "none")
    return found


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
        client: from :func:`registry.store.tracking.connect`.
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


def load_release(client: MlflowClient, release: Release, *,
                 allow_unverified: bool = False) -> tuple[Trunk, dict[str, LoadedHead]]:
    """The trunk and every head of a release, ready to run.

    The heads are read from the release model's pack (two downloads, whatever the head
    count; a release made before packs reads each head version's own files), and every
    head is checked against the content hashes recorded when its version was registered
    (read in one search per 100 heads), as :func:`registry.store.heads.load_head_version`
    checks them.

    Args:
        client: from :func:`registry.store.tracking.connect`.
        release: from :func:`read_release` or :func:`get_release`.
        allow_unverified: accept heads registered before content hashes were recorded
            (each is logged as a warning); hashed heads are always verified.

    Raises:
        ReleaseError: a loaded head's trunk_id differs from the loaded trunk's.
        HeadArtifactError: a head's files do not match their recorded hashes, have none
            (unless allowed), or are not what the platform writes, or the release's pack
            does not match the sha256 in its ``release.json``; one line naming the head
            and version (or the release and the file).
    """
    trunk = load_trunk(client, release.trunk_version)
    heads = load_release_heads(client, release, allow_unverified=allow_unverified)
    for name, head in heads.items():
        if head.meta.get("trunk_id") != trunk.trunk_id:
            raise ReleaseError(f"{model_name(name)} v{release.heads[name]} was trained on trunk_id "
                               f"{head.meta.get('trunk_id')} but release v{release.version}'s trunk is {trunk.trunk_id}")
    return trunk, heads


def load_release_heads(client: MlflowClient, release: Release, *,
                       allow_unverified: bool = False) -> dict[str, LoadedHead]:
    """Every head of a release, without its trunk: from its pack (constant requests), each hash-checked.

    What :func:`load_release` reads for the heads; see there for the checks and errors.
    """
    pack = _pack_source(client, release)
    if pack is None:
        return {name: load_head_version(client, name, version, allow_unverified=allow_unverified)
                for name, version in sorted(release.heads.items())}
    return _packed_heads(client, release, pack, allow_unverified)


def _packed_heads(client: MlflowClient, release: Release, pack: PackSource,
                  allow_unverified: bool) -> dict[str, LoadedHead]:
    """Every head of ``release`` from its pack, each checked against its version's recorded hashes."""
    versions = head_versions(client, release.heads)
    with tempfile.TemporaryDirectory(prefix="release-pack-") as tmp:
        try:
            packed = fetch_pack(client, pack, tmp)
        except ServingError as e:
            raise HeadArtifactError(str(e)) from None
    heads: dict[str, LoadedHead] = {}
    for name, version in sorted(release.heads.items()):
        label = f"{model_name(name)} v{version}"
        expected = recorded_digests(versions[name], label, allow_unverified)
        p = packed.get(name)
        if p is None or p.version != version:
            raise HeadArtifactError(f"{label}: not in release v{release.version}'s pack, which its release.json "
                                    f"lists (tampered or corrupt)")
        heads[name] = p.load(expected=expected, label=label)
    return heads
