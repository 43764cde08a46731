"""Training-time augmentation: albumentations ops from config, then the trunk's own resize and normalisation.

Ops come from the ``augment`` config group as a list of ``{_target_: albumentations.X, ...}``
entries. Only ``albumentations.`` targets are accepted (checked at every nesting level,
e.g. inside ``OneOf``), so a config can never make the platform import arbitrary code.
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
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

ALLOWED_PREFIX = "albumentations."
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


def _check_targets(node: Any, where: str) -> None:
    """Refuse any ``_target_`` outside albumentations, at any depth."""
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if "_target_" in node and (not isinstance(target, str) or not target.startswith(ALLOWED_PREFIX)):
            raise ValueError(
                f"field '{where}._target_': {target!r} is not allowed; augmentation ops must be "
                f"'{ALLOWED_PREFIX}*' transforms"
            )
        for key, value in node.items():
            if key != "_target_":
                _check_targets(value, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _check_targets(value, f"{where}[{i}]")


def build_ops(ops: Sequence[Mapping[str, Any]] | None) -> list[A.BasicTransform]:
    """Instantiate config entries as albumentations transforms.

    Args:
        ops: entries like ``{"_target_": "albumentations.HorizontalFlip", "p": 0.5}``.

    Returns:
        The transforms, in order.

    Raises:
        ValueError: one line naming the field (``augment[i]._target_``, ``augment[i]``).
    """
    ops = _plain(ops) or []
    if not isinstance(ops, (list, tuple)):
        raise ValueError(f"field 'augment': expected a list of ops, got {type(ops).__name__}")
    built: list[A.BasicTransform] = []
    for i, op in enumerate(ops):
        where = f"augment[{i}]"
        if not isinstance(op, Mapping) or "_target_" not in op:
            raise ValueError(f"field '{where}': expected a mapping with a _target_, got {op!r}")
        _check_targets(op, where)
        try:
            # _convert_="all": albumentations validates arguments and wants plain lists, not ListConfig.
            transform = instantiate(dict(op), _convert_="all")
        except Exception as e:  # hydra wraps import and argument errors in several types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"field '{where}': cannot build {op['_target_']}: {first}") from None
        if not isinstance(transform, (A.BasicTransform, A.BaseCompose)):
            raise ValueError(f"field '{where}._target_': {op['_target_']} is not an albumentations transform")
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
