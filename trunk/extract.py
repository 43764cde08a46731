"""Filling the feature cache: run the trunk only on images whose features are missing.

Each file is read at most once: its bytes are hashed, and only when that content still lacks
a row (or a verified row) in some requested tap's cache are the same bytes handed to a loader
worker to decode and preprocess (:class:`trunk.dataset.BytesDataset`). With a content-hash
index (:class:`trunk.hashindex.ContentHashes`, what the platform's jobs pass), a file whose
size and mtime the index knows is not read at all when its content's rows are all cached; a
cached file is never decoded, and nothing is read twice. Files are read in chunks of
``batch_size``; before deciding, the cached rows of each chunk's hashes are checked against
their shards' checksums (quarantining a damaged shard, see :mod:`trunk.cache`). Identical
files are decoded once (the first path with that content). The trunk runs once per batch
for all requested taps, and each tap's rows are appended to its cache; rerunning on the
same images therefore decodes nothing and runs no forward pass. Spatial taps are stored
flattened, ``[N, C*H*W]``; the trunk's :meth:`~trunk.model.Trunk.tap` spec gives the shape back.

Decode failures are remembered by content hash in the cache root
(:class:`trunk.cache.DecodeErrors`): a file whose bytes are recorded as undecodable is not
decoded again, yet it is still listed in ``errors`` with its reason, so the summary reads as
if it had been. A file whose bytes changed (a new hash) is decoded again.

The one case that reads a file twice: a shard quarantined while a later chunk is verified
can take rows an earlier chunk counted as cached; those files are read again and recomputed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from trunk.cache import DecodeErrors, FeatureCache
from trunk.dataset import BytesDataset, decode_failed
from trunk.decode import ImageError, read_bytes, sha256_bytes
from trunk.device import resolve_device
from trunk.hashindex import ContentHashes
from trunk.loader import collate_items  # the loader's batch assembly (odd shapes rejected)
from trunk.preprocess import eval_transform

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    """What :func:`extract` did.

    Attributes:
        shas: per input path, its content hash, or None when it could not be read,
            decoded or preprocessed; every non-None hash has a row in every tap's cache.
        errors: ``{path: one-line reason}`` for the inputs whose hash is None, including
            files whose content is recorded as undecodable (not decoded again).
        summary: ``images``, ``unique_images``, ``new_rows``, ``reused_rows``, ``errors``,
            ``seconds``, ``images_per_s`` (rows count distinct image contents);
            ``quarantined_rows`` when damaged shards were moved aside and their rows
            recomputed; ``known_errors`` when contents recorded as undecodable were skipped;
            ``unread`` when a content-hash index let cached files go unread.
        caches: ``{tap: FeatureCache}`` that now hold the features.
    """

    shas: list[str | None]
    errors: dict[str, str]
    summary: dict[str, float | int]
    caches: dict[str, FeatureCache] = field(default_factory=dict)


def _model_device(trunk: torch.nn.Module) -> torch.device:
    return next(iter(trunk.parameters()), torch.empty(0)).device


class _Plan:
    """Per-run state: each input's hash, and what each distinct content needs."""

    def __init__(self, names: list[str], caches: dict[str, FeatureCache], record: DecodeErrors,
                 hashes: ContentHashes | None = None) -> None:
        self.names = names
        self.caches = caches
        self.record = record
        self.hashes = hashes
        self.unread = 0  # files whose hash came from the index and whose rows were all cached
        self.shas: list[str | None] = [None] * len(names)
        self.errors: dict[str, str] = {}  # path -> reason, for files that could not be read
        self.first: dict[str, int] = {}  # sha -> position of the first input with that content
        self.need: set[str] = set()  # contents that lacked a row in some tap when read
        self.failed: dict[str, tuple[str, str]] = {}  # sha -> (reason, path it was decoded under)
        self.known = 0  # contents skipped because the record says they do not decode
        self.quarantined = 0

    def batches(self, positions: Sequence[int], batch_size: int,
                bar: Any) -> Iterator[list[tuple[int, str, str, bytes]]]:
        """Read ``positions`` once each, in chunks; yield ``(i, path, sha, bytes)`` batches to decode."""
        pending: list[tuple[int, str, str, bytes]] = []
        for lo in range(0, len(positions), batch_size):
            read: list[tuple[int, str, str, bytes | None]] = []
            for i in positions[lo:lo + batch_size]:
                try:
                    entry = self._read(i)
                finally:
                    bar.update(1)
                if entry is not None:
                    read.append(entry)
            missing = self._missing([sha for _, _, sha, _ in read])
            if any(data is None and sha in missing for _, _, sha, data in read):
                # Known to the index but not cached in every tap: read those bytes after all.
                read = [self._reread(e) if e[3] is None and e[2] in missing else e for e in read]
                read = [e for e in read if e is not None]
                missing |= self._missing([sha for _, _, sha, _ in read])
            for i, path, sha, data in read:
                if sha in self.first:
                    continue  # cached, or decoded once for its first path: identical files run once
                self.first[sha] = i
                if sha not in missing:
                    self.unread += data is None
                    continue  # cached: at most read to hash it, never decoded
                self.need.add(sha)
                known = self.record.get(sha)
                if known is not None:
                    self.failed[sha] = known
                    self.known += 1
                    continue
                pending.append((i, path, sha, data))
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                del pending[:batch_size]
        if pending:
            yield pending

    def _read(self, i: int) -> tuple[int, str, str, bytes | None] | None:
        """``(i, path, sha, bytes)``; bytes None when the index knew the hash (nothing read); None if unreadable."""
        path = self.names[i]
        if self.hashes is not None:
            try:
                st = os.stat(path)  # before any read: a change after it is seen next time
                sha = self.hashes.lookup(path, st)
            except OSError:
                sha = st = None  # read_bytes below says why, in the platform's words
            if sha is not None:
                self.shas[i] = sha
                return i, path, sha, None
        try:
            data = read_bytes(path)
        except ImageError as e:
            self.errors[path] = str(e)
            return None
        sha = sha256_bytes(data)
        if self.hashes is not None and st is not None:
            self.hashes.record(path, sha, st)  # stat taken before the read: a later change is seen
        self.shas[i] = sha
        return i, path, sha, data

    def _reread(self, entry: tuple[int, str, str, bytes | None]) -> tuple[int, str, str, bytes | None] | None:
        """Read a file the index vouched for, because its content needs computing (or changed since)."""
        i, path, sha, _ = entry
        if self.record.get(sha) is not None:
            return entry  # recorded as undecodable: listed from the record, no need for the bytes
        hashes, self.hashes = self.hashes, None
        try:
            return self._read(i)
        finally:
            self.hashes = hashes

    def _missing(self, shas: Sequence[str]) -> set[str]:
        """The contents among ``shas`` (not yet planned) that lack a verified row in some tap."""
        fresh = list(dict.fromkeys(sha for sha in shas if sha not in self.first))
        missing: set[str] = set()
        for cache in self.caches.values():
            # Check the stored rows first: a damaged shard is quarantined here, so its rows
            # count as missing and are recomputed instead of being trained on.
            self.quarantined += cache.verify(fresh)
            missing.update(cache.missing(fresh))
        return missing

    def lost(self) -> list[int]:
        """Positions of contents counted as cached whose rows a later quarantine took; forgets them."""
        gone = [sha for sha in self.first
                if sha not in self.failed and any(sha not in cache for cache in self.caches.values())]
        positions = [self.first.pop(sha) for sha in gone]
        self.need.update(gone)
        return positions


