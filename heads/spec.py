"""Head configs: the structured-config schema, loading from Hydra's search path, validation.

A product team describes a head in one file, ``conf/heads/<name>.yaml`` (or
``heads/<name>.yaml`` in any folder on Hydra's search path). Every problem with such a
file is a :class:`HeadConfigError` whose message is one line naming the file and the
field, e.g. ``conf/heads/count.yaml: field 'train.epochs': Value 'ten' could not be
converted to Integer``.

Head configs come from other teams, so they are untrusted input:

- the file is at most :data:`MAX_CONFIG_BYTES` and YAML aliases (``*name``) are refused, so
  neither a huge file nor a billion-laughs document can stall the platform;
- a value may interpolate only ``${workspace}``-style keys the platform provides (and
  ``${head.<field>}``); resolvers such as ``${oc.env:HOME}`` or ``${oc.decode:...}`` are
  refused before anything is resolved, so a config cannot read the environment;
- ``module._target_`` must be one of :data:`HEAD_MODULE_CLASSES` (an allowlist of classes,
  matched exactly, checked before anything is imported or called), and every
  ``augment`` target, at any depth, a public albumentations transform class
  (:func:`trunk.augment.check_ops`); ``_args_``, ``_partial_`` and other ``_`` keys are refused.

Configs a head version stored in MLflow go through the same checks (:func:`read_config_file`,
:func:`validate`).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf._utils import get_yaml_loader  # the loader OmegaConf.load uses (its float rules)
from omegaconf.errors import OmegaConfBaseException

NAME_RE = re.compile(r"^[a-z0-9_]+$")
POOLED = "pooled"  # the pre-logits tap, trunk.model.POOLED
# Team-supplied configs may only instantiate the platform's own head modules.
ALLOWED_TARGET_PREFIXES = ("heads.",)
# The allowlist: the only classes a head config's `module._target_` may name, matched
# exactly before anything is imported. A new head type is added here.
HEAD_MODULE_CLASSES = ("heads.modules.LinearHead", "heads.modules.MLPHead", "heads.branch.BranchHead")
# A head config is a page of YAML; 64 KiB is ~50x the largest real one, and the pure-Python
# YAML parser reads it in well under a second (1 MiB takes ~10 s on a busy core).
MAX_CONFIG_BYTES = 64 * 1024
# ${key} or ${key.sub}: plain interpolation, no resolver (`oc.env:`), no nesting.
_PLAIN_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")
# `data` fields added after heads were registered; left out of config_sha while unset.
_NEWER_DATA_FIELDS = ("allow_roots", "heldout")
if TYPE_CHECKING:
    from heads.monitor.drift import DriftThresholds
# Top-level fields added after heads were registered; left out of config_sha while unset.
_NEWER_FIELDS = ("monitor",)
# Arguments the platform fills in itself when it builds a head module.
PLATFORM_ARGS = ("in_features", "num_classes")


class HeadConfigError(ValueError):
    """A head config is wrong; the message names the file and the field."""

    def __init__(self, source: str, field_name: str, message: str) -> None:
        super().__init__(f"{source}: field '{field_name}': {message}")
        self.source = source
        self.field = field_name


# -- schema -----------------------------------------------------------------------------
@dataclass
class DataConfig:
    # Exactly one of root (a folder of class sub-folders) or manifest (CSV/Parquet with
    # path,label and optional split, slice columns; relative paths are relative to it).
    root: Optional[str] = None
    manifest: Optional[str] = None
    # Used when the data has no split column: a seeded, stratified validation split.
    val_fraction: float = 0.2
    split_seed: int = 0
    # Absolute folders, besides the data's own folder, that manifest (and golden) rows may
    # point into. Rows outside them are refused before the file is opened (heads/training/data.py).
    allow_roots: list[str] = field(default_factory=list)
    # A labelled set the head never trains on (CSV/Parquet with path,label and optional slice;
    # relative paths are relative to it), scored by the refresh cascade (heads/checks/heldout.py).
    heldout: Optional[str] = None


@dataclass
class AttachConfig:
    # `pooled` (the pre-logits vector) or an earlier tap named after timm's feature_info.
    tap: str = "pooled"


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-4
    # Early stopping: stop after this many epochs without a better val accuracy.
    patience: int = 10
    seed: int = 0


@dataclass
class GateConfig:
    # A head must meet all of these to enter a release.
    min_val_accuracy: float = 0.0
    max_added_gflops: Optional[float] = None
    max_added_ms_per_image: Optional[float] = None
    # Floor for every slice with at least min_slice_size validation examples.
    min_slice_accuracy: Optional[float] = None
    min_slice_size: int = 20
    # The refresh cascade's contract against this head's production version (None: the
    # platform default, conf/refresh.yaml): val accuracy may drop at most `tolerance`,
    # each slice with at least min_slice_size examples at most `slice_tolerance`.
    tolerance: Optional[float] = None
    slice_tolerance: Optional[float] = None
    # Images that must keep their labels on any new trunk: CSV/Parquet with path,label.
    golden: Optional[str] = None


@dataclass
class HeadConfig:
    name: str = MISSING
    owner: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    attach: AttachConfig = field(default_factory=AttachConfig)
    # `_target_` (a class in the heads package) plus its keyword arguments.
    module: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    # Branch heads train from images: albumentations ops, e.g. [{_target_: albumentations.HorizontalFlip}].
    # Heads on `pooled` train on cached features and ignore it.
    augment: Optional[list] = None
    description: str = ""
    # Drift thresholds for this head's monitoring verdict (heads.monitor.drift.DriftThresholds
    # fields, e.g. {label_psi_drift: 0.3, alpha_drift: 0.0001}); unset: the platform defaults.
    monitor: Optional[dict[str, Any]] = None


def item_property(attribute: str, *keys: str) -> property:
    """A read-only property giving ``self.<attribute>[keys[0]][keys[1]]...``: one field of a config dict."""

    def get(self: Any) -> Any:
        value = getattr(self, attribute)
        for key in keys:
            value = value[key]
        return value

    return property(get, doc=f"``{attribute}{''.join(f'[{k!r}]' for k in keys)}``")


@dataclass(frozen=True)
class HeadSpec:
    """A validated head config plus where it came from.

    Attributes:
        config: the validated, resolved config (a plain dict, ``HeadConfig``'s shape).
        source: the file it was read from (for error messages).
    """

    config: dict[str, Any]
    source: str

    name = item_property("config", "name")
    owner = item_property("config", "owner")
    tap = item_property("config", "attach", "tap")
    data = item_property("config", "data")
    train = item_property("config", "train")
    gate = item_property("config", "gate")
    module = item_property("config", "module")

    @property
    def config_sha(self) -> str:
        """Hash of the resolved config (MLflow tag ``config_sha``)."""
        config = self.config
        data = config.get("data", {})
        # Unset, the newer fields are left out: heads registered before them keep their sha.
        unset = [k for k in _NEWER_DATA_FIELDS if k in data and not data[k]]
        if unset:
            config = {**config, "data": {k: v for k, v in data.items() if k not in unset}}
        if any(k in config and not config[k] for k in _NEWER_FIELDS):
            config = {k: v for k, v in config.items() if not (k in _NEWER_FIELDS and not v)}
        blob = json.dumps(config, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def error(self, field_name: str, message: str) -> HeadConfigError:
        return HeadConfigError(self.source, field_name, message)

    def drift_thresholds(self) -> DriftThresholds:
        """The head's drift thresholds: its ``monitor:`` block over the platform defaults.

        Raises:
            HeadConfigError: the block is invalid (checked at load already; a spec built by
                hand, e.g. from a registered config, is checked here), naming file and field.
        """
        return _drift_thresholds(self.config.get("monitor"), self.source)

    def check_tap(self, valid_taps: Iterable[str]) -> None:
        """Raise unless the head's tap is one of the trunk's."""
        valid = list(valid_taps)
        if self.tap not in valid:
            raise self.error("attach.tap", f"unknown tap '{self.tap}'; valid taps: {', '.join(valid)}")


# -- Hydra's `head` config group: found on Hydra's search path, read safely --------------------
# Users write `head=<name>` and the files live in `heads/` folders (DESIGN.md); Hydra names a
# group after its folder, so the config sources below serve the folder `heads/` as the group
# `head` (the group's default package, `head`, is then where the config lands, as users expect).
HEAD_GROUP = "head"
HEAD_FOLDER = "heads"
# The names of shared fragments (e.g. `_defaults`) start with `_`; they are not heads.
_HIDDEN_PREFIX = "_"
# Where each head config Hydra composed was read from: (source path, config name) -> file.
_LOADED: dict[str, str] = {}


def _folder_path(config_path: str) -> str:
    """The on-disk path of a config path in the `head` group (``head/colour`` -> ``heads/colour``)."""
    if config_path == HEAD_GROUP or config_path.startswith(HEAD_GROUP + "/"):
        return HEAD_FOLDER + config_path[len(HEAD_GROUP):]
    return config_path


def _is_head_file(folder_path: str) -> bool:
    return folder_path.startswith(HEAD_FOLDER + "/")


def _checked_head_yaml(path: str | Path, source: str) -> Any:
    """A head file's YAML, read the safe way: size cap and no aliases (raw bytes), no resolvers,
    no ``# @package`` header and a defaults list of plain names in the same group only."""
    raw = read_config_file(path, source)
    with open(path, "rb") as f:  # Hydra reads a package header from the first comment lines
        head_text = f.read(512).decode("utf-8", "replace")
    if re.search(r"^\s*#\s*@", head_text, flags=re.MULTILINE):
        raise HeadConfigError(source, "<file>", "'# @package' headers are not allowed in a head config: it is "
                                                "always composed at `head`")
    if not isinstance(raw, dict):
        raise HeadConfigError(source, "<root>", "a head config must be a mapping")
    defaults = raw.get("defaults", [])
    if not isinstance(defaults, list):
        raise HeadConfigError(source, "defaults", "must be a list of shared head configs, e.g. [_defaults, _self_]")
    for i, entry in enumerate(defaults):
        # Only other files of the head group (no /absolute groups, overrides or packages): a
        # head config must not reach the tool's or Hydra's own settings (hydra.callbacks, ...).
        if not (isinstance(entry, str) and NAME_RE.match(entry)):
            raise HeadConfigError(source, f"defaults[{i}]", f"{entry!r}: a head's defaults list may only name "
                                                            f"shared head configs of its own folder ([a-z0-9_]+)")
    # Before Hydra holds the config: a value may not call a resolver (oc.env reads the environment).
    _check_interpolations(source, {k: v for k, v in raw.items() if k != "defaults"}, "", ["head", "workspace"])
    return raw


def _head_source(base: type) -> type:
    """``base`` (one of Hydra's config sources) serving the folder ``heads/`` as the group ``head``,
    every head file size-, alias- and resolver-checked on its raw bytes before it is parsed."""
    from hydra.plugins.config_source import ConfigLoadError, ConfigResult

    class HeadGroupSource(base):  # type: ignore[misc, valid-type]
        def is_group(self, config_path: str) -> bool:
            return super().is_group(_folder_path(config_path))

        def is_config(self, config_path: str) -> bool:
            return super().is_config(_folder_path(config_path))

        def list(self, config_path: str, results_filter: Any) -> list[str]:
            found = super().list(_folder_path(config_path), results_filter)
            return sorted({HEAD_GROUP if (config_path == "" and name == HEAD_FOLDER) else name for name in found})

        def load_config(self, config_path: str) -> Any:
            folder_path = _folder_path(config_path)
            if not _is_head_file(folder_path):
                return super().load_config(folder_path)
            with self._local_file(self._normalize_file_name(folder_path)) as path:
                if path is None:
                    raise ConfigLoadError(f"Config not found : {folder_path}")
                source = str(path) if self.scheme() == "file" else f"{self.full_path()}/{folder_path}.yaml"
                raw = _checked_head_yaml(path, source)
            _LOADED[config_path.removeprefix(HEAD_GROUP + "/")] = source
            return ConfigResult(config=OmegaConf.create(raw), path=self.full_path(), provider=self.provider,
                                header={"package": None})

        def _local_file(self, name: str):
            import contextlib

            if self.scheme() == "file":
                path = Path(self.path) / name
                return contextlib.nullcontext(path if path.is_file() else None)
            from importlib import resources

            res = resources.files(self.path).joinpath(name)
            return resources.as_file(res) if res.is_file() else contextlib.nullcontext(None)

    HeadGroupSource.__name__ = HeadGroupSource.__qualname__ = base.__name__
    return HeadGroupSource


def install_head_group() -> None:
    """Make Hydra read ``file://`` and ``pkg://`` config folders through the head-group sources.

    Idempotent; called before any composition (tools.common, :func:`compose_head`). Hydra has no
    public hook for how a file is read, so its own source classes are replaced in its registry
    of schemes; a test (tests/heads/test_spec.py) drives a billion-laughs head through it.
    """
    from hydra._internal.core_plugins.file_config_source import FileConfigSource
    from hydra._internal.core_plugins.importlib_resources_config_source import ImportlibResourcesConfigSource
    from hydra._internal.sources_registry import SourcesRegistry
    from hydra.core.plugins import Plugins

    Plugins.instance()  # Hydra registers its own sources first; ours then take their schemes
    types = SourcesRegistry.instance().types
    for base in (FileConfigSource, ImportlibResourcesConfigSource):
        if not getattr(types.get(base.scheme()), "_vtp_head_group", False):
            cls = _head_source(base)
            cls._vtp_head_group = True
            types[base.scheme()] = cls


def loaded_from(name: str) -> str:
    """The file Hydra's ``head=<name>`` was read from (for messages), or ``heads/<name>.yaml``."""
    return _LOADED.get(name, f"{HEAD_FOLDER}/{name}.yaml")


def search_dirs(searchpath: Sequence[str] = (), conf_dir: str | Path | None = None) -> list[str]:
    """Hydra's search path for head configs: the platform's ``conf/`` then ``hydra.searchpath``.

    Args:
        searchpath: entries of ``hydra.searchpath`` (``file://DIR``, ``pkg://PKG`` or a plain dir).
        conf_dir: the platform's own config folder (defaults to the repo's ``conf/``).

    Returns:
        Search path entries (``file://...``, ``pkg://...``), in Hydra's order: the first that has
        ``heads/<name>.yaml`` wins.
    """
    first = str(conf_dir) if conf_dir else str(default_conf_dir())
    return [p if "://" in p else f"file://{p}" for p in (first, *map(str, searchpath))]


def default_conf_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "conf"


def _search_path(dirs: Sequence[str | Path]) -> Any:
    """Hydra's search path for ``dirs`` (``search_dirs``' entries), as ``@hydra.main`` builds it."""
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    install_head_group()
    entries = search_dirs(list(map(str, dirs[1:])), conf_dir=str(dirs[0]).removeprefix("file://"))
    csp = ConfigSearchPathImpl()
    csp.append("hydra", "pkg://hydra.conf")
    csp.append("main", entries[0])
    for entry in entries[1:]:
        csp.append("hydra.searchpath in command-line", entry)
    csp.append("schema", "structured://")
    return csp


def _repository(dirs: Sequence[str | Path]) -> Any:
    from hydra._internal.config_repository import ConfigRepository

    return ConfigRepository(_search_path(dirs))


def find_head_file(name: str, dirs: Sequence[str | Path]) -> str:
    """Where Hydra finds ``head=<name>``: the first search-path entry with ``heads/<name>.yaml``."""
    if not NAME_RE.match(name) or name.startswith(_HIDDEN_PREFIX):
        raise HeadConfigError(f"heads/{name}.yaml", "name", f"'{name}' is not a valid head name ([a-z0-9_]+)")
    repo = _repository(dirs)
    for source in repo.get_sources():
        if source.is_config(f"{HEAD_GROUP}/{name}"):
            return f"{source.full_path()}/{HEAD_FOLDER}/{name}.yaml".removeprefix("file://")
    where = ", ".join(f"{s.full_path()}/{HEAD_FOLDER}" for s in repo.get_sources() if s.provider != "schema"
                      and s.provider != "hydra")
    raise HeadConfigError(f"heads/{name}.yaml", "head",
                          f"no such head config in {where}; known heads: {', '.join(list_heads(dirs)) or 'none'}")


def list_heads(dirs: Sequence[str | Path]) -> list[str]:
    """The options of Hydra's ``head`` group on the search path (shared ``_`` fragments left out)."""
    return [n for n in _repository(dirs).get_group_options(HEAD_GROUP) if not n.startswith(_HIDDEN_PREFIX)]


def compose_head(name: str, dirs: Sequence[str | Path]) -> tuple[dict[str, Any], str]:
    """Compose ``head=<name>`` with Hydra on the search path ``dirs``, unresolved.

    Returns:
        The composed head (its defaults list applied, nothing resolved) and the file it came from.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.types import RunMode

    source = find_head_file(name, dirs)
    cfg = ConfigLoaderImpl(config_search_path=_search_path(dirs)).load_configuration(
        config_name=None, overrides=[f"+{HEAD_GROUP}={name}"], run_mode=RunMode.RUN)
    return OmegaConf.to_container(cfg[HEAD_GROUP], resolve=False), source


# -- validation -----------------------------------------------------------------------
def resolve_head_class(target: Any, where: str = "module._target_") -> type:
    """The head module class ``target`` names, if it is on the allowlist; nothing else is imported.

    Args:
        target: a ``module._target_`` (head config) or a stored ``head.json``'s ``target``.
        where: the field, for messages.

    Raises:
        trunk.targets.TargetError: ``target`` is not one of :data:`HEAD_MODULE_CLASSES`.
    """
    from trunk.targets import TargetError

    allowed = ", ".join(HEAD_MODULE_CLASSES)
    if not isinstance(target, str) or target not in HEAD_MODULE_CLASSES:
        why = ("is outside the platform's packages" if not str(target).startswith(ALLOWED_TARGET_PREFIXES)
               else "does not exist or is not a head class")
        raise TargetError(where, f"{target!r} {why}; allowed head classes: {allowed}")
    # The module name comes from our own list, never from the config's string.
    mod_name, _, attr = target.rpartition(".")
    module = sys.modules.get(mod_name) or importlib.import_module(mod_name)
    cls = vars(module).get(attr)
    if not isinstance(cls, type) or f"{cls.__module__}.{cls.__qualname__}" != target:
        raise TargetError(where, f"'{target}' is not a head class")  # the allowlist itself is wrong
    return cls


def _check_plain_arguments(source: str, node: Any, where: str) -> None:
    """Module arguments are plain values: nothing nested is instantiated, no `_` keys."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and key.startswith("_"):
                raise HeadConfigError(source, f"{where}.{key}", f"'{key}' is not allowed in head module arguments "
                                                                f"(plain values only)")
            _check_plain_arguments(source, value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_plain_arguments(source, value, f"{where}[{i}]")


def _check_module(source: str, module: Mapping[str, Any], tap: str) -> None:
    from trunk.targets import TargetError

    target = module.get("_target_")
    if not isinstance(target, str) or not target:
        raise HeadConfigError(source, "module._target_", "missing; name a head class such as heads.modules.LinearHead")
    for key, value in module.items():
        if key != "_target_":
            _check_plain_arguments(source, {key: value}, "module")
    try:
        cls = resolve_head_class(target)
    except TargetError as e:
        raise HeadConfigError(source, e.field, e.reason) from None
    params = inspect.signature(cls).parameters
    # A module class may declare more arguments the platform fills in (a branch's trunk).
    reserved = PLATFORM_ARGS + tuple(getattr(cls, "platform_args", ()))
    if getattr(cls, "is_branch", False) and tap == POOLED:
        raise HeadConfigError(source, "attach.tap", f"{target} forks at an earlier tap, not at '{POOLED}'; "
                                                    f"name one such as layer3, or use heads.modules.LinearHead")
    if not getattr(cls, "is_branch", False) and tap != POOLED:
        raise HeadConfigError(source, "module._target_", f"{target} reads the '{POOLED}' vector; a head on tap "
                                                         f"'{tap}' must be a branch (heads.branch.BranchHead)")
    for key in module:
        if key.startswith("_"):
            continue
        if key in reserved:
            raise HeadConfigError(source, f"module.{key}", "is set by the platform from the trunk and the data")
        if key not in params:
            valid = [p for p in params if p not in reserved]
            raise HeadConfigError(source, f"module.{key}",
                                  f"unknown argument of {target}; valid: {', '.join(valid) or 'none'}")


def validate(raw: Any, source: str, context: Mapping[str, Any] | None = None,
             expected_name: str | None = None) -> HeadSpec:
    """Validate a raw head config against the schema.

    Args:
        raw: the loaded YAML (dict or DictConfig).
        source: file name for messages.
        context: root-level keys (e.g. ``workspace``) that ``${...}`` in the file may use.
        expected_name: the file's stem; the ``name`` field must match it.
    """
    if not isinstance(raw, (dict, DictConfig)):
        raise HeadConfigError(source, "<root>", "a head config must be a mapping")
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=False)
    # Before anything is resolved: a value may not call a resolver (oc.env reads the environment).
    _check_interpolations(source, raw, "", sorted({*(context or {}), "head"}))
    try:
        root = OmegaConf.create(dict(context or {}))
        root["head"] = OmegaConf.merge(OmegaConf.structured(HeadConfig), raw)
        merged = OmegaConf.to_container(root, resolve=True, throw_on_missing=True)["head"]
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "").removeprefix("head.") or "<root>"
        msg = str(getattr(e, "msg", None) or e).splitlines()[0]
        raise HeadConfigError(source, key, msg) from None
    name = merged["name"]
    if not NAME_RE.match(name):
        raise HeadConfigError(source, "name", f"'{name}' must match [a-z0-9_]+")
    if expected_name is not None and name != expected_name:
        raise HeadConfigError(source, "name", f"'{name}' must equal the file name '{expected_name}'")
    if not str(merged["owner"]).strip():
        raise HeadConfigError(source, "owner", "must not be empty")
    data = merged["data"]
    if bool(data["root"]) == bool(data["manifest"]):
        raise HeadConfigError(source, "data", "give exactly one of data.root (class folders) or data.manifest")
    if not 0.0 < data["val_fraction"] < 1.0:
        raise HeadConfigError(source, "data.val_fraction", f"{data['val_fraction']} is not between 0 and 1")
    if not isinstance(merged["module"], dict):
        raise HeadConfigError(source, "module", "must be a mapping with a _target_")
    _check_module(source, merged["module"], merged["attach"]["tap"])
    if merged["augment"]:
        from trunk.augment import check_ops  # albumentations loads only for configs that augment
        from trunk.targets import TargetError

        try:
            check_ops(merged["augment"])
        except TargetError as e:
            raise HeadConfigError(source, e.field, e.reason) from None
    if data["heldout"] is not None:
        heldout = str(data["heldout"]).strip()
        if not heldout:
            raise HeadConfigError(source, "data.heldout", "is empty; name a CSV or Parquet file, or leave it out")
        if data["manifest"] and Path(heldout).resolve() == Path(data["manifest"]).resolve():
            raise HeadConfigError(source, "data.heldout", f"'{heldout}' is data.manifest itself; name images the "
                                                          f"head never trains on")
    for i, root_dir in enumerate(data["allow_roots"]):
        if not Path(root_dir).is_absolute():
            raise HeadConfigError(source, f"data.allow_roots[{i}]", f"'{root_dir}' must be an absolute folder")
    _drift_thresholds(merged["monitor"], source)
    train = merged["train"]
    for key in ("epochs", "batch_size"):
        if train[key] < 1:
            raise HeadConfigError(source, f"train.{key}", f"{train[key]} must be at least 1")
    if train["lr"] <= 0:
        raise HeadConfigError(source, "train.lr", f"{train['lr']} must be positive")
    for key in ("tolerance", "slice_tolerance"):
        value = merged["gate"][key]
        if value is not None and not 0.0 <= value <= 1.0:
            raise HeadConfigError(source, f"gate.{key}", f"{value} is not between 0 and 1")
    return HeadSpec(config=merged, source=source)


