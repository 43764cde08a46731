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
                     "tools.candidates.Distill", "tools.candidates.Quantize")


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
    """Production's trunk (or trunk v``settings.teacher``) distilled into ``settings.student``."""

    def builder(self, ctx: Context) -> Callable[[], Any]:
        from registry.jobs import refresh

        d = self.settings
        return lambda: refresh.distill_candidate(
            ctx.client, ctx.ws, model_name=d["student"]["model_name"], model_kwargs=d["student"]["model_kwargs"],
            student_seed=d["student"]["seed"], input=d["input"], taps=d["taps"], teacher=d["teacher"],
            head_loss_weight=d["head_loss_weight"], temperature=d["temperature"], **self.training_args(ctx))


class Quantize:
    """Production's trunk quantized (:mod:`trunk.quantize`); its settings are the config's own fields.

    Args:
        scheme: static, dynamic, weight_only, float16 or bfloat16.
        calibration_images: static: at most this many calibration images.
        input: calibration images (folder, manifest, URI); None: the production heads' training images.
        seed: the order calibration images are drawn in.
        source: the ``trunk`` version to quantize; None: production's (``tools.reduce`` passes
            a distilled student's).
    """

    name = "candidate"

    def __init__(self, scheme: str = "static", calibration_images: int = 256, input: str | None = None,
                 seed: int = 0, source: int | None = None) -> None:
        from trunk.quantize import SCHEMES

        if scheme not in SCHEMES:
            raise ValueError(f"field 'candidate.scheme': '{scheme}' is not one of {', '.join(SCHEMES)}")
        if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 1:
            raise ValueError(f"field 'candidate.calibration_images': '{calibration_images}' is not a count of at "
                             f"least 1")
        if input is not None and (not isinstance(input, str) or not input.strip()):
            raise ValueError(f"field 'candidate.input': '{input}' is not a folder, manifest or URI (or null)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"field 'candidate.seed': '{seed}' is not an integer")
        if source is not None and (isinstance(source, bool) or not isinstance(source, int) or source < 1):
            raise ValueError(f"field 'candidate.source': '{source}' is not a trunk version (or null)")
        self.scheme, self.calibration_images, self.input, self.seed = scheme, calibration_images, input, seed
        self.source = source

    def builder(self, ctx: Context) -> Callable[[], Any]:
        from registry.jobs.quantize import quantize_candidate

        return lambda: quantize_candidate(ctx.client, ctx.ws, scheme=self.scheme,
                                          calibration_images=self.calibration_images, input=self.input,
                                          seed=self.seed, device=ctx.device, progress=ctx.cfg.progress,
                                          source_version=self.source)


def build_candidate(cfg: DictConfig) -> Registered | Multitask | Timm | Distill | Quantize:
    """Instantiate ``cfg.candidate`` if it names one of :data:`CANDIDATE_CLASSES` and nothing else private."""
    node = cfg.candidate
    target = node.get("_target_")
    if target not in CANDIDATE_CLASSES:
        raise ValueError(f"field 'candidate._target_': '{target}' is not one of {', '.join(CANDIDATE_CLASSES)}")
    for key in node:
        if str(key).startswith("_") and key != "_target_":
            raise ValueError(f"field 'candidate.{key}': '{key}' is not allowed in a candidate config")
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as e:  # a class's own one-line refusal of a setting, not Hydra's wrapping
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise
