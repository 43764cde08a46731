"""Filling the feature cache: run the trunk only on images whose features are missing.

Pass 1 reads and hashes every file (cheap next to a forward pass), checks the cached rows
of those hashes against their shards' checksums (quarantining a damaged shard, see
:mod:`trunk.cache`) and asks each tap's cache which hashes it lacks. Pass 2 decodes and preprocesses only those files (one path
per distinct content), runs the trunk once per batch for all requested taps, and appends
each tap's rows to its cache. Rerunning on the same images therefore decodes nothing and
runs no forward pass. Spatial taps are stored flattened, ``[N, C*H*W]``; the trunk's
:meth:`~trunk.model.Trunk.tap` spec gives the shape back.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trunk.cache import FeatureCache
from trunk.decode import ImageError, read_bytes, sha256_bytes
from trunk.device import resolve_device
from trunk.loader import iter_decoded
from trunk.preprocess import eval_transform


@dataclass
class ExtractResult:
    """What :func:`extract` did.

    Attributes:
        shas: per input path, its content hash, or None when it could not be read,
            decoded or preprocessed; every non-None hash has a row in every tap's cache.
        errors: ``{path: one-line reason}`` for the inputs whose hash is None.
        summary: ``images``, ``unique_images``, ``new_rows``, ``reused_rows``, ``errors``,
            ``seconds``, ``images_per_s`` (rows count distinct image contents), and
            ``quarantined_rows`` when damaged shards were moved aside and their rows recomputed.
        caches: ``{tap: FeatureCache}`` that now hold the features.
    """

    shas: list[str | None]
    errors: dict[str, str]
    summary: dict[str, float | int]
    caches: dict[str, FeatureCache] = field(default_factory=dict)


def _hash_files(paths: list[str], progress: bool) -> tuple[list[str | None], dict[str, str]]:
    shas: list[str | None] = []
    errors: dict[str, str] = {}
    for path in tqdm(paths, desc="hashing", unit="img", disable=not progress, file=sys.stderr):
        try:
            shas.append(sha256_bytes(read_bytes(path)))
        except ImageError as e:
            shas.append(None)
            errors[path] = str(e)
    return shas, errors


def _model_device(trunk: torch.nn.Module) -> torch.device:
    return next(iter(trunk.parameters()), torch.empty(0)).device


def extract(
    trunk: Any,
    paths: Sequence[str | Path],
    cache_root: str | Path,
    *,
    taps: Sequence[str] = ("pooled",),
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    dtype: str = "float16",
    progress: bool = True,
) -> ExtractResult:
    """Make sure every readable image in ``paths`` has features in each tap's cache.

    Args:
        trunk: a :class:`trunk.model.Trunk`.
        paths: image files; bad ones become entries in ``errors``, never a failure.
        cache_root: root folder of the feature cache.
        taps: taps to store (checked against the trunk's taps before any work).
        batch_size: images per forward pass.
        num_workers: decoding processes (0: decode in this process).
        device: ``cpu``, ``cuda[:n]`` or ``auto`` (see :func:`trunk.device.resolve_device`).
        dtype: cache storage, ``float16`` or ``int8``.
        progress: show tqdm progress bars on stderr.

    Returns:
        An :class:`ExtractResult` with per-path hashes, errors and a summary.
    """
    start = time.perf_counter()
    taps = list(dict.fromkeys(taps))
    if not taps:
        raise ValueError("extract: field 'taps': give at least one tap")
    caches = {tap: FeatureCache.for_trunk(cache_root, trunk, tap, dtype=dtype) for tap in taps}
    dev = resolve_device(device)
    names = [str(p) for p in paths]

    shas, errors = _hash_files(names, progress)
    unique = list(dict.fromkeys(s for s in shas if s is not None))
    need: set[str] = set()
    quarantined = 0
    for cache in caches.values():
        # Check the stored rows first: a damaged shard is quarantined here, so its rows count
        # as missing and are recomputed below instead of being trained on.
        quarantined += cache.verify(unique)
        need.update(cache.missing(unique))
    # One path per distinct content still missing somewhere: identical files run once.
    first_path = {}
    for path, sha in zip(names, shas):
        if sha in need and sha not in first_path:
            first_path[sha] = path
    todo = list(first_path.values())

    failed: dict[str, str] = {}  # sha -> reason, for content that would not decode
    new_rows = 0
    if todo:
        new_rows = _compute(trunk, todo, caches, taps, dev, batch_size, num_workers, progress, failed)

    result_shas: list[str | None] = []
    for path, sha in zip(names, shas):
        if sha is not None and sha in failed:
            same = first_path.get(sha)
            errors[path] = failed[sha] if same == path else f"{failed[sha]} (same bytes as {same})"
            sha = None
        elif sha is not None and any(sha not in cache for cache in caches.values()):
            # The file's bytes changed between hashing and decoding.
            errors[path] = f"file changed during extraction: {path}"
            sha = None
        result_shas.append(sha)

    seconds = time.perf_counter() - start
    summary: dict[str, float | int] = {
        "images": len(names),
        "unique_images": len(unique),
        "new_rows": new_rows,
        "reused_rows": len(unique) - len(need),
        "errors": len(errors),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(names) / seconds, 1) if seconds > 0 else 0.0,
    }
    if quarantined:  # rows of damaged shards, moved aside and recomputed (see trunk.cache)
        summary["quarantined_rows"] = quarantined
    # Keep the caller's order of errors stable: input order.
    ordered = {p: errors[p] for p in dict.fromkeys(names) if p in errors}
    return ExtractResult(shas=result_shas, errors=ordered, summary=summary, caches=caches)


def _compute(
    trunk: Any,
    todo: list[str],
    caches: dict[str, FeatureCache],
    taps: list[str],
    dev: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool,
    failed: dict[str, str],
) -> int:
    """Decode, forward and store ``todo``; returns how many distinct images were stored."""
    transform = eval_transform(trunk.data_config)
    home = _model_device(trunk)
    # Restore each module's own flag: Trunk keeps its timm model in eval mode while the
    # wrapper itself may say training, so one train(flag) call would not undo eval().
    modes = {m: m.training for m in trunk.modules()}
    trunk.eval().to(dev)
    stored: set[str] = set()
    try:
        with contextlib.ExitStack() as stack, torch.inference_mode():
            writers = {tap: stack.enter_context(caches[tap].writer()) for tap in taps}
            bar = stack.enter_context(
                tqdm(total=len(todo), desc="extracting", unit="img", disable=not progress, file=sys.stderr)
            )
            for batch in iter_decoded(todo, transform, batch_size=batch_size, num_workers=num_workers):
                for sha, err in zip(batch.shas, batch.errors):
                    if err is not None and sha is not None:
                        failed[sha] = err
                ok = batch.ok
                if ok:
                    ok_shas = [batch.shas[i] for i in ok]
                    out = trunk(batch.pixels.to(dev, non_blocking=True), taps)
                    for tap in taps:
                        feats = out[tap].reshape(len(ok), -1)
                        writers[tap].add(ok_shas, feats)
                    stored.update(ok_shas)  # type: ignore[arg-type]
                bar.update(len(batch))
    finally:
        trunk.to(home)
        for module, mode in modes.items():
            module.training = mode
    return len(stored)


def format_summary(summary: dict[str, float | int]) -> str:
    """One line for logs and the tool's output, e.g. ``images=10 new_rows=8 ... images/s=41.2``."""
    order = ("images", "unique_images", "new_rows", "reused_rows", "errors", "seconds", "images_per_s")
    keys = [k for k in order if k in summary] + [k for k in summary if k not in order]
    parts = []
    for key in keys:
        value = summary[key]
        label = "images/s" if key == "images_per_s" else key
        if isinstance(value, float):
            parts.append(f"{label}={value:.2f}" if key == "seconds" else f"{label}={value:.1f}")
        else:
            parts.append(f"{label}={value}")
    return " ".join(parts)
