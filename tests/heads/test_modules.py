"""Every head module in heads.modules: explicit arguments, right shapes, trainable."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import heads.modules as modules

HEAD_CLASSES = [c for _, c in inspect.getmembers(modules, inspect.isclass)
                if issubclass(c, nn.Module) and c.__module__ == modules.__name__]


def test_registry_is_not_empty():
    assert {c.__name__ for c in HEAD_CLASSES} >= {"LinearHead", "MLPHead"}


@pytest.mark.parametrize("cls", HEAD_CLASSES, ids=lambda c: c.__name__)
def test_head_contract(cls):
    params = inspect.signature(cls).parameters
    assert list(params)[:2] == ["in_features", "num_classes"]
    assert all(p.default is not inspect.Parameter.empty for p in list(params.values())[2:])
    head = cls(in_features=12, num_classes=5)
    x = torch.randn(4, 12)
    out = head(x)
    assert out.shape == (4, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