class _Batches:
    """A DataLoader batch sampler over a lazily read stream of batches (read in this process)."""

    def __init__(self, stream: Iterator[list[tuple[int, str, str, bytes]]]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[list[tuple[int, str, str, bytes]]]:
        return self._stream


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
    hashes: ContentHashes | None = None,
) -> ExtractResult:
    """Make sure every readable image in ``paths`` has features in each tap's cache.

    Args:
        trunk: a :class:`trunk.model.Trunk`.
        paths: image files; bad ones become entries in ``errors``, never a failure.
        cache_root: root folder of the feature cache (it also holds ``decode-errors.json``).
        taps: taps to store (checked against the trunk's taps before any work).
        batch_size: images per forward pass (and files read per chunk).
        num_workers: decoding processes (0: decode in this process); files are read here.
        device: ``cpu``, ``cuda[:n]`` or ``auto`` (see :func:`trunk.device.resolve_device`).
        dtype: cache storage, ``float16`` or ``int8``.
        progress: show a tqdm progress bar on stderr.
        hashes: a content-hash index: files it knows (same size and mtime) whose rows are
            all cached are not read; what is read is recorded, and the index saved at the end.
            None: every file is read and hashed.

    Returns:
        An :class:`ExtractResult` with per-path hashes, errors and a summary.
    """
    start = time.perf_counter()
    taps = list(dict.fromkeys(taps))
    if not taps:
        raise ValueError("extract: field 'taps': give at least one tap")
    if batch_size < 1:
        raise ValueError(f"extract: field 'batch_size': must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"extract: field 'num_workers': must be 0 or more, got {num_workers}")
    caches = {tap: FeatureCache.for_trunk(cache_root, trunk, tap, dtype=dtype) for tap in taps}
    dev = resolve_device(device)
    names = [str(p) for p in paths]
    plan = _Plan(names, caches, DecodeErrors.load(cache_root), hashes)

    new_rows = 0
    bar = tqdm(total=len(names), desc="extracting", unit="img", disable=not progress, file=sys.stderr)
    try:
        positions: list[int] = list(range(len(names)))
        while positions:
            new_rows += _compute(trunk, plan.batches(positions, batch_size, bar), plan, caches, taps, dev,
                                 num_workers)
            positions = plan.lost()  # rare: rows taken by a shard quarantined after they were counted
            if positions:
                bar.total += len(positions)
    finally:
        bar.close()
        try:
            plan.record.save()  # even after a crash: what was learnt so far is not decoded again
        except OSError as e:
            log.warning("%s: could not record decode failures (%s); they will be decoded again next run",
                        plan.record.path, e)
        if hashes is not None:
            try:
                hashes.save()
            except OSError as e:
                log.warning("%s: could not save content hashes (%s); the files will be read again next run",
                            hashes.directory, e)

    errors = plan.errors
    result_shas: list[str | None] = []
    for path, sha in zip(names, plan.shas):
        if sha is not None and sha in plan.failed:
            reason, where = plan.failed[sha]
            same = names[plan.first[sha]]
            if where != same:  # remembered from a run that read these bytes under another name
                reason = reason.replace(where, same, 1)
            errors[path] = reason if same == path else f"{reason} (same bytes as {same})"
            sha = None
        elif sha is not None and any(sha not in cache for cache in caches.values()):
            # Only possible when the file's bytes changed between two reads of the rare re-read.
            errors[path] = f"file changed during extraction: {path}"
            sha = None
        result_shas.append(sha)

    unique = len(plan.first)
    seconds = time.perf_counter() - start
    summary: dict[str, float | int] = {
        "images": len(names),
        "unique_images": unique,
        "new_rows": new_rows,
        "reused_rows": unique - len(plan.need),
        "errors": len(errors),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(names) / seconds, 1) if seconds > 0 else 0.0,
    }
    if plan.quarantined:  # rows of damaged shards, moved aside and recomputed (see trunk.cache)
        summary["quarantined_rows"] = plan.quarantined
    if plan.known:  # contents the decode-error record says fail: listed in errors, not decoded
        summary["known_errors"] = plan.known
    if plan.unread:  # cached files the content-hash index vouched for: not even read
        summary["unread"] = plan.unread
    # Keep the caller's order of errors stable: input order.
    ordered = {p: errors[p] for p in dict.fromkeys(names) if p in errors}
    return ExtractResult(shas=result_shas, errors=ordered, summary=summary, caches=caches)


