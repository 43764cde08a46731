"""Which images a trunk was trained on, by content: a compact, verifiable set of content hashes.

A validation or held-out figure means nothing for an image the trunk already learned
from, whatever its file name. Every trunk the platform trains therefore records the
sha256 of the bytes of each image it trained on (:func:`content_sha`, the same hash the
feature cache keys rows by), so any later head, cascade or report can ask "was this
image seen?" without re-reading the training data.

What is stored is the first 8 bytes of each hash, sorted and unique: 8 bytes per image
(8 MB for a million images), and a false match between two different images needs a
64-bit prefix collision (about n^2 / 2^65: one in 10^7 for a million images against a
million). The set is written as a safetensors file (no pickles) with its count and a
digest of its contents in the metadata; :meth:`SeenImages.load` refuses a file whose
contents do not hash to that digest, or to the digest the registry tagged.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from trunk.decode import read_bytes, sha256_bytes
from trunk.record import RecordError, read_record, tensor_digest, write_record

PREFIX_BYTES = 8
FORMAT = "seen-images/1"
_TENSOR = "sha256_prefix"


class SeenError(RecordError):
    """A seen-images file that cannot be read or does not match its digest."""


def content_sha(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes (what the feature cache and :class:`SeenImages` key by).

    Raises:
        trunk.decode.ImageError: the file cannot be read.
    """
    return sha256_bytes(read_bytes(path))


def _prefix(sha: str) -> int:
    try:
        value = int(sha[: PREFIX_BYTES * 2], 16)
    except (TypeError, ValueError):
        raise ValueError(f"'{sha}' is not a sha256 hex digest") from None
    if len(sha) != 64:
        raise ValueError(f"'{sha}' is not a sha256 hex digest")
    # Stored as int64: shift the unsigned prefix into the signed range so sorting still works.
    return value - (1 << 63)


class SeenImages:
    """A set of image content hashes, stored as sorted 8-byte prefixes.

    Args:
        shas: sha256 hex digests (duplicates are fine).
    """

    def __init__(self, shas: Iterable[str] = ()) -> None:
        self._prefixes = torch.tensor(sorted({_prefix(s) for s in shas}), dtype=torch.int64)

    @classmethod
    def _from_prefixes(cls, prefixes: torch.Tensor) -> SeenImages:
        seen = cls()
        seen._prefixes = torch.unique(prefixes.to(torch.int64))  # sorted
        return seen

    def __len__(self) -> int:
        return int(self._prefixes.numel())

    def __contains__(self, sha: object) -> bool:
        if not isinstance(sha, str):
            return False
        return bool(self.mask([sha])[0])

    def mask(self, shas: Iterable[str]) -> list[bool]:
        """Per hash, whether it is in the set (one vectorised search, for large splits)."""
        wanted = torch.tensor([_prefix(s) for s in shas], dtype=torch.int64)
        if not len(self) or not wanted.numel():
            return [False] * int(wanted.numel())
        at = torch.searchsorted(self._prefixes, wanted).clamp(max=len(self) - 1)
        return (self._prefixes[at] == wanted).tolist()

    def count_in(self, shas: Iterable[str]) -> int:
        """How many of ``shas`` (counted with repeats) are in the set."""
        return sum(self.mask(shas))

    def union(self, other: SeenImages) -> SeenImages:
        """The images seen by either set."""
        return SeenImages._from_prefixes(torch.cat([self._prefixes, other._prefixes]))

    @property
    def digest(self) -> str:
        """16 hex digits over the sorted prefixes (the record's digest): equal sets have equal digests."""
        return tensor_digest({_TENSOR: self._prefixes})

    def save(self, path: str | Path) -> Path:
        """Write the set atomically as a record (:mod:`trunk.record`); returns ``path``."""
        return write_record(path, FORMAT, {_TENSOR: self._prefixes})

    @classmethod
    def load(cls, path: str | Path, expected_digest: str | None = None) -> SeenImages:
        """Read a set written by :meth:`save`, checking it against its own digest and ``expected_digest``.

        Raises:
            SeenError: the file is unreadable, of another format, or its contents do not
                hash to the digest it (or the caller) names.
        """
        tensors, _, _ = read_record(path, FORMAT, "a seen-images file", expected_digest, error=SeenError)
        if set(tensors) != {_TENSOR} or tensors[_TENSOR].dtype != torch.int64:
            raise SeenError(f"{path}: not a seen-images file (tensors {sorted(tensors)})")
        seen = cls._from_prefixes(tensors[_TENSOR])
        return seen

