"""Filling the feature cache for a trunk (``tools.extract``, and head training's missing rows)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from registry.store.workspace import Workspace
from trunk.extract import ExtractResult, extract
from trunk.model import POOLED, Trunk

log = logging.getLogger(__name__)


def extract_job(trunk: Trunk, paths: Sequence[str], *, workspace: Workspace, taps: Sequence[str] = (POOLED,),
                batch_size: int, num_workers: int, device: str, progress: bool) -> ExtractResult:
    """Fill the workspace's feature cache for ``paths``; computes only what is missing.

    Each file is read at most once (files the cache's content-hash index knows, whose rows
    are cached, not at all); contents recorded as undecodable (the cache's
    ``decode-errors.json``) are listed in the result's errors without being decoded again.
    """
    for tap in taps:
        trunk.tap(tap)  # unknown tap: a TrunkError listing the valid ones, before any work
    return extract(trunk, paths, workspace.cache, taps=tuple(taps), batch_size=batch_size,
                   num_workers=num_workers, device=device, progress=progress, hashes=workspace.content_hashes())
