"""Head artifacts on disk: ``head.safetensors`` (weights) plus ``head.json`` (spec).

Stored heads are untrusted input (an artifact store can be written by others), so loading
checks before it builds or parses anything it need not:

- with the content hashes recorded at registration (:func:`artifact_digests`), both files
  must match them byte for byte before either is parsed;
- the spec's ``target`` must resolve to one of the platform's head classes
  (:data:`HEAD_CLASSES`), and its ``kwargs`` may hold only the arguments the platform
  writes for that class, each of its type (a branch's ``model_kwargs`` only the timm
  architecture arguments of :mod:`trunk.timm_args`); nothing is imported or called first;
- weights are parsed by safetensors from bytes; nothing is ever unpickled, and a file that
  is not safetensors (a pickle, say) is a one-line :class:`HeadArtifactError`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from heads.branch import BranchHead
from heads.modules import LinearHead, MLPHead
from heads.spec import item_property, resolve_head_class
from trunk.files import atomic_write, write_json_atomic
from trunk.timm_args import FLOAT, INT, STR, TimmArgumentError, check_model_kwargs, check_model_name
from trunk.targets import TargetError

WEIGHTS_FILE = "head.safetensors"
SPEC_FILE = "head.json"
FORMAT_VERSION = 1
REQUIRED_META = ("name", "tap", "target", "kwargs", "in_features", "num_classes", "classes", "trunk_id")
# Content hashes of the two files (hex sha256). The registry records them as version tags
# of the same names; head.json carries the weights' own hash too, so a local copy of a
# head still notices swapped weights.
WEIGHTS_SHA256 = "weights_sha256"
SPEC_SHA256 = "spec_sha256"
DIGEST_KEYS = (WEIGHTS_SHA256, SPEC_SHA256)

# The platform's head classes: the only things a head.json may build (the same allowlist as
# team configs, heads.spec.HEAD_MODULE_CLASSES; each needs its arguments in HEAD_KWARGS).
HEAD_CLASSES: tuple[type[nn.Module], ...] = (LinearHead, MLPHead, BranchHead)


def _model_name(value: Any) -> bool:
    try:
        check_model_name(value)
    except TimmArgumentError:
        return False
    return True


def _model_kwargs(value: Any) -> bool:
    return isinstance(value, Mapping)  # each key is then checked by trunk.timm_args, which names it


# The arguments the platform writes into head.json per head class (besides in_features and
# num_classes), each with the JSON type it may have. Anything else is refused at save and load.
HEAD_KWARGS: dict[type, dict[str, tuple[Callable[[Any], bool], str]]] = {
    LinearHead: {"dropout": FLOAT},
    MLPHead: {"hidden": INT, "dropout": FLOAT},
    BranchHead: {"model_name": (_model_name, "a model name in timm's registry"), "tap": STR,
                 "model_kwargs": (_model_kwargs, "a mapping of timm architecture arguments"),
                 "freeze_blocks": INT, "dropout": FLOAT},
}
assert set(HEAD_KWARGS) == set(HEAD_CLASSES)


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
    name = item_property("meta", "name")
    tap = item_property("meta", "tap")

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def head_class(target: Any) -> type[nn.Module]:
    """The platform head class ``target`` names; nothing is imported or called.

    Raises:
        HeadArtifactError: ``target`` does not resolve to one of :data:`HEAD_CLASSES`.
    """
    try:
        cls = resolve_head_class(target, "target")
    except TargetError as e:
        raise HeadArtifactError(e.reason) from None
    if cls not in HEAD_KWARGS:  # allowed for configs, but nobody said which stored arguments it takes
        raise HeadArtifactError(f"'{target}' has no list of stored arguments in heads/store.py HEAD_KWARGS")
    return cls


def check_kwargs(cls: type, kwargs: Any) -> dict[str, Any]:
    """``kwargs`` if it holds only arguments the platform writes for ``cls``, each of its type.

    Raises:
        HeadArtifactError: ``field 'kwargs.<key>': ...`` for the first key refused.
    """
    if not isinstance(kwargs, Mapping):
        raise HeadArtifactError(f"field 'kwargs': must be a mapping, got {type(kwargs).__name__}")
    allowed = HEAD_KWARGS[cls]
    for key, value in kwargs.items():
        if key not in allowed:
            raise HeadArtifactError(f"field 'kwargs.{key}': not an argument the platform writes for "
                                    f"{cls.__name__} (allowed: {', '.join(allowed)})")
        check, kind = allowed[key]
        if not check(value):
            raise HeadArtifactError(f"field 'kwargs.{key}': must be {kind}, got {value!r:.60}")
    if "model_kwargs" in kwargs:
        try:
            check_model_kwargs(kwargs["model_kwargs"], "kwargs.model_kwargs")
        except TimmArgumentError as e:
            raise HeadArtifactError(str(e)) from None
    return dict(kwargs)


def build_module(target: str, kwargs: dict[str, Any], in_features: int, num_classes: int) -> nn.Module:
    """Instantiate a platform head class with explicit, checked arguments.

    Raises:
        HeadArtifactError: ``target`` is not a platform head class, or ``kwargs`` holds an
            argument the platform does not write for it (checked before anything is called).
    """
    cls = head_class(target)
    return cls(in_features=in_features, num_classes=num_classes, **check_kwargs(cls, kwargs))


def save_head(directory: str | Path, module: nn.Module, meta: dict[str, Any]) -> Path:
    """Write a head's weights and spec into ``directory``, each atomically (:mod:`trunk.files`).

    Args:
        directory: created if missing.
        module: the trained head.
        meta: at least the keys in ``REQUIRED_META``; anything JSON-able besides. Its
            ``target`` and ``kwargs`` must be what :func:`load_head` accepts, so nothing
            is stored that could not be loaded back.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise HeadArtifactError(f"head meta lacks {', '.join(missing)}")
    check_kwargs(head_class(meta["target"]), meta["kwargs"])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    blob = save_safetensors(state, metadata={"name": str(meta["name"])})
    atomic_write(weights, lambda f: f.write(blob))
    spec = {"format": FORMAT_VERSION, **meta, WEIGHTS_SHA256: sha256_bytes(blob)}
    write_json_atomic(directory / SPEC_FILE, spec, indent=2, default=str)
    return directory


