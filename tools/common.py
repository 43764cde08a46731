"""What every tool shares: the Hydra entry point, the workspace, and one-line errors.

A tool is ``@tool("<config name>")`` on a function that takes the composed config and
calls the library. The config is typed (tools/schema.py): a value of the wrong type or an
unknown key fails at composition, and so does a mistyped head key; every such error, and
every platform error (a bad head config, an unknown tap, a refused release, ...), prints as
one line, ``error: <file>: field '<x>': <why>``, and exits with status 2; so do storage
failures (any ``OSError``: a read-only folder, a full disk), ``error: <path>: <strerror>``.
``VTP_DEBUG=1`` shows the traceback instead.

Multirun (``-m head=colour,shape``): a failing job prints its error line and the sweep goes
on; the tool then exits with the highest status of its failed jobs.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from heads.spec import (HEAD_GROUP, HeadConfigError, HeadSpec, install_head_group, list_heads, loaded_from,
                        resolve_head, search_dirs, validate)
from heads.store import HeadArtifactError
from trunk.device import resolve_device
from trunk.images import path_text
from trunk.model import Trunk, TrunkError
from trunk.targets import TargetError, check_private_keys

from tools import schema

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EXIT_USAGE = 2
# Head files are read through the head group's safe sources; the tools' schemas are in the ConfigStore.
install_head_group()
schema.register()


class JobFailed(Exception):
    """One job of a multirun failed; it was reported, the sweep goes on."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exit status {code}")
        self.code = code


# (overrides, exit status) of the failed jobs of this process's multirun.
_failed: list[tuple[str, int]] = []


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


def composition_error_line(e: BaseException) -> str:
    """One line for a Hydra composition error: the field (in its head file when it is one) and why."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, MissingConfigException):
        options = f"; available: {', '.join(o for o in e.options if not o.startswith('_'))}" if e.options else ""
        return f"{str(e).strip().splitlines()[0]}{options}"
    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    lines = str(e).strip().splitlines() or [type(e).__name__]
    text = lines[0]
    composing = re.match(rf"In '{HEAD_GROUP}/([a-z0-9_]+)': \w+ raised while composing config", text)
    if composing and len(lines) > 1:  # a head file does not fit the schema; Hydra puts the cause in its text
        key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.strip().startswith("full_key:")), "")
        return f"{loaded_from(composing.group(1))}: field '{key.removeprefix(HEAD_GROUP + '.')}': {lines[1].strip()}"
    if not isinstance(cause, OmegaConfBaseException):
        return text
    key = str(getattr(cause, "full_key", "") or "")
    why = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
    where = f"{text.rstrip('.')}: " if "override" in text else ""
    if key.startswith(f"{HEAD_GROUP}.") and not where:  # the head's own file is at fault
        try:
            from hydra.core.hydra_config import HydraConfig

            name = str(HydraConfig.get().runtime.choices.get(HEAD_GROUP))
        except Exception:  # composing in a test, or before HydraConfig is set
            name = None
        return f"{loaded_from(name) if name else 'head config'}: field '{key.removeprefix(HEAD_GROUP + '.')}': {why}"
    return f"{where}field '{key}': {why}" if key else f"{where}{why}"


def check_config(cfg: DictConfig) -> None:
    """What the schema's types cannot say, checked before the tool runs.

    The head (untrusted) is validated first, so no resolver in it is ever resolved; then the
    whole config becomes the schema's objects, which runs their ``__post_init__`` checks and
    refuses values left missing (``???``).
    """
    from omegaconf.errors import OmegaConfBaseException

    _check_bool_overrides(cfg)
    if HEAD_GROUP in cfg and cfg[HEAD_GROUP] is not None and _head_choice() is None \
            and OmegaConf.is_missing(cfg[HEAD_GROUP], "name"):
        # The defaults list leaves the group empty (so that --help composes); the schema requires it.
        raise ValueError(f"field 'head': give head=<name>; heads: {', '.join(list_heads(head_dirs())) or 'none'}")
    if HEAD_GROUP in cfg and cfg[HEAD_GROUP] is not None:
        head_spec(cfg)
    try:
        OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ValueError(composition_error_line(e)) from None


def _check_bool_overrides(cfg: DictConfig) -> None:
    """A boolean flag takes true or false on the command line.

    OmegaConf would read ``promote=no`` (or ``off``, ``0``) as false; a typo of that kind must
    not decide whether a head ships, so anything Hydra did not parse as a boolean is refused.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.nodes import BooleanNode

    if not HydraConfig.initialized():
        return
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra.") or OmegaConf.select(cfg, key, default=None) is None:
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        node = parent._get_node(leaf) if isinstance(parent, DictConfig) else None
        value = override.value()
        if isinstance(node, BooleanNode) and not isinstance(value, bool):
            raise ValueError(f"field '{key}': '{value}' is not a boolean; write true or false")


