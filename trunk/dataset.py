"""The one image Dataset: read bytes, decode with the platform's decoder, transform.

Bulk loading (:mod:`trunk.loader`), trunk training, distillation and branch-head training
all read images through :class:`ImageDataset`; feature extraction, which must hash a file
before deciding whether to decode it, reads each file once itself and decodes its bytes
through :class:`BytesDataset` (the same :func:`decode_item`). Item ``i`` is an :class:`ImageItem`: the
file's content hash (when its bytes could be read), a one-line reason when it did not
become pixels, the pixels otherwise, and the caller's target for it. A bad file never
raises: each caller decides what a failure means (an error row in bulk output, a batch
without it in training).

The transform is the caller's: the trunk's eval transform
(:func:`trunk.preprocess.eval_transform`), or augmentation followed by the trunk's resize
and normalisation (:func:`trunk.augment.build_train_transform`). A transform with a
random stream of its own (``set_random_seed``) is reseeded in every data-loader worker by
:func:`reseed_worker`, or every worker would augment alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from trunk.decode import ImageError, decode_image, read_bytes, sha256_bytes

Transform = Callable[[Image.Image], torch.Tensor]

_ADDRESS = re.compile(r" object at 0x[0-9a-fA-F]+>")


class ImageItem(NamedTuple):
    """One file, read and decoded, or why not.

    Attributes:
        index: its position in the dataset.
        path: the path or URI, as a string.
        sha: sha256 hex of the file's bytes; None when they could not be read.
        error: one-line reason when the file did not become pixels, else None.
        pixels: the transform's tensor; None when ``error`` is set.
        target: the caller's target for this item (a label, a label row), or None.
    """

    index: int
    path: str
    sha: Optional[str]
    error: Optional[str]
    pixels: Optional[torch.Tensor]
    target: Any = None


def one_line(text: str) -> str:
    """One line, with no per-process detail (``<_io.BytesIO object at 0x7f..>``), so a
    rerun or another backend writes the very same ``error`` cell."""
    return _ADDRESS.sub(">", " ".join(str(text).split()))


PREPROCESS_FAILED = "preprocess failed"  # starts every error of the transform stage (not the file's fault)


def read_item(index: int, path: str, transform: Transform, draft_side: int | None = None,
              target: Any = None) -> ImageItem:
    """Read, hash, decode and transform one file; never raises for a bad file.

    Args:
        index: the item's position, carried through.
        path: local path or fsspec URI.
        transform: PIL RGB image -> tensor.
        draft_side: let JPEG decoding downscale, keeping the shorter side at least this
            long (:func:`trunk.decode.decode_image`); None decodes at full size.
        target: carried through.
    """
    try:
        data = read_bytes(path)
    except ImageError as e:
        return ImageItem(index, path, None, one_line(str(e)), None, target)
    except OSError as e:  # read_bytes maps the usual ones; be safe about the rest
        return ImageItem(index, path, None, one_line(f"unreadable file: {path}: {e}"), None, target)
    return decode_item(index, path, data, transform, draft_side, target)


def decode_item(index: int, path: str, data: bytes, transform: Transform, draft_side: int | None = None,
                target: Any = None, sha: str | None = None) -> ImageItem:
    """:func:`read_item` for bytes the caller has already read (and perhaps hashed); never raises for a bad file.

    Args:
        index, path, transform, draft_side, target: as for :func:`read_item`.
        data: the file's bytes.
        sha: their sha256 hex digest when the caller has it; None hashes them here.
    """
    sha = sha256_bytes(data) if sha is None else sha
    try:
        image = decode_image(data, path, draft_side=draft_side)
    except (ImageError, OSError) as e:
        return ImageItem(index, path, sha, one_line(str(e)), None, target)
    del data
    try:
        pixels = transform(image)
    except Exception as e:  # a transform that chokes on one image must not end the job
        return ImageItem(index, path, sha, one_line(f"{PREPROCESS_FAILED}: {path}: {type(e).__name__}: {e}"),
                         None, target)
    if not isinstance(pixels, torch.Tensor):
        return ImageItem(index, path, sha, f"{PREPROCESS_FAILED}: {path}: transform returned {type(pixels).__name__}",
                         None, target)
    return ImageItem(index, path, sha, None, pixels, target)


def decode_failed(error: str | None) -> bool:
    """Whether the error of an item whose bytes were read is the decoder's (the bytes'), not the transform's."""
    return error is not None and not error.startswith(PREPROCESS_FAILED)


class ImageDataset(Dataset):
    """Item i: :func:`read_item` of ``paths[i]``, with ``targets[i]`` when targets are given."""

    def __init__(self, paths: Sequence[str], transform: Transform, *, targets: Sequence[Any] | None = None,
                 draft_side: int | None = None) -> None:
        """
        Args:
            paths: image paths or fsspec URIs, as strings.
            transform: PIL RGB image -> tensor; picklable when loader workers are used.
            targets: one per path (e.g. a class index), or None.
            draft_side: see :func:`read_item`.
        """
        if targets is not None and len(targets) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = paths
        self.transform = transform
        self.targets = targets
        self.draft_side = draft_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> ImageItem:
        target = None if self.targets is None else self.targets[i]
        return read_item(i, self.paths[i], self.transform, self.draft_side, target)

    def reseed(self, seed: int) -> None:
        """Reseed the transform's own random stream, if it has one (albumentations ignores torch's)."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)


class BytesDataset(Dataset):
    """Item ``(i, path, sha, data)``: :func:`decode_item` of bytes the caller already read and hashed.

    For a caller that must see a file's hash before deciding to decode it (feature
    extraction skips cached and known-bad contents): the file is read once, in the caller,
    and its bytes travel to the loader worker, which decodes them without reading again.
    """

    def __init__(self, transform: Transform, *, draft_side: int | None = None) -> None:
        self.transform = transform
        self.draft_side = draft_side

    def __getitem__(self, key: tuple[int, str, str, bytes]) -> ImageItem:
        index, path, sha, data = key
        return decode_item(index, path, data, self.transform, self.draft_side, sha=sha)

    def reseed(self, seed: int) -> None:
        """As :meth:`ImageDataset.reseed`."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)


def readable(items: Sequence[ImageItem]) -> list[ImageItem]:
    """The items that became pixels, in order."""
    return [item for item in items if item.error is None]


def reseed_worker(worker_id: int, *, seed_bits: int = 32) -> None:
    """``worker_init_fn``: reseed this worker's copy of the dataset's augmentation.

    torch gives each worker seed = loader seed + worker id, drawn anew every epoch (or
    once, with persistent workers); the augmentation gets it modulo ``2**seed_bits``.
    """
    info = get_worker_info()
    info.dataset.reseed(int(info.seed % 2**seed_bits))