def _compute(
    trunk: Any,
    stream: Iterator[list[tuple[int, str, str, bytes]]],
    plan: _Plan,
    caches: dict[str, FeatureCache],
    taps: list[str],
    dev: torch.device,
    num_workers: int,
) -> int:
    """Decode, forward and store the batches of ``stream``; returns how many distinct images were stored."""
    loader = DataLoader(
        BytesDataset(eval_transform(trunk.data_config)),
        batch_sampler=_Batches(stream),
        num_workers=num_workers,
        collate_fn=collate_items,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )
    home = _model_device(trunk)
    # Restore each module's own flag: Trunk keeps its timm model in eval mode while the
    # wrapper itself may say training, so one train(flag) call would not undo eval().
    modes = {m: m.training for m in trunk.modules()}
    moved = False
    stored: set[str] = set()
    try:
        with contextlib.ExitStack() as stack, torch.inference_mode():
            writers = {tap: stack.enter_context(caches[tap].writer()) for tap in taps}
            for batch in loader:
                for sha, path, err in zip(batch.shas, batch.paths, batch.errors):
                    if err is not None and sha is not None:
                        plan.failed[sha] = (err, path)
                        if decode_failed(err):  # the bytes' fault, not the transform's: remember it
                            plan.record.add(sha, err, path)
                ok = batch.ok
                if ok:
                    if not moved:  # only once there is something to run: a rerun moves nothing
                        trunk.eval().to(dev)
                        moved = True
                    ok_shas = [batch.shas[i] for i in ok]
                    out = trunk(batch.pixels.to(dev, non_blocking=True), taps)
                    for tap in taps:
                        writers[tap].add(ok_shas, out[tap].reshape(len(ok), -1))
                    stored.update(ok_shas)  # type: ignore[arg-type]
    finally:
        if moved:
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
