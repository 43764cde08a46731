"""Reading, hashing, decoding and preprocessing many image files in order, in batches.

One bad file never stops a job and is never replaced by another image: each batch says,
per input, its content hash (when the bytes could be read) and why it failed (when it
did), and holds pixel rows only for the files that decoded. The work runs in a
``torch.utils.data.DataLoader`` so decoding can use worker processes while the trunk
runs; batches come back in input order whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from trunk.decode import ImageError, decode_image, read_bytes, sha256_bytes

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass
class DecodedBatch:
    """One batch of inputs, good and bad alike, in input order.

    Attributes:
        indices: positions in the input list, ascending.
        paths: the input paths, as strings.
        shas: sha256 hex of each file's bytes; None when the file could not be read.
        errors: one-line reason when the file did not become pixels, else None.
        pixels: ``(n_ok, C, H, W)`` float tensor, one row per entry whose error is
            None, in order (``(0, 0, 0, 0)`` when none decoded).
    """

    indices: list[int]
    paths: list[str]
    shas: list[str | None]
    errors: list[str | None]
    pixels: torch.Tensor

    @property
    def ok(self) -> list[int]:
        """Positions within this batch whose error is None (row i of pixels is ok[i])."""
        return [i for i, e in enumerate(self.errors) if e is None]

    def __len__(self) -> int:
        return len(self.indices)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _ImageFiles(Dataset):
    """Item i: ``(i, path, sha, error, tensor_or_None)``; never raises for a bad file."""

    def __init__(self, paths: Sequence[str], transform: Transform) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, str, str | None, str | None, torch.Tensor | None]:
        path = self.paths[i]
        try:
            data = read_bytes(path)
        except ImageError as e:
            return i, path, None, _one_line(str(e)), None
        except OSError as e:  # read_bytes maps the usual ones; be safe about the rest
            return i, path, None, _one_line(f"unreadable file: {path}: {e}"), None
        sha = sha256_bytes(data)
        try:
            image = decode_image(data, path)
        except (ImageError, OSError) as e:
            return i, path, sha, _one_line(str(e)), None
        try:
            pixels = self.transform(image)
        except Exception as e:  # a transform that chokes on one image must not end the job
            return i, path, sha, _one_line(f"preprocess failed: {path}: {type(e).__name__}: {e}"), None
        if not isinstance(pixels, torch.Tensor):
            return i, path, sha, f"preprocess failed: {path}: transform returned {type(pixels).__name__}", None
        return i, path, sha, None, pixels


def _collate(items: list[tuple[int, str, str | None, str | None, Any]]) -> DecodedBatch:
    items = sorted(items, key=lambda item: item[0])
    tensors = [item[4] for item in items if item[3] is None]
    if tensors:
        try:
            pixels = torch.stack(tensors).float()
        except RuntimeError:
            # Shapes differ (a transform without a fixed output size): reject the odd ones.
            return _reject_odd_shapes(items)
    else:
        # No good rows: still 4-D so callers can test ``pixels.shape[0]`` uniformly.
        pixels = torch.empty((0, 0, 0, 0))
    return DecodedBatch(
        indices=[item[0] for item in items],
        paths=[item[1] for item in items],
        shas=[item[2] for item in items],
        errors=[item[3] for item in items],
        pixels=pixels,
    )


def _reject_odd_shapes(items: list[tuple[int, str, str | None, str | None, Any]]) -> DecodedBatch:
    shapes = [tuple(item[4].shape) for item in items if item[3] is None]
    common = max(set(shapes), key=shapes.count)
    fixed = []
    for i, path, sha, err, t in items:
        if err is None and tuple(t.shape) != common:
            err, t = f"preprocess failed: {path}: output shape {tuple(t.shape)} != {common}", None
        fixed.append((i, path, sha, err, t))
    return _collate(fixed)


def iter_decoded(
    paths: Sequence[str | Path],
    transform: Transform,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
) -> Iterator[DecodedBatch]:
    """Read, hash, decode and preprocess files, in input order, in batches.

    Args:
        paths: image files; unreadable or undecodable ones become error entries.
        transform: PIL RGB image -> ``(C, H, W)`` tensor (e.g.
            :func:`trunk.preprocess.eval_transform`); it must be picklable when
            ``num_workers > 0``.
        batch_size: inputs per batch (good and bad together).
        num_workers: decoding processes; 0 decodes in the calling process.

    Yields:
        One :class:`DecodedBatch` per ``batch_size`` inputs, the last one possibly shorter.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
    names = [str(p) for p in paths]
    if not names:
        return
    loader = DataLoader(
        _ImageFiles(names, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        # Keep a couple of batches decoding ahead of the consumer, no more.
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )
    yield from loader
