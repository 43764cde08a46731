"""Where MLflow lives: the tracking URI, the client, and the platform's experiments.

By default MLflow is a SQLite file inside the workspace (``<workspace>/mlflow.db``) with
artifacts beside it (``<workspace>/mlartifacts/<experiment>``), so one folder holds all
state and can be copied or deleted as a unit. ``MLFLOW_TRACKING_URI`` in the environment
(or an explicit ``uri``) points the platform at a tracking server instead; the server
then decides where artifacts go.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
EXPERIMENTS = ("trunks", "heads", "releases", "reports", "cascades")

# Schema migrations and store set-up log at INFO on every fresh database; users
# running a tool want their own summary, not alembic's.
_NOISY_LOGGERS = ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils",
                  "mlflow.store.model_registry.abstract_store", "mlflow.tracking.fluent")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says what and why."""


def quiet_mlflow() -> None:
    """Silence MLflow's and alembic's INFO chatter and download bars (warnings and errors still show)."""
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


def connect(workspace: str | Path, uri: str | None = None) -> MlflowClient:
    """A client for the platform's registry, with its experiments in place.

    Sets MLflow's global tracking and registry URI (so MLflow's own helpers agree with
    the client) and creates the experiments ``trunks``, ``heads``, ``releases``, ``reports`` and
    ``cascades`` if missing. With a local store their artifacts go to
    ``<workspace>/mlartifacts/<experiment>``; with a server, the server decides.

    Args:
        workspace: the platform's state folder (created for a local store).
        uri: a tracking URI; default :func:`tracking_uri`.

    Returns:
        An ``MlflowClient`` bound to the URI for tracking and the model registry.
    """
    quiet_mlflow()
    uri = uri or tracking_uri(workspace)
    local = is_local_store(uri)
    workspace = Path(workspace).resolve()
    if local:
        workspace.mkdir(parents=True, exist_ok=True)
        db = sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
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
                            f"open it with registry.tracking.connect(workspace)")
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
