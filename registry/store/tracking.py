"""Where MLflow lives: the tracking URI, the client, and the platform's experiments.

By default MLflow is a SQLite file inside the workspace (``<workspace>/mlflow.db``) with
artifacts beside it (``<workspace>/mlartifacts/<experiment>``), so one folder holds all
state and can be copied, moved or deleted as a unit. ``MLFLOW_TRACKING_URI`` in the
environment (or an explicit ``uri``) points the platform at a tracking server instead; the
server then decides where artifacts go.

MLflow stores artifact locations as absolute URIs, so a copied or moved workspace would
still read and write the ``mlartifacts`` folder of the workspace it came from. The
experiments' own locations say where the store was created, so :func:`connect` notices a
move and adopts the store before anything else touches it (:func:`adopt_moved_workspace`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
EXPERIMENTS = ("trunks", "heads", "releases", "reports", "cascades", "heldout", "monitoring", "reductions")

# The columns of MLflow's SQLite schema that hold absolute artifact URIs (MLflow 2 and 3;
# those a given schema lacks are skipped). Everything else there is relative or not ours.
ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("model_versions", "source"), ("model_versions", "storage_location"),
                    ("logged_models", "artifact_location"))

log = logging.getLogger(__name__)

# Schema migrations and store set-up log at INFO on every fresh database; users
# running a tool want their own summary, not alembic's.
_NOISY_LOGGERS = ("alembic", "alembic.runtime.migration", "mlflow", "mlflow.store.db.utils",
                  "mlflow.store.model_registry.abstract_store", "mlflow.tracking.fluent", "urllib3", "matplotlib",
                  "PIL", "timm")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says what and why."""


class ArtifactError(RegistryError):
    """An artifact cannot be read from MLflow; the message is the first line of MLflow's."""


def quiet_libraries() -> None:
    """Silence the libraries' INFO chatter (MLflow, alembic, urllib3, matplotlib, Pillow, timm)
    and MLflow's download bars; their warnings and errors still show. The one such helper:
    the tools call it at start-up, :func:`connect` on every connection."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Every artifact download draws a progress bar; ours are a few small files.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def tracking_uri(workspace: str | Path) -> str:
    """The tracking URI for a workspace.

    Args:
        workspace: the platform's state folder.

    Returns:
        ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<absolute workspace>/mlflow.db``.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{Path(workspace).resolve() / DB_FILE}"


def is_local_store(uri: str) -> bool:
    """True when the store is a local SQLite database or file store (no server)."""
    scheme = urlparse(uri).scheme
    if scheme == "":
        return uri != "databricks"  # a bare path is a file store; 'databricks' is a service
    return scheme in ("file", "sqlite")


def sqlite_path(uri: str) -> Path | None:
    """The database file behind a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def client_uri(client: MlflowClient) -> str:
    """The tracking URI a client talks to."""
    return client.tracking_uri


def _set_global_uris(uri: str) -> None:
    # MLflow also exports the URI to the environment, where tracking_uri() would then
    # mistake it for the user's choice and send the next workspace's runs to this one.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _artifacts_prefix(location: str, experiment: str) -> str | None:
    """``file:///<root>/mlartifacts/`` when ``location`` is ``<that>/<experiment>``, else None."""
    parsed = urlparse(location)
    if parsed.scheme != "file":
        return None
    path = PurePosixPath(unquote(parsed.path))
    if path.name != experiment or path.parent.name != ARTIFACTS_DIR:
        return None
    return location[: len(location) - len(experiment)]