def artifact_digests(directory: str | Path) -> dict[str, str]:
    """``{"weights_sha256": ..., "spec_sha256": ...}`` of a saved head, to record at registration."""
    directory = Path(directory)
    return {WEIGHTS_SHA256: sha256_bytes((directory / WEIGHTS_FILE).read_bytes()),
            SPEC_SHA256: sha256_bytes((directory / SPEC_FILE).read_bytes())}


def _read(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise HeadArtifactError(f"{where}: no such file") from None
    except OSError as e:
        raise HeadArtifactError(f"{where}: cannot be read ({e.strerror or e})") from None


def _check_digest(data: bytes, expected: str | None, where: str) -> None:
    if expected is not None and sha256_bytes(data) != expected:
        raise HeadArtifactError(f"{where} does not match the sha256 recorded at registration (tampered or corrupt)")


def _check_meta(meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        raise HeadArtifactError(f"{where}: must be a JSON object, got {type(meta).__name__}")
    for key in REQUIRED_META:
        if key not in meta:
            raise HeadArtifactError(f"{where}: field '{key}' is missing")
    if meta.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise HeadArtifactError(f"{where}: field 'format': {meta['format']!r} is not a format this platform "
                                f"reads ({FORMAT_VERSION})")
    for key in ("name", "tap", "trunk_id"):
        if not isinstance(meta[key], str):
            raise HeadArtifactError(f"{where}: field '{key}': must be a string")
    for key in ("in_features", "num_classes"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 1:
            raise HeadArtifactError(f"{where}: field '{key}': must be a positive integer")
    if not isinstance(meta["classes"], list) or not all(isinstance(c, str) for c in meta["classes"]):
        raise HeadArtifactError(f"{where}: field 'classes': must be a list of strings")
    if len(meta["classes"]) != meta["num_classes"]:
        raise HeadArtifactError(f"{where}: field 'classes' has {len(meta['classes'])} names "
                                f"for num_classes={meta['num_classes']}")


def load_head(directory: str | Path, *, expected: Mapping[str, str] | None = None,
              label: str | None = None) -> LoadedHead:
    """Rebuild a head saved by :func:`save_head`; nothing is unpickled.

    Args:
        directory: holds ``head.json`` and ``head.safetensors``.
        expected: the content hashes recorded at registration (:data:`DIGEST_KEYS`); both
            files must match them before either is parsed. None for a local head (its
            weights are then still checked against the hash inside its ``head.json``).
        label: what to call the head in messages (``head.colour v3``) instead of its
            files' paths (a registry download lives in a temporary folder).

    Raises:
        HeadArtifactError: one line naming the head (or file) and what is wrong.
    """
    directory = Path(directory)
    spec_where = f"{label}: {SPEC_FILE}" if label else str(directory / SPEC_FILE)
    weights_where = f"{label}: {WEIGHTS_FILE}" if label else str(directory / WEIGHTS_FILE)
    expected = dict(expected or {})
    spec_bytes = _read(directory / SPEC_FILE, spec_where)
    weights_bytes = _read(directory / WEIGHTS_FILE, weights_where)
    # Both hashes before any parsing: a tampered file is refused, not interpreted.
    _check_digest(spec_bytes, expected.get(SPEC_SHA256), spec_where)
    _check_digest(weights_bytes, expected.get(WEIGHTS_SHA256), weights_where)
    try:
        meta = json.loads(spec_bytes.decode("utf-8"))
    except UnicodeDecodeError:
        raise HeadArtifactError(f"{spec_where}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise HeadArtifactError(f"{spec_where}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise HeadArtifactError(f"{spec_where}: not valid JSON (nested too deeply)") from None
    _check_meta(meta, spec_where)
    if meta.get(WEIGHTS_SHA256) is not None and sha256_bytes(weights_bytes) != meta[WEIGHTS_SHA256]:
        raise HeadArtifactError(f"{weights_where} does not match the sha256 in its {SPEC_FILE} (tampered or corrupt)")
    try:
        cls = head_class(meta["target"])
        kwargs = check_kwargs(cls, meta["kwargs"])
    except HeadArtifactError as e:
        msg = str(e) if str(e).startswith("field ") else f"field 'target': {e}"
        raise HeadArtifactError(f"{spec_where}: {msg}") from None
    try:
        module = cls(in_features=meta["in_features"], num_classes=meta["num_classes"], **kwargs)
    except (TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeadArtifactError(f"{spec_where}: field 'kwargs': cannot build {meta['target']} ({first})") from None
    try:
        state = load_safetensors(weights_bytes)
    except SafetensorError as e:
        raise HeadArtifactError(f"{weights_where}: not a safetensors file ({str(e).splitlines()[0]}); "
                                f"nothing was unpickled") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HeadArtifactError(f"{weights_where}: weights do not fit {meta['target']} "
                                f"({str(e).splitlines()[0]})") from None
    return LoadedHead(module=module.eval(), meta=meta)
