"""What every tool shares: the Hydra entry point, the workspace, and one-line errors.

A tool is ``@tool("<config name>")`` on a function that takes the composed config and
calls one library function. Platform errors (a bad head config, an unknown tap, a refused
release, ...) print as one line, ``error: <file>: field '<x>': <why>``, and exit with
status 2; so do storage failures (any ``OSError``: a read-only folder, a full disk),
``error: <path>: <strerror>``. ``VTP_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from heads.spec import HeadConfigError, HeadSpec, resolve_head, search_dirs
from heads.store import HeadArtifactError
from trunk.device import resolve_device
from trunk.images import path_text
from trunk.model import Trunk, TrunkError
from trunk.targets import TargetError, check_private_keys

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EXIT_USAGE = 2


def _platform_errors() -> tuple[type[BaseException], ...]:
    from registry.jobs.cascade import CascadeError
    from registry.jobs.train import JobError
    from registry.store.releases import ReleaseError
    from registry.store.tracking import RegistryError

    # OSError covers FileNotFoundError, PermissionError, read-only and full file systems.
    return (HeadConfigError, HeadArtifactError, TrunkError, JobError, ReleaseError, CascadeError, RegistryError,
            OSError, ValueError)


def _shown(name: Any) -> str:
    return path_text(os.fsdecode(name)) if isinstance(name, (str, bytes, os.PathLike)) else str(name)


def error_line(e: BaseException) -> str:
    """The one line a tool prints for a platform error (without the ``error: `` prefix).

    An ``OSError`` that names its file gives ``<path>: <strerror>`` (``<src> -> <dst>`` for
    two paths), the path written as :func:`trunk.images.path_text` does; anything else its
    message's first line.
    """
    if isinstance(e, OSError) and e.filename is not None:
        where = _shown(e.filename)
        if e.filename2 is not None:
            where += f" -> {_shown(e.filename2)}"
        return f"{where}: {e.strerror or type(e).__name__}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def tool(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Turn ``fn(cfg)`` into a Hydra entry point reading ``conf/<config_name>.yaml``."""

    def decorate(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
        @functools.wraps(fn)
        def entry(cfg: DictConfig) -> Any:
            quiet_libraries()
            try:
                return fn(cfg)
            except _platform_errors() as e:
                if os.environ.get("VTP_DEBUG"):
                    raise
                print(f"error: {error_line(e)}", file=sys.stderr)
                sys.exit(EXIT_USAGE)

        return entry

    return decorate


def quiet_libraries() -> None:
    """Keep MLflow's and alembic's INFO chatter out of the tools' output."""
    for name in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "timm"):
        logging.getLogger(name).setLevel(logging.WARNING)


def workspace(cfg: DictConfig):
    from registry.store.workspace import Workspace

    return Workspace.at(cfg.workspace)


def client(cfg: DictConfig, ws):
    """An MLflow client on the workspace's store, or on ``tracking.uri`` / ``MLFLOW_TRACKING_URI``."""
    from registry.store.tracking import connect

    return connect(ws.root, uri=cfg.tracking.get("uri"))


def device(cfg: DictConfig) -> str:
    return str(resolve_device(str(cfg.device)))


def head_dirs() -> list[Path]:
    """``conf/`` plus every folder added with ``hydra.searchpath=[file://...]``."""
    return search_dirs(list(HydraConfig.get().searchpath), conf_dir=CONF_DIR)


def head_spec(name: str, ws) -> HeadSpec:
    return resolve_head(str(name), head_dirs(), {"workspace": str(ws.root)})


def build_trunk(trunk_cfg: DictConfig) -> Trunk:
    """Instantiate the ``trunk`` config group; only the platform's own Trunk class is allowed."""
    target = trunk_cfg.get("_target_")
    if target != "trunk.model.Trunk":
        raise TrunkError(f"trunk config: field 'trunk._target_': must be trunk.model.Trunk, got '{target}'")
    # Nothing else is instantiated: no nested _target_, no _args_/_partial_/_recursive_ surprises.
    try:
        check_private_keys({k: v for k, v in OmegaConf.to_container(trunk_cfg, resolve=False).items()
                            if k != "_target_"}, "trunk", allow=())
    except TargetError as e:
        raise TrunkError(f"trunk config: {e}") from None
    try:
        return instantiate(trunk_cfg, _convert_="all")
    except InstantiationException as e:  # show the trunk's own one-line error, not Hydra's wrapper
        if isinstance(e.__cause__, (TrunkError, ValueError, TypeError)):
            raise TrunkError(f"trunk config: {e.__cause__}") from None
        raise


def as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    return list(OmegaConf.to_container(value, resolve=True)) if not isinstance(value, list) else value


def num_workers(cfg: DictConfig) -> int:
    """``num_workers`` from the config; ``auto``: one decoding process per core but one, at least 1, at most 16."""
    value = cfg.num_workers
    if str(value).strip().lower() == "auto":
        return max(1, min(16, (os.cpu_count() or 2) - 1))
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"field 'num_workers': '{value}' is not a number or 'auto'") from None
    if n < 0:
        raise ValueError(f"field 'num_workers': must be 0 or more, got {n}")
    return n
