"""The trunk's own preprocessing: timm's eval transform built from its data config.

The feature cache keys on :func:`trunk.model.preprocess_key` of the same data config,
so changing any of these settings can never serve features computed under others.
"""

from __future__ import annotations

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
