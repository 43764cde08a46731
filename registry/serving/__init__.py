"""Releases and heads as MLflow pyfunc models, and a small API to predict with them in-process.

Every ``release`` version is a self-contained MLflow pyfunc model (run artifact ``model/``:
the trunk's files and every head in one pack, ``heads.safetensors`` + ``heads.json``,
:mod:`registry.serving.pack`) and every ``head.<name>`` version one that runs on its trunk
from the registry; both are models from code (:mod:`registry.serving.model`), safetensors
weights checked against their recorded hashes, nothing pickled. ``mlflow.pyfunc.load_model("models:/release@production")``
and ``mlflow models serve`` work on them directly; in Python::

    from registry.serving import load_release

    model = load_release("production")          # or a version number; tracking_uri=... for a server
    rows = model.predict(["a.jpg", "s3://bucket/b.png"])   # or a list of bytes, or a DataFrame

``rows`` is a pandas DataFrame with bulk classification's columns (``path``, ``sha256``,
``error``, ``<head>_label``, ``<head>_score``), equal to what ``tools.classify`` writes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from registry.serving.package import build_release_model, check_no_pickle, write_head_model
from registry.serving.runtime import IMAGE_COLUMN, PATH_COLUMN, ServingError, download_version
from registry.store.tracking import DB_FILE, is_not_found
from registry.store.tracking import tracking_uri as workspace_tracking_uri

# Where the tools keep their state by default (``workspace=`` on every tool).
DEFAULT_WORKSPACE = "workspace"

RELEASE_MODEL = "release"

__all__ = ["load_release", "load_head_model", "PlatformPredictor", "ServingError", "build_release_model",
           "write_head_model", "check_no_pickle"]


class PlatformPredictor:
    """A loaded platform model: ``predict`` takes paths, bytes or a DataFrame.

    Attributes:
        name: the registered model (``release`` or ``head.<name>``).
        version: its version.
        pyfunc: the ``mlflow.pyfunc.PyFuncModel``.
    """

    def __init__(self, name: str, version: int, pyfunc) -> None:
        self.name, self.version, self.pyfunc = name, int(version), pyfunc

    def predict(self, inputs: pd.DataFrame | Iterable[str | os.PathLike | bytes]) -> pd.DataFrame:
        """One row per input: ``path``, ``sha256``, ``error``, ``<head>_label``, ``<head>_score``.

        Args:
            inputs: paths (local or fsspec URIs), encoded image bytes, or a DataFrame with
                a ``path`` and/or ``image`` column.

        Raises:
            ServingError: a list mixes paths and bytes, or holds something else.
        """
        if isinstance(inputs, pd.DataFrame):
            return self.pyfunc.predict(inputs)
        items = list(inputs)
        if all(isinstance(x, (str, os.PathLike)) for x in items):
            frame = pd.DataFrame({PATH_COLUMN: pd.Series([os.fspath(x) for x in items], dtype=object)})
        elif all(isinstance(x, (bytes, bytearray)) for x in items):
            frame = pd.DataFrame({IMAGE_COLUMN: pd.Series([bytes(x) for x in items], dtype=object)})
        else:
            kinds = sorted({type(x).__name__ for x in items})
            raise ServingError(f"predict takes paths or image bytes (not mixed) or a DataFrame, got {', '.join(kinds)}")
        return self.pyfunc.predict(frame)

    def __repr__(self) -> str:
        return f"PlatformPredictor({self.name} v{self.version})"


def _version(client: MlflowClient, name: str, which: str | int) -> int:
    try:
        if isinstance(which, int) or str(which).isdigit():
            return int(client.get_model_version(name, str(int(which))).version)
        return int(client.get_model_version_by_alias(name, str(which)).version)
    except MlflowException as e:
        if is_not_found(e) or "alias" in str(e).lower():
            raise ServingError(f"{name} has no version or alias '{which}' in the registry") from None
        raise


def _default_uri(workspace: str | Path | None) -> str:
    """Where to look when no URI is given: the named workspace's own SQLite store; else, as the
    tools find it, ``MLFLOW_TRACKING_URI`` (or a URI this process gave ``mlflow.set_tracking_uri``),
    else ``./workspace``'s store."""
    if workspace is not None:
        return f"sqlite:///{Path(workspace).resolve() / DB_FILE}"
    try:
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
    except ImportError:  # a private helper of MLflow's: without it, only the environment counts
        def is_tracking_uri_set() -> bool:
            return bool(os.environ.get("MLFLOW_TRACKING_URI"))
    return mlflow.get_tracking_uri() if is_tracking_uri_set() else workspace_tracking_uri(DEFAULT_WORKSPACE)


def _load(name: str, which: str | int, tracking_uri: str | None, model_config: Mapping[str, Any] | None,
          workspace: str | Path | None = None) -> PlatformPredictor:
    uri = tracking_uri or _default_uri(workspace)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = _version(client, name, which)
    with tempfile.TemporaryDirectory(prefix="platform-model-") as tmp:
        local = download_version(name, version, tmp, uri)
        if not (local / "MLmodel").is_file():
            raise ServingError(f"{name} v{version} is not a pyfunc model (made before releases were MLflow models); "
                               f"make a new version of it to serve it")
        # Weights are read into memory at load; the downloaded files are not needed after.
        model = mlflow.pyfunc.load_model(str(local), model_config={"tracking_uri": uri, **(model_config or {})})
    return PlatformPredictor(name, version, model)


def load_release(release: str | int = "production", *, tracking_uri: str | None = None,
                 model_config: Mapping[str, Any] | None = None,
                 workspace: str | Path | None = None) -> PlatformPredictor:
    """Load a ``release`` version as a predictor.

    Args:
        release: an alias (``production``, ``candidate``) or a version number.
        tracking_uri: the registry. Default: the SQLite store of ``workspace`` when given;
            else, as every tool finds it, ``MLFLOW_TRACKING_URI`` (or a URI this process gave
            ``mlflow.set_tracking_uri``); else ``./workspace``'s store.
        workspace: a platform workspace folder whose own store to read.
        model_config: overrides of ``batch_size``, ``device``, ``draft``.

    Raises:
        ServingError: no such version or alias, the version predates pyfunc releases, or
            a trunk or pack file does not match the sha256 in its ``serving.json``.
        heads.store.HeadArtifactError: a head's file does not match its recorded hash.
    """
    return _load(RELEASE_MODEL, release, tracking_uri, model_config, workspace)


def load_head_model(name: str, version: str | int, *, tracking_uri: str | None = None,
                    model_config: Mapping[str, Any] | None = None,
                    workspace: str | Path | None = None) -> PlatformPredictor:
    """Load ``head.<name>`` v<version> (or an alias, e.g. ``production``) on its trunk; see :func:`load_release`."""
    return _load(f"head.{name}", version, tracking_uri, model_config, workspace)
