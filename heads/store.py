"""Head artifacts on disk: ``head.safetensors`` (weights) plus ``head.json`` (spec).

Loading never unpickles anything: the module is rebuilt from its ``_target_`` (which
must live in the platform's own packages) and keyword arguments, then its tensors are
read with safetensors.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from heads.spec import ALLOWED_TARGET_PREFIXES

WEIGHTS_FILE = "head.safetensors"
SPEC_FILE = "head.json"
FORMAT_VERSION = 1
REQUIRED_META = ("name", "tap", "target", "kwargs", "in_features", "num_classes", "classes", "trunk_id")


class HeadArtifactError(ValueError):
    """A stored head cannot be loaded; the message names the file and the field."""


@dataclass
class LoadedHead:
    """A head module ready to run, with what it reads and what its outputs mean.

    Attributes:
        module: the ``nn.Module`` in eval mode.
        meta: the ``head.json`` contents (name, tap, classes, trunk_id, ...).
    """

    module: nn.Module
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def tap(self) -> str:
        return self.meta["tap"]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


def build_module(target: str, kwargs: dict[str, Any], in_features: int, num_classes: int) -> nn.Module:
    """Instantiate a head class from the platform's packages with explicit arguments."""
    if not target.startswith(ALLOWED_TARGET_PREFIXES):
        raise HeadArtifactError(f"head target '{target}' is outside the platform's packages")
    mod_name, _, attr = target.rpartition(".")
    cls = getattr(importlib.import_module(mod_name), attr)
    return cls(in_features=in_features, num_classes=num_classes, **kwargs)


def save_head(directory: str | Path, module: nn.Module, meta: dict[str, Any]) -> Path:
    """Write a head's weights and spec into ``directory``.

    Args:
        directory: created if missing.
        module: the trained head.
        meta: at least the keys in ``REQUIRED_META``; anything JSON-able besides.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise HeadArtifactError(f"head meta lacks {', '.join(missing)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"name": str(meta["name"])})
    (directory / SPEC_FILE).write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=2, default=str) + "\n")
    return directory


def load_head(directory: str | Path) -> LoadedHead:
    """Rebuild a head saved by :func:`save_head`."""
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    try:
        meta = json.loads(spec_path.read_text())
    except FileNotFoundError:
        raise HeadArtifactError(f"{spec_path}: no such file") from None
    except json.JSONDecodeError as e:
        raise HeadArtifactError(f"{spec_path}: not valid JSON ({e.msg})") from None
    for key in REQUIRED_META:
        if key not in meta:
            raise HeadArtifactError(f"{spec_path}: field '{key}' is missing")
    if len(meta["classes"]) != meta["num_classes"]:
        raise HeadArtifactError(f"{spec_path}: field 'classes' has {len(meta['classes'])} names "
                                f"for num_classes={meta['num_classes']}")
    try:
        module = build_module(meta["target"], dict(meta["kwargs"]), int(meta["in_features"]), int(meta["num_classes"]))
    except (ImportError, AttributeError, TypeError) as e:
        raise HeadArtifactError(f"{spec_path}: field 'target': cannot build {meta['target']} ({e})") from None
    except HeadArtifactError as e:
        raise HeadArtifactError(f"{spec_path}: field 'target': {e}") from None
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise HeadArtifactError(f"{weights_path}: no such file")
    try:
        module.load_state_dict(load_file(str(weights_path)), strict=True)
    except RuntimeError as e:
        raise HeadArtifactError(f"{weights_path}: weights do not fit {meta['target']} "
                                f"({str(e).splitlines()[0]})") from None
    return LoadedHead(module=module.eval(), meta=meta)
