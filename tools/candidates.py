"""The refresh candidate, one class per option of the ``candidate`` config group (conf/candidate/).

``tools.refresh`` instantiates the chosen option (:func:`build_candidate`); only the classes in
:data:`CANDIDATE_CLASSES` may be named, checked before anything is imported or called. Each
gives the builder :func:`registry.jobs.refresh.refresh_job` runs (None: an existing trunk version).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# The only `_target_`s a candidate config may name.
CANDIDATE_CLASSES = ("tools.candidates.Registered", "tools.candidates.Multitask", "tools.candidates.Timm",
                     "tools.candidates.Distill")


@dataclass
class Context:
    """What every builder needs from the run: the root config, MLflow, the workspace, the device."""

    cfg: DictConfig
    client: Any
    ws: Any
    device: str
    num_workers: int

    @property
    def augment(self) -> list:
        return OmegaConf.to_container(self.cfg.augment.ops, resolve=True)

    def overridden(self, node: str) -> set[str]:
        """The fields of ``node`` (e.g. ``multitask``) this run's command line sets; ``augment`` for that group."""
        if not HydraConfig.initialized():
            return set()
        return overridden_fields(list(HydraConfig.get().overrides.task), node)


def overridden_fields(overrides: list[str], node: str) -> set[str]:
    """The settings a command line sets: ``node.<field>`` overrides give ``<field>``, ``augment`` /
    ``augment.*`` give ``augment``; a whole ``node=...`` override gives every field it names."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fields: set[str] = set()
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key == "augment" or key.startswith("augment."):
            fields.add("augment")
        elif key.startswith(f"{node}."):
            fields.add(key[len(node) + 1:].split(".")[0])
        elif key == node and isinstance(override.value(), dict):
            fields.update(str(k) for k in override.value())
    return fields


class Registered:
    """A trunk already registered: the alias ``candidate`` (``version`` None) or version N."""

    def __init__(self, version: int | None = None) -> None:
        self.version = version

    @property
    def name(self) -> str | int:
        return "candidate" if self.version is None else self.version

    def builder(self, ctx: Context) -> None:
        return None


class _Trained:
    """A candidate trained in this run, from the root config's settings node (``multitask`` or ``distill``)."""

    name = "candidate"

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def training_args(self, ctx: Context) -> dict[str, Any]:
        """The keyword arguments both training candidates take, from the settings and the run."""
        s = self.settings
        return dict(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], weight_decay=s["weight_decay"],
                    augment_ops=ctx.augment, seed=s["seed"], device=ctx.device, num_workers=ctx.num_workers,
                    progress=ctx.cfg.progress)


class Multitask(_Trained):
    """The production trunk (``base: config``: the ``trunk`` group) retrained on every production head's data.

    It keeps the production trunk's stored recipe; the ``multitask.*`` settings and the
    ``augment`` group apply only where the command line sets them (or where production has
    no recipe).
    """

    def builder(self, ctx: Context) -> Callable[[], Any]:
        from registry.jobs import refresh
        from registry.jobs.train_trunk import SETTING_FIELDS
        from tools.common import build_trunk

        base = build_trunk(ctx.cfg.trunk) if self.settings["base"] == "config" else None
        # Only what the command line sets replaces the production trunk's recipe.
        overridden = ctx.overridden("multitask") & set(SETTING_FIELDS)
        return lambda: refresh.multitask_candidate(ctx.client, ctx.ws, base=base, overridden=overridden,
                                                   **self.training_args(ctx))


class Timm:
    """The ``trunk`` config group's model as it is."""

    name = "candidate"

    def builder(self, ctx: Context) -> Callable[[], Any]:
        from registry.jobs import refresh
        from tools.common import build_trunk

        return lambda: refresh.timm_candidate(ctx.client, build_trunk(ctx.cfg.trunk))


class Distill(_Trained):
    """Production's trunk distilled into ``settings.student``."""

    def builder(self, ctx: Context) -> Callable[[], Any]:
        from registry.jobs import refresh

        d = self.settings
        return lambda: refresh.distill_candidate(
            ctx.client, ctx.ws, model_name=d["student"]["model_name"], model_kwargs=d["student"]["model_kwargs"],
            student_seed=d["student"]["seed"], input=d["input"], taps=d["taps"], **self.training_args(ctx))


def build_candidate(cfg: DictConfig) -> Registered | Multitask | Timm | Distill:
    """Instantiate ``cfg.candidate`` if it names one of :data:`CANDIDATE_CLASSES` and nothing else private."""
    node = cfg.candidate
    target = node.get("_target_")
    if target not in CANDIDATE_CLASSES:
        raise ValueError(f"field 'candidate._target_': '{target}' is not one of {', '.join(CANDIDATE_CLASSES)}")
    for key in node:
        if str(key).startswith("_") and key != "_target_":
            raise ValueError(f"field 'candidate.{key}': '{key}' is not allowed in a candidate config")
    return instantiate(node, _convert_="all")
