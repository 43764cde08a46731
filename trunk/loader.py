"""Reading, hashing, decoding and preprocessing many image files in order, in batches.

One bad file never stops a job and is never replaced by another image: each batch says,
per input, its content hash (when the bytes could be read) and why it failed (when it
did), and holds pixel rows only for the files that decoded. The work runs in a
``torch.utils.data.DataLoader`` so decoding can use worker processes while the trunk
runs; batches come back in the order they were asked for whatever the number of workers.

:func:`decode_batch` is the same per-batch work as one plain function call, for engines
that schedule batches themselves (the Ray backend of bulk classification).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from trunk.dataset import ImageDataset, ImageItem, Transform, read_item
from trunk.images import utf8_text


@dataclass
class DecodedBatch:
    """One batch of inputs, good and bad alike, in input order.

    Attributes:
        indices: positions in the input list, ascending.
        paths: the input paths, as strings.
        shas: sha256 hex of each file's bytes; None when the file could not be read.
        errors: one-line reason when the file did not become pixels, else None; always
            valid UTF-8 (a path in it that is not is written as :func:`trunk.images.path_text` does).
        pixels: ``(n_ok, C, H, W)`` float tensor, one row per entry whose error is
            None, in order (``(0, 0, 0, 0)`` when none decoded).
    """

    indices: list[int]
    paths: list[str]
    shas: list[str | None]
    errors: list[str | None]
    pixels: torch.Tensor

    def pin_memory(self) -> "DecodedBatch":
        """Page-locked pixels, so the copy to the GPU can overlap compute (DataLoader calls this)."""
        if self.pixels.numel():
            self.pixels = self.pixels.pin_memory()
        return self

    @property
    def ok(self) -> list[int]:
        """Positions within this batch whose error is None (row i of pixels is ok[i])."""
        return [i for i, e in enumerate(self.errors) if e is None]

    def __len__(self) -> int:
        return len(self.indices)


def decode_batch(indices: Sequence[int], paths: Sequence[str], transform: Transform,
                 draft_side: int | None = None) -> DecodedBatch:
    """One batch, decoded in this process: what a loader worker does for one batch.

    Args:
        indices: positions of the inputs in the job's input list.
        paths: the inputs, one per index.
        transform: as for :func:`iter_decoded`.
        draft_side: as for :func:`iter_decoded`.
    """
    return collate_items([read_item(i, p, transform, draft_side) for i, p in zip(indices, paths, strict=True)])


def collate_items(items: list[ImageItem]) -> DecodedBatch:
    items = sorted(items, key=lambda item: item.index)
    tensors = [item.pixels for item in items if item.error is None]
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
        indices=[item.index for item in items],
        paths=[item.path for item in items],
        shas=[item.sha for item in items],
        # A message may quote a file name that is not UTF-8; the cell must still be text.
        errors=[None if item.error is None else utf8_text(item.error) for item in items],
        pixels=pixels,
    )


def _reject_odd_shapes(items: list[ImageItem]) -> DecodedBatch:
    shapes = [tuple(item.pixels.shape) for item in items if item.error is None]
    common = max(set(shapes), key=shapes.count)
    fixed = []
    for item in items:
        if item.error is None and tuple(item.pixels.shape) != common:
            item = item._replace(error=f"preprocess failed: {item.path}: output shape "
                                       f"{tuple(item.pixels.shape)} != {common}", pixels=None)
        fixed.append(item)
    return collate_items(fixed)


def iter_decoded(
    paths: Sequence[str | Path],
    transform: Transform,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    batches: Sequence[Sequence[int]] | None = None,
    draft_side: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> Iterator[DecodedBatch]:
    """Read, hash, decode and preprocess files in batches, in order.

    Args:
        paths: image files; unreadable or undecodable ones become error entries.
        transform: PIL RGB image -> ``(C, H, W)`` tensor (e.g.
            :func:`trunk.preprocess.eval_transform`); it must be picklable when
            ``num_workers > 0``.
        batch_size: inputs per batch (good and bad together), when ``batches`` is None.
        num_workers: decoding processes; 0 decodes in the calling process.
        batches: explicit batches as lists of positions in ``paths``, yielded in this
            order (e.g. batches that never straddle an output shard); None cuts
            ``paths`` into consecutive runs of ``batch_size``.
        draft_side: let JPEG decoding downscale (Pillow's draft mode) while keeping the
            shorter side at least this long; None decodes at full size.
        pin_memory: page-locked pixel tensors, for a fast overlapped copy to a GPU.
        prefetch_factor: batches each worker decodes ahead of the consumer.

    Yields:
        One :class:`DecodedBatch` per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
    names = [str(p) for p in paths]
    if not names:
        return
    if batches is None:
        batches = [range(s, min(s + batch_size, len(names))) for s in range(0, len(names), batch_size)]
    if not batches:
        return
    yield from _batch_loader(ImageDataset(names, transform, draft_side=draft_side), batches, num_workers,
                             pin_memory, prefetch_factor)


def _batch_loader(dataset: Dataset, batches: Iterable, num_workers: int, pin_memory: bool,
                  prefetch_factor: int) -> DataLoader:
    """The one DataLoader both decoders use: given batches, :func:`collate_items`, a few batches ahead."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_items,
        pin_memory=pin_memory,
        # Keep a few batches decoding ahead of the consumer, no more.
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,
    )


class _PairDataset(Dataset):
    """Item ``(i, path)``: :func:`read_item` of that path at position i (the sampler carries the paths)."""

    def __init__(self, transform: Transform, draft_side: int | None) -> None:
        self.transform = transform
        self.draft_side = draft_side

    def __getitem__(self, key: tuple[int, str]) -> ImageItem:
        index, path = key
        return read_item(index, path, self.transform, self.draft_side)


class _PairBatches:
    """A DataLoader batch sampler over a stream of ``(indices, paths)`` batches, read once, lazily."""

    def __init__(self, batches: Iterable[tuple[Sequence[int], Sequence[str]]]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        for indices, paths in self._batches:
            yield [(int(i), str(p)) for i, p in zip(indices, paths, strict=True)]


def iter_decoded_batches(
    batches: Iterable[tuple[Sequence[int], Sequence[str]]],
    transform: Transform,
    *,
    num_workers: int = 0,
    draft_side: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> Iterator[DecodedBatch]:
    """:func:`iter_decoded` over a stream of batches that carry their own paths.

    For jobs whose input list is too long to hold (a folder walk or manifest of tens of
    millions of entries): ``batches`` is read lazily, only a few batches ahead of the
    consumer, so nothing but the batches in flight is held. Batches come back in the
    order given, whatever the number of workers.

    Args:
        batches: ``(indices, paths)`` per batch: the inputs' positions in the job's input
            stream and their paths, one per index.
        transform, num_workers, draft_side, pin_memory, prefetch_factor: as for :func:`iter_decoded`.

    Yields:
        One :class:`DecodedBatch` per batch.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
    yield from _batch_loader(_PairDataset(transform, draft_side), _PairBatches(batches), num_workers, pin_memory,
                             prefetch_factor)