def adopt_moved_workspace(workspace: Path, db: Path) -> str | None:
    """Point a copied or moved workspace's MLflow store at the workspace's own artifacts.

    The platform's experiments were created with ``<root>/mlartifacts/<name>`` as their
    artifact location. When ``<root>`` is not ``workspace`` the folder was copied or moved,
    and every absolute artifact URI in :data:`ARTIFACT_COLUMNS` that starts with the old
    ``<root>/mlartifacts/`` is rewritten to this workspace's, in one SQLite transaction
    (idempotent, so racing processes agree). Prefixes are compared with ``substr``, not
    ``LIKE``: percent-encoded URIs contain ``%``.

    Args:
        workspace: the resolved workspace folder; ``db`` is its ``mlflow.db``.
        db: the SQLite file.

    Returns:
        The old ``mlartifacts`` URI prefix that was replaced, or None when nothing moved.

    Raises:
        RegistryError: the store came without its ``mlartifacts`` folder, or cannot be
            updated (read-only, locked); one line naming both folders.
    """
    if not db.is_file() or db.stat().st_size == 0:
        return None
    new = (workspace / ARTIFACTS_DIR).as_uri() + "/"
    moved_from = ""
    try:
        con = sqlite3.connect(db, timeout=60, isolation_level=None)
    except sqlite3.Error as e:
        raise RegistryError(f"workspace {workspace}: cannot open {db} ({e})") from None
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return None  # a fresh database: MLflow creates the schema
        marks = ",".join("?" * len(EXPERIMENTS))
        found = con.execute(f"SELECT name, artifact_location FROM experiments WHERE name IN ({marks})",
                            EXPERIMENTS).fetchall()
        olds = {p for p in (_artifacts_prefix(loc or "", name) for name, loc in found) if p and p != new}
        olds = {p for p in olds if not _same_folder(p, workspace)}
        if not olds:
            return None
        if len(olds) > 1:
            raise RegistryError(f"workspace {workspace}: its experiments point at artifacts of several other "
                                f"workspaces ({', '.join(sorted(olds))}); cannot tell which one it was moved from")
        (old,) = olds
        old_dir = Path(unquote(urlparse(old).path))
        moved_from = str(old_dir.parent)
        if old_dir.is_dir() and not (workspace / ARTIFACTS_DIR).is_dir():
            raise RegistryError(f"workspace {workspace}: {DB_FILE} was copied from {moved_from} without its "
                                f"{ARTIFACTS_DIR}/ folder; copy the whole workspace folder")
        changed = 0
        con.execute("BEGIN IMMEDIATE")
        try:
            for table, column in ARTIFACT_COLUMNS:
                if table not in tables:
                    continue
                if column not in {row[1] for row in con.execute(f"PRAGMA table_info({table})")}:
                    continue
                cur = con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                  f"WHERE substr({column}, 1, ?) = ?", (new, len(old) + 1, len(old), old))
                changed += cur.rowcount
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        if not moved_from:
            raise RegistryError(f"workspace {workspace}: cannot read {db} ({e})") from None
        raise RegistryError(f"workspace {workspace} was moved from {moved_from} but its {DB_FILE} cannot be "
                            f"updated to match ({e}); make it writable and run any tool on it again") from None
    finally:
        con.close()
    log.warning("workspace %s was copied or moved from %s: %d artifact locations in %s now point at %s",
                workspace, moved_from, changed, DB_FILE, workspace / ARTIFACTS_DIR)
    return old


def _same_folder(prefix: str, workspace: Path) -> bool:
    """True when the prefix names this workspace's mlartifacts by another path (a symlink)."""
    try:
        return os.path.samefile(Path(unquote(urlparse(prefix).path)).parent, workspace)
    except OSError:
        return False


def connect(workspace: str | Path, uri: str | None = None) -> MlflowClient:
    """A client for the platform's registry, with its experiments in place.

    Sets MLflow's global tracking and registry URI (so MLflow's own helpers agree with
    the client) and creates the experiments ``trunks``, ``heads``, ``releases``, ``reports``,
    ``cascades`` and ``heldout`` if missing. With a local store their artifacts go to
    ``<workspace>/mlartifacts/<experiment>``; with a server, the server decides. A workspace
    whose ``mlflow.db`` was created in another folder (copied or moved) is adopted first,
    see :func:`adopt_moved_workspace`, so it never reads or writes the other folder.

    Args:
        workspace: the platform's state folder (created for a local store).
        uri: a tracking URI; default :func:`tracking_uri`.

    Returns:
        An ``MlflowClient`` bound to the URI for tracking and the model registry.
    """
    quiet_libraries()
    uri = uri or tracking_uri(workspace)
    local = is_local_store(uri)
    workspace = Path(workspace).resolve()
    if local:
        workspace.mkdir(parents=True, exist_ok=True)
        db = sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            # Only the workspace's own store: a database elsewhere may be shared on purpose.
            if db.resolve() == workspace / DB_FILE:
                adopt_moved_workspace(workspace, db)
    _set_global_uris(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name in EXPERIMENTS:
        if client.get_experiment_by_name(name) is not None:
            continue
        location = (workspace / ARTIFACTS_DIR / name).as_uri() if local else None
        try:
            client.create_experiment(name, artifact_location=location)
        except MlflowException as e:
            # Another process created it between our look-up and our create.
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
    return client


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of one of the platform's experiments.

    Raises:
        RegistryError: the experiment does not exist (the store was not set up by :func:`connect`).
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise RegistryError(f"MLflow at {client_uri(client)} has no experiment '{name}'; "
                            f"open it with registry.store.tracking.connect(workspace)")
    return exp.experiment_id


def ensure_registered_model(client: MlflowClient, name: str, description: str = "") -> None:
    """Create a registered model unless it exists (safe when two processes race)."""
    try:
        client.create_registered_model(name, description=description or None)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def is_not_found(e: MlflowException) -> bool:
    """True for MLflow's 'does not exist' errors (local stores and servers alike)."""
    return e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(e).lower())


def run_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    """The latest value of every metric logged on a run."""
    return dict(client.get_run(run_id).data.metrics)


_RUNS_PER_SEARCH = 100  # run ids per `IN (...)` filter: the filter travels in the request


