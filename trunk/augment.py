"""Training-time augmentation: albumentations ops from config, then the trunk's own resize and normalisation.

Ops come from the ``augment`` config group (or a branch head's ``augment`` list) as a list of
``{_target_: albumentations.X, ...}`` entries. Every ``_target_``, at any nesting level (e.g.
inside ``OneOf``), is resolved to the class it names by walking albumentations' own modules
(:mod:`trunk.targets`), and must be a public albumentations transform class, before any
constructor runs: ``albumentations.os.write`` (the standard library reached through
albumentations' ``import os``) is refused, not called. ``_args_``, ``_partial_`` and other
``_`` keys are refused; transforms are built with keyword arguments only.
After the ops every image is resized to the data config's input size and normalised with
its mean and std, so training sees the same geometry and statistics as evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

from trunk.targets import TARGET_KEY, TargetError, build, check_private_keys, resolve_allowed_class, targets

ALLOWED_PREFIX = "albumentations."
# Public albumentations transforms that take callables or read files a config could name
# (reference images by path, a user function): a config must not reach those through them.
REFUSED_TRANSFORMS = frozenset({"Lambda", "FDA", "HistogramMatching", "PixelDistributionAdaptation", "TextImage"})
HINT = "augmentation ops must be albumentations transform classes, e.g. albumentations.HorizontalFlip"
# timm's interpolation names -> OpenCV's.
_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


class TrainTransform:
    """PIL RGB image -> augmented, normalised ``(3, H, W)`` float32 tensor.

    Attributes:
        compose: the albumentations pipeline (ops, then resize, normalise, to tensor).
    """

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose

    def __call__(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        return self.compose(image=arr)["image"]

    def set_random_seed(self, seed: int | None) -> None:
        """Reseed the pipeline (each data-loader worker needs its own stream)."""
        self.compose.set_random_seed(seed)

    def __repr__(self) -> str:
        return f"TrainTransform({self.compose!r})"


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _allowed_transform(cls: type) -> bool:
    """albumentations' own public transform classes, and only those."""
    return (
        issubclass(cls, (A.BasicTransform, A.BaseCompose))
        and cls.__module__.startswith(ALLOWED_PREFIX)
        # Public: reachable as albumentations.<Name>, the names the docs list.
        and vars(A).get(cls.__name__) is cls
        and cls.__name__ not in REFUSED_TRANSFORMS
    )


def resolve_op(target: Any, where: str) -> type:
    """The albumentations transform class ``target`` names; nothing is imported or called.

    Raises:
        TargetError: ``target`` is not a public albumentations transform class (e.g.
            ``albumentations.os.write``, a function, or a class outside albumentations).
    """
    return resolve_allowed_class(target, A, _allowed_transform, where, hint=HINT)


def check_ops(ops: Any, where: str = "augment") -> list[dict[str, Any]]:
    """Check augmentation ops without calling anything: every ``_target_`` at any depth is
    an allowed class and no ``_`` key other than ``_target_`` appears.

    Args:
        ops: a list of ``{"_target_": "albumentations.X", ...}`` entries (or None).
        where: the field the list sits at, for messages.

    Returns:
        The ops as plain lists and dicts.

    Raises:
        TargetError: one line naming the field.
    """
    ops = _plain(ops) or []
    if not isinstance(ops, (list, tuple)):
        raise TargetError(where, f"expected a list of ops, got {type(ops).__name__}")
    for i, op in enumerate(ops):
        if not isinstance(op, Mapping) or TARGET_KEY not in op:
            raise TargetError(f"{where}[{i}]", f"expected a mapping with a _target_, got {op!r}")
    check_private_keys(ops, where)
    for field_name, target in targets(ops, where):
        resolve_op(target, field_name)
    return list(ops)


def build_ops(ops: Sequence[Mapping[str, Any]] | None) -> list[A.BasicTransform]:
    """Instantiate config entries as albumentations transforms.

    Every target in the list, nested ones included, is resolved and checked by
    :func:`check_ops` before the first constructor runs.

    Args:
        ops: entries like ``{"_target_": "albumentations.HorizontalFlip", "p": 0.5}``.

    Returns:
        The transforms, in order.

    Raises:
        ValueError: one line naming the field (``augment[i]._target_``, ``augment[i]``).
    """
    ops = check_ops(ops)
    built: list[A.BasicTransform] = []
    for i, op in enumerate(ops):
        where = f"augment[{i}]"
        try:
            transform = build(op, resolve_op, where)
        except Exception as e:  # albumentations validates arguments with pydantic and raises many kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"field '{where}': cannot build {op[TARGET_KEY]}: {first}") from None
        built.append(transform)
    return built


def build_train_transform(
    data_config: Mapping[str, Any],
    ops: Sequence[Mapping[str, Any]] | None,
    *,
    seed: int | None = None,
) -> TrainTransform:
    """The training transform for a trunk: augmentation ops, then resize, normalise, to tensor.

    Args:
        data_config: the trunk's data config (``input_size``, ``mean``, ``std``, ``interpolation``).
        ops: albumentations ops as config entries (see :func:`build_ops`); None or [] for none.
        seed: seeds the augmentation's own random stream (albumentations ignores global seeds).

    Returns:
        A callable ``PIL.Image -> torch.FloatTensor (3, H, W)``.

    Raises:
        ValueError: a bad op, naming its field.
    """
    _, height, width = (int(v) for v in data_config["input_size"])
    interpolation = _INTERPOLATION.get(str(data_config.get("interpolation", "bilinear")), cv2.INTER_LINEAR)
    pipeline = [
        *build_ops(ops),
        A.Resize(height, width, interpolation=interpolation),
        A.Normalize(mean=tuple(data_config["mean"]), std=tuple(data_config["std"]), max_pixel_value=255.0),
        ToTensorV2(),
    ]
    return TrainTransform(A.Compose(pipeline, seed=seed))
