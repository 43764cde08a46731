"""Shared fixtures: tiny trunks and generated images, all in temporary folders."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch

warnings.filterwarnings("ignore", category=UserWarning, module="timm")

# The platform reads MLflow's URI variables as the user's choice of store (registry.store.tracking),
# and mlflow.set_tracking_uri exports its argument to them. Tests never use the caller's store, and
# one test's URI must not become the next test's store: none is set when a test starts or after it ends
# (a test that needs one sets it with monkeypatch).
MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
for _variable in MLFLOW_URI_VARIABLES:
    os.environ.pop(_variable, None)


@pytest.fixture(autouse=True)
def no_mlflow_uri_in_the_environment():
    for variable in MLFLOW_URI_VARIABLES:
        os.environ.pop(variable, None)
    yield
    for variable in MLFLOW_URI_VARIABLES:
        os.environ.pop(variable, None)


TINY_MODELS = ["test_resnet", "test_convnext", "test_vit", "test_efficientnet"]
SMALL = {"input_size": [3, 32, 32], "crop_pct": 1.0}


@pytest.fixture(scope="session")
def tiny_trunk():
    from trunk.model import Trunk

    return Trunk("test_resnet", data_config=SMALL)


def write_image(path: Path, color: tuple[int, int, int], size: int = 40, seed: int = 0, fmt: str | None = None) -> Path:
    """A solid colour with mild noise, so images of one class differ byte-wise."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


@pytest.fixture
def image_factory(tmp_path):
    def make(name: str, color=(200, 30, 30), size: int = 40, seed: int = 0, fmt: str | None = None) -> Path:
        return write_image(tmp_path / name, color, size=size, seed=seed, fmt=fmt)

    return make


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core CPU: intra-op threads cost far more in sync than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