def tool(config_name: str, rewrite_args: Callable[[list[str]], list[str]] | None = None) -> Callable[..., Any]:
    """Turn ``fn(cfg)`` into a Hydra entry point reading ``conf/<config_name>.yaml``.

    The entry point, called with no argument, runs Hydra on the command line; called with a
    composed config (a test, ``hydra.compose``), it runs the tool on it, errors handled alike.
    ``rewrite_args`` maps the command line's arguments before Hydra reads them (a shorthand
    Hydra's grammar cannot express).
    """

    def decorate(fn: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def task(cfg: DictConfig) -> Any:
            from registry.store.tracking import quiet_libraries

            quiet_libraries()
            multirun = _is_multirun()
            try:
                check_config(cfg)
                return fn(cfg)
            except _platform_errors() as e:
                if os.environ.get("VTP_DEBUG"):
                    raise
                print(f"error: {error_line(e)}", file=sys.stderr)
                if not multirun:
                    sys.exit(EXIT_USAGE)
                code = EXIT_USAGE
            except SystemExit as e:  # a tool's own exit status (e.g. 1: not promoted)
                if not multirun:
                    raise
                if not e.code:
                    return None
                code = e.code if isinstance(e.code, int) else 1
            except Exception:
                if not multirun:
                    raise
                traceback.print_exc()
                code = 1
            # Multirun: a sys.exit here would end the whole sweep; report and let Hydra go on.
            _failed.append((_job_overrides(), code))
            raise JobFailed(code)

        hydra_main = hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)(task)

        @functools.wraps(fn)
        def main(cfg: DictConfig | None = None) -> Any:
            if cfg is not None:
                return task(cfg)
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException

            _failed.clear()
            if rewrite_args is not None:
                sys.argv = [sys.argv[0], *rewrite_args(sys.argv[1:])]
            # Hydra prints composition errors over several lines and exits 1; let them reach
            # us, to print one line and exit 2 like every other config error.
            previous = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                hydra_main()
            except JobFailed:  # Hydra's sweeper re-raises the first failed job once every job has run
                pass
            except (HydraException, OmegaConfBaseException, HeadConfigError) as e:
                if os.environ.get("VTP_DEBUG"):
                    raise
                line = error_line(e) if isinstance(e, HeadConfigError) else composition_error_line(e)
                print(f"error: {line}", file=sys.stderr)
                sys.exit(EXIT_USAGE)
            finally:
                if previous is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = previous
            if _failed:
                for overrides, code in _failed:
                    print(f"FAILED (exit {code}): {overrides}", file=sys.stderr)
                sys.exit(max(code for _, code in _failed))

        main.task = task
        return main

    return decorate


def _is_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_overrides() -> str:
    return " ".join(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ""


def workspace(cfg: DictConfig):
    from registry.store.workspace import Workspace

    return Workspace.at(cfg.workspace)


def client(cfg: DictConfig, ws):
    """An MLflow client on the workspace's store, or on ``tracking.uri`` / ``MLFLOW_TRACKING_URI``."""
    from registry.store.tracking import connect

    return connect(ws.root, uri=cfg.tracking.get("uri"))


def device(cfg: DictConfig) -> str:
    return str(resolve_device(str(cfg.device)))


def head_dirs() -> list[str]:
    """Hydra's search path for head configs: ``conf/`` plus every ``hydra.searchpath`` entry."""
    searchpath = list(HydraConfig.get().searchpath) if HydraConfig.initialized() else []
    return search_dirs(searchpath, conf_dir=CONF_DIR)


def head_spec(cfg: DictConfig) -> HeadSpec:
    """The config's validated ``head``: Hydra's ``head`` group with the command line's overrides."""
    head = cfg[HEAD_GROUP]
    choice = _head_choice() or (None if OmegaConf.is_missing(head, "name") else str(head.name))
    return validate(OmegaConf.to_container(head, resolve=False), loaded_from(choice or "?"),
                    context={"workspace": str(workspace(cfg).root)}, expected_name=choice)


def named_head(name: str, ws) -> HeadSpec:
    """``head=<name>`` composed by Hydra on this run's search path, validated (``tasks=[a,b]``)."""
    return resolve_head(str(name), head_dirs(), {"workspace": str(ws.root)})


def _head_choice() -> str | None:
    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get(HEAD_GROUP)
    return None if choice in (None, "null") else str(choice)


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


def num_workers(cfg: DictConfig) -> int:
    """``num_workers`` from the config (the schema checked it): ``auto`` is one decoding process
    per core but one, at least 1, at most 16."""
    if cfg.num_workers == "auto":
        return max(1, min(16, (os.cpu_count() or 2) - 1))
    return cfg.num_workers