def _drift_thresholds(monitor: Any, source: str) -> DriftThresholds:
    """``DriftThresholds.from_config`` with its errors as :class:`HeadConfigError` (file and field)."""
    # Imported here: drift pulls in torch, which validating a config does not otherwise need.
    from heads.monitor.drift import DriftConfigError, DriftThresholds

    try:
        return DriftThresholds.from_config(monitor, source=source)
    except DriftConfigError as e:
        # Its message is "<source>: monitor.<field> <why>"; split out the field for the usual form.
        found = re.match(rf"{re.escape(source)}: (monitor(?:\.\w+)?) (?:= )?(.*)$", str(e))
        field_name, why = (found.group(1), found.group(2)) if found else ("monitor", str(e))
        raise HeadConfigError(source, field_name, why) from None


def _check_interpolations(source: str, node: Any, where: str, known: Sequence[str]) -> None:
    """Refuse any ``${...}`` other than plain interpolation of ``known`` root keys."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_interpolations(source, value, f"{where}.{key}" if where else str(key), known)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _check_interpolations(source, value, f"{where}[{i}]", known)
    elif isinstance(node, str) and "${" in node:
        field_name = where or "<root>"
        allowed = ", ".join(f"${{{k}}}" for k in known)
        for match in _PLAIN_INTERPOLATION.finditer(node):
            if match.group(1).split(".")[0] not in known:
                raise HeadConfigError(source, field_name, f"'${{{match.group(1)}}}' is not a key the platform "
                                                          f"provides; a head config may use {allowed}")
        if "${" in _PLAIN_INTERPOLATION.sub("", node):
            raise HeadConfigError(source, field_name, f"{node!r}: only plain interpolation ({allowed}) is allowed; "
                                                      f"resolvers such as oc.env may not read the environment")


class _NoAliasLoader(get_yaml_loader()):  # type: ignore[misc]
    """OmegaConf's YAML loader, refusing aliases: a billion-laughs file fails at its first ``*``."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                                 f"allowed in a head config; write the value out")
        return super().compose_node(parent, index)