def runs_metrics(client: MlflowClient, run_ids: list[str] | tuple[str, ...] | set[str]) -> dict[str, dict[str, float]]:
    """``{run id: latest value of every metric}`` for many runs: one search per 100 runs, not one call each.

    Runs that do not exist are left out.
    """
    wanted = sorted(set(run_ids))
    if not wanted:
        return {}
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: dict[str, dict[str, float]] = {}
    for i in range(0, len(wanted), _RUNS_PER_SEARCH):
        chunk = wanted[i:i + _RUNS_PER_SEARCH]
        listed = ", ".join(f"'{r}'" for r in chunk)
        for run in client.search_runs(experiments, f"attributes.run_id IN ({listed})", max_results=len(chunk)):
            found[run.info.run_id] = dict(run.data.metrics)
    return found


def download_artifact(client: MlflowClient, run_id: str, path: str, dest: str | Path) -> Path:
    """Download one artifact (file or folder) of a run into ``dest``; returns its local path.

    Raises:
        ArtifactError: MLflow cannot give it (missing, unreadable store); the message is
            the first line of MLflow's own.
    """
    try:
        return Path(client.download_artifacts(run_id, path, str(dest)))
    except MlflowException as e:
        raise ArtifactError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


_CLIENT_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def client_cache(client: MlflowClient, kind: str) -> dict[Any, Any]:
    """A dict that lives as long as ``client``, for one kind of record that never changes once written.

    Only what MLflow keeps immutable goes here (a version's source and run, the tags written
    at its registration, a release's manifest, files checked against a recorded sha256), so a
    cached value can never be stale; a new client starts empty.
    """
    caches = _CLIENT_CACHES.setdefault(client, {})
    return caches.setdefault(kind, {})


def fetch_artifact(client: MlflowClient, uri: str, dest: str | Path) -> Path:
    """Download the one artifact file at ``uri`` (a version's source plus a path) to the file ``dest``.

    One request through a tracking server: the file is fetched by its URI, without the run
    look-ups and the listing :meth:`MlflowClient.download_artifacts` makes first.

    Raises:
        ArtifactError: MLflow cannot give it; the message is the first line of MLflow's own.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    parent, _, name = uri.rstrip("/").rpartition("/")
    try:
        repo = get_artifact_repository(parent, tracking_uri=client.tracking_uri)
        download = getattr(repo, "_download_file", None)
        if download is None:  # an MLflow without it: the public, chattier way
            import shutil

            import mlflow

            with tempfile.TemporaryDirectory(prefix="fetch-") as tmp:
                got = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                          tracking_uri=client.tracking_uri)
                shutil.move(got, dest)
        else:
            download(name, str(dest))
    except Exception as e:  # noqa: BLE001 - any store, any transport: one line saying what failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{uri}: {first}") from None
    if not dest.is_file():
        raise ArtifactError(f"{uri}: not a file")
    return dest


def all_pages(search: Callable[..., Any], filter_string: str) -> list[Any]:
    """Every result of an MLflow search, across its pages (registered models come 100 a page).

    Args:
        search: a paged search method of the client (``search_model_versions``,
            ``search_registered_models``).
        filter_string: MLflow's filter.
    """
    found: list[Any] = []
    token = None
    while True:
        page = search(filter_string, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def tagged_artifact(client: MlflowClient, version: Any, tag: str, artifact: str, read: Callable[[Path, str], Any],
                    label: str, what: str) -> Any:
    """``read(local file, tag value)`` of one artifact of a model version that a version tag vouches for.

    One way for every record a version carries beside its model (a trunk's recipe and
    training images, a head's monitoring reference): the tag names the digest, the
    artifact is downloaded, and ``read`` refuses it (ValueError or OSError) when it does
    not match.

    Args:
        client: the registry.
        version: the MLflow ``ModelVersion``.
        tag: the version tag holding the digest.
        artifact: the artifact's path in the version's run.
        read: reads and checks the downloaded file against the tag's value.
        label: the version, for messages (``trunk v3``, ``head.colour v2``).
        what: the record, for messages (``recipe``, ``monitoring reference``).

    Returns:
        What ``read`` returns, or None when the version has no such tag (no such record).

    Raises:
        RegistryError: one line naming ``label`` and ``what``: the artifact is missing or
            unreadable, or does not match its tag.
    """
    value = version.tags.get(tag)
    if not value:
        return None
    with tempfile.TemporaryDirectory(prefix="record-") as tmp:
        try:
            local = download_artifact(client, version.run_id, artifact, tmp)
        except ArtifactError as e:
            raise RegistryError(f"{label}: {what} {artifact} cannot be downloaded (tag {tag}={value}): {e}") from None
        try:
            return read(local, value)
        except (OSError, ValueError) as e:
            raise RegistryError(f"{label}: {what} refused: {e}") from None

