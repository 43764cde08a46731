"""Fixtures shared by the trunk tests."""

from __future__ import annotations

import fsspec
import pytest


@pytest.fixture
def memfs():
    """fsspec's memory filesystem is one store per process: leave it empty for the next test."""
    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]