def read_config_file(path: str | Path, source: str | None = None) -> Any:
    """Parse a head config file safely: size-checked before reading, no YAML aliases.

    Args:
        path: the YAML file.
        source: the name for messages (defaults to ``path``).

    Returns:
        The plain YAML value (a dict for a well-formed head config).

    Raises:
        HeadConfigError: a missing file, one over :data:`MAX_CONFIG_BYTES`, or YAML that
            does not parse or uses aliases (field ``<file>``).
    """
    path = Path(path)
    source = source or str(path)
    too_big = f"is larger than {MAX_CONFIG_BYTES // 1024} KiB; a head config is a page of YAML"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise HeadConfigError(source, "<file>", too_big)
        with path.open("rb") as f:
            # Read at most one byte past the limit: a file that grows, or a device, is caught too.
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise HeadConfigError(source, "<file>", "no such file") from None
    except OSError as e:
        raise HeadConfigError(source, "<file>", f"cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise HeadConfigError(source, "<file>", too_big)
    try:
        return yaml.load(data.decode("utf-8"), Loader=_NoAliasLoader)
    except Exception as e:  # YAML syntax errors, bad UTF-8, too deep nesting
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeadConfigError(source, "<file>", f"not valid YAML: {first}") from None


def load_head_spec(path: str | Path, context: Mapping[str, Any] | None = None) -> HeadSpec:
    """Read and validate one head config file (no defaults list: a stored or stand-alone file)."""
    path = Path(path)
    raw = read_config_file(path)
    return validate(raw, str(path), context=context, expected_name=path.stem)


def resolve_head(name: str, dirs: Sequence[str | Path], context: Mapping[str, Any] | None = None) -> HeadSpec:
    """Compose ``head=<name>`` through Hydra on the search path ``dirs`` and validate it."""
    raw, source = compose_head(name, dirs)
    return validate(raw, source, context=context, expected_name=name)
