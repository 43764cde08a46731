"""The trunk's own preprocessing: timm's eval transform built from its data config.

The feature cache keys on :func:`trunk.model.preprocess_key` of the same data config,
so changing any of these settings can never serve features computed under others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform


def eval_transform(data_config: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised ``(3, H, W)`` float tensor, exactly as timm evaluates."""
    cfg = dict(data_config)
    cfg["input_size"] = tuple(cfg["input_size"])
    cfg["mean"] = tuple(cfg["mean"])
    cfg["std"] = tuple(cfg["std"])
    return create_transform(**cfg, is_training=False)


def decode_side(data_config: Mapping[str, Any]) -> int:
    """The shortest side a decoded image needs so that :func:`eval_transform` never upsamples it.

    timm's eval transform resizes the shorter side to ``input / crop_pct`` (for every
    crop mode) and then crops. Decoding a JPEG in Pillow's draft mode down to at least
    this side skips most of the decoding work on large photos and changes the pixels only
    by the resize filter's difference.
    """
    height, width = data_config["input_size"][-2:]
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    return int(math.ceil(max(height, width) / crop_pct))
