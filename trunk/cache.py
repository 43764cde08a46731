"""The feature cache: trunk features on disk, keyed so that a stale read cannot happen.

Layout::

    <root>/<trunk_id>/<tap>/<preprocess_key>-<dtype>/shard-<uuid>.safetensors

The folder is the key: everything that changes a feature (the trunk's weights, model and
data config via ``trunk_id``, the tap, the preprocessing, the storage dtype) names a
different folder, and each shard also carries that key in its metadata, which readers
check. Within a folder a row is keyed by the sha256 of the image file's bytes, so a
renamed or copied file is found again and an edited one is not.

Each shard holds ``sha256`` (uint8 ``[N, 32]``) and ``features`` (float16 ``[N, D]``); with
``dtype="int8"``, ``features`` is int8 plus ``scale`` (float32 ``[N]``): symmetric
per-row absmax quantisation, ``x ~= q * scale``, half the bytes of fp16.

Why safetensors shards:

- rows sit at fixed offsets the header gives, so a read of a few rows is a few ``pread``
  calls (through the OS page cache, not a mapping this process holds), and training
  streams random batches from a cache larger than memory (:meth:`FeatureCache.rows`);
- no pickle: a shard is a JSON header plus raw tensor bytes, safe to load from anywhere;
- one self-describing file per shard (dtype, shape and our key in the header), written
  whole to a dot-prefixed temp file, fsynced and atomically renamed
  (:func:`trunk.files.atomic_write`), so a crash leaves either a complete shard or nothing
  visible. Appending is adding a shard; several processes can append at once without
  locks (unique names; first copy of a row wins).

Integrity: a shard's bytes can rot or be overwritten in place without changing its size,
which no header check notices. Each shard's metadata therefore records CRC-32 checksums:
one of its ``sha256`` tensor (checked when the shard is indexed, which reads that tensor
anyway) and one per block of :data:`BLOCK_ROWS` rows of ``features`` (plus ``scale``),
checked on the blocks a read touches, once per block per :class:`FeatureCache`. Rows are
read selectively, so per-block checksums keep a read of a few rows cheap, where a
per-shard checksum would read the whole shard. A shard that fails a check, or that
cannot be parsed at all (truncated, garbled header), is moved aside to
``<folder>/quarantine/`` with a warning and a ``.reason.txt`` beside it; its rows are
then missing, so the next extraction recomputes them (:func:`trunk.extract.extract`
verifies the rows it is asked for before deciding what to compute). A shard written
before checksums existed (``format`` ``feature-cache/1``) is read unverified with one
warning per folder; delete it to have its rows recomputed with checksums. A shard in a
format this version does not know (a newer one) is skipped, not quarantined.

Alternatives considered: Parquet stores columns of lists well but reading a row range
means decoding a row group, and partial files need the same rename dance; LMDB gives
random access but is one mutable file with its own locking and a fixed map size, awkward
on shared filesystems; HDF5 appends in place, so a crash mid-write can corrupt the whole
file, and it does not cope with concurrent writers. The torch stack already ships
safetensors, and the platform already stores head weights with it.

Decode failures: ``<root>/decode-errors.json`` (:class:`DecodeErrors`) maps the content hash
of each file that would not decode to its one-line reason, so an extraction over millions
of images does not decode the same bad file on every run. It sits at the root, shared by
every trunk, tap and dtype, because whether bytes decode depends only on the bytes and the
decoder (:func:`trunk.decode.decoder_stamp`), never on the trunk: a failure recorded under
another decoder stamp is tried again. Preprocessing failures depend on the trunk's
transform and are not recorded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from trunk.decode import decoder_stamp
from trunk.files import atomic_write, fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

DTYPES = ("float16", "int8")
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
FORMAT = "feature-cache/2"
LEGACY_FORMAT = "feature-cache/1"  # no checksums: read unverified
BLOCK_ROWS = 256  # rows per checksummed block: a read verifies whole blocks, so keep them small
QUARANTINE = "quarantine"
SHA_BYTES = 32
_FP16_MAX = float(torch.finfo(torch.float16).max)


class CacheMissError(KeyError):
    """Some requested rows are not in the cache; the message says how many and which."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class CorruptShardError(CacheMissError):
    """A shard failed its checksum during a read; it was quarantined and its rows are missing now.

    A :class:`CacheMissError`, so callers that extract missing rows recompute them.
    """


class _Corrupt(Exception):
    """Internal: a shard's bytes do not match what its header promises."""


class _Unknown(Exception):
    """Internal: an intact shard in a format this version cannot check (e.g. written by a newer one)."""


def _crc(*tensors: torch.Tensor) -> int:
    """CRC-32 of the tensors' raw bytes, as safetensors stores them (C order, little-endian)."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.contiguous().view(torch.uint8).numpy(), crc)
    return crc


def _block_runs(rows: Sequence[int], block: int) -> list[tuple[int, int]]:
    """Runs ``[lo, hi)`` of consecutive sorted ``rows``, split where a checksum block starts."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and r == runs[-1][1] and r % block:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def _check_part(name: str, value: str) -> str:
    value = str(value)
    if not value or "/" in value or "\\" in value or value.startswith("."):
        raise ValueError(f"feature cache: field '{name}': '{value}' cannot name a folder")
    return value


def _sha_to_bytes(sha: str) -> bytes:
    try:
        raw = bytes.fromhex(sha)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != SHA_BYTES:
        raise ValueError(f"feature cache: '{sha}' is not a sha256 hex digest")
    return raw


def quantize_int8(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row absmax int8: ``(q int8 [N, D], scale float32 [N])``."""
    x = features.float()
    absmax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0])
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


_ST_DTYPES = {"float16": ("F16", 2), "int8": ("I8", 1)}


def _shard_layout(path: Path, rows: int, dim: int, dtype: str) -> tuple[int, int, int | None]:
    """``(offset of features, bytes per row, offset of scale or None)`` from a shard's safetensors header.

    The format: 8 bytes little-endian header length, a JSON header giving each tensor's
    dtype, shape and ``data_offsets`` (relative to the end of the header), then the bytes.

    Raises:
        _Corrupt: the header does not describe ``[rows, dim]`` features of ``dtype``.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(size)) if 0 < size <= 100_000_000 else None
        except (UnicodeDecodeError, ValueError):
            header = None
    if not isinstance(header, dict):
        raise _Corrupt("safetensors header unreadable")
    base = 8 + size
    name, item = _ST_DTYPES[dtype]

    def offset(key: str, want_dtype: str, shape: list[int], nbytes: int) -> int:
        info = header.get(key)
        if (not isinstance(info, dict) or info.get("dtype") != want_dtype or info.get("shape") != shape
                or not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2):
            raise _Corrupt(f"tensor '{key}' is not {want_dtype} {shape} in its header")
        lo, hi = info["data_offsets"]
        if hi - lo != nbytes:
            raise _Corrupt(f"tensor '{key}' spans {hi - lo} bytes, expected {nbytes}")
        return base + int(lo)

    feat = offset("features", name, [rows, dim], rows * dim * item)
    scale = offset("scale", "F32", [rows], rows * 4) if dtype == "int8" else None
    return feat, dim * item, scale


def _pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``; a short read (a truncated shard) is corruption."""
    got = os.preadv(fd, [buffer], offset)
    while got < len(buffer):
        more = os.preadv(fd, [buffer[got:]], offset + got)
        if more == 0:
            raise _Corrupt(f"file ends {len(buffer) - got} bytes short of its rows")
        got += more


def _as_float(raw: bytearray, raw_scale: bytearray | None, rows: int, dim: int, dtype: str) -> torch.Tensor:
    """float32 ``[rows, dim]`` from stored bytes (fp16, or int8 times the per-row scale)."""
    if not rows:
        return torch.empty((0, dim), dtype=torch.float32)
    stored = torch.frombuffer(raw, dtype=torch.float16 if dtype == "float16" else torch.int8).reshape(rows, dim)
    out = stored.float()
    if raw_scale is not None:
        out = out * torch.frombuffer(raw_scale, dtype=torch.float32)[:, None]
    return out


class FeatureCache:
    """Features of one (trunk, tap, preprocessing, dtype), one row per image content hash.

    Args:
        root: the cache's root folder (e.g. ``<workspace>/features``).
        trunk_id: :attr:`trunk.model.Trunk.trunk_id`.
        tap: tap name (``pooled``, ``layer3``, ...).
        preprocess_key: :attr:`trunk.model.Trunk.preprocess_key`.
        dtype: ``float16`` (default) or ``int8`` (per-row scale).

    The row index (sha -> shard, row) is built lazily from the shards' ``sha256``
    tensors; :meth:`refresh` picks up shards other processes wrote since.
    """

    def __init__(self, root: str | Path, trunk_id: str, tap: str, preprocess_key: str, dtype: str = "float16") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"feature cache: field 'dtype': '{dtype}' is not one of {', '.join(DTYPES)}")
        self.root = Path(root)
        self.trunk_id = _check_part("trunk_id", trunk_id)
        self.tap = _check_part("tap", tap)
        self.preprocess_key = _check_part("preprocess_key", preprocess_key)
        self.dtype = dtype
        self.directory = self.root / self.trunk_id / self.tap / f"{self.preprocess_key}-{dtype}"
        self._shards: list[Path] = []
        # Per shard: (rows per block, block checksums), or None for a legacy shard.
        self._blocks: list[tuple[int, list[int]] | None] = []
        self._rows: list[int] = []  # per shard: row count
        self._index: dict[str, tuple[int, int]] = {}
        self._dim: int | None = None
        self._scanned = False
        # (shard path, block) already checked by this instance. Shards are never rewritten in
        # place, so one check per block per process lifetime of a cache object is enough.
        self._verified: set[tuple[Path, int]] = set()
        self._warned_legacy = False
        self._skipped: set[Path] = set()  # damaged shards that could not be moved aside
        self._generation = 0  # bumped whenever the index is rebuilt (shard numbers change)
        self._layouts: dict[Path, tuple[int, int, int | None]] = {}  # shard -> byte offsets (_shard_layout)

    @classmethod
    def for_trunk(cls, root: str | Path, trunk: Any, tap: str, dtype: str = "float16") -> FeatureCache:
        """The cache of ``trunk``'s ``tap`` (checked against the trunk's taps)."""
        trunk.tap(tap)  # raises a one-line error listing the valid taps
        return cls(root, trunk.trunk_id, tap, trunk.preprocess_key, dtype=dtype)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.directory)!r})"

    # -- index ---------------------------------------------------------------------------
    def _metadata(self, dim: int) -> dict[str, str]:
        return {"format": FORMAT, "trunk_id": self.trunk_id, "tap": self.tap,
                "preprocess_key": self.preprocess_key, "dtype": self.dtype, "dim": str(dim)}

    def _read_shard_index(self, path: Path) -> tuple[list[str], int, tuple[int, list[int]] | None]:
        """``(row hashes, width, block checksums or None for a legacy shard)`` of one shard.

        Raises:
            _Corrupt: the file is not a whole, intact shard (truncated, garbled, checksum mismatch).
            ValueError: the shard is intact but belongs to another folder, or cannot be opened.
        """
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                shas = f.get_tensor("sha256")
                feats = f.get_slice("features").get_shape()
                dim = int(feats[1])
                rows = int(feats[0])
        except OSError as e:  # permissions, I/O: not evidence of corruption, so never quarantined
            raise ValueError(f"{path}: not a readable feature-cache shard ({type(e).__name__}: {e})") from None
        except (SafetensorError, KeyError, IndexError, ValueError) as e:
            raise _Corrupt(f"not a whole feature-cache shard ({type(e).__name__}: {e})") from None
        expected = self._metadata(dim)
        for key in ("trunk_id", "tap", "preprocess_key", "dtype"):
            if meta.get(key) != expected[key]:
                raise ValueError(
                    f"{path}: field '{key}' is {meta.get(key)!r}, expected {expected[key]!r} for this folder"
                )
        if shas.dtype != torch.uint8 or shas.ndim != 2 or shas.shape[1] != SHA_BYTES or shas.shape[0] != rows:
            raise _Corrupt(f"field 'sha256' has shape {tuple(shas.shape)} {shas.dtype}, expected [{rows}, 32] uint8")
        blocks = self._read_checksums(meta, rows)
        if blocks is not None and _crc(shas) != int(meta["sha256_crc32"], 16):
            raise _Corrupt("tensor 'sha256' fails its checksum")
        blob = shas.numpy().tobytes()
        return [blob[i:i + SHA_BYTES].hex() for i in range(0, len(blob), SHA_BYTES)], dim, blocks

    @staticmethod
    def _read_checksums(meta: dict[str, str], rows: int) -> tuple[int, list[int]] | None:
        fmt = meta.get("format")
        if fmt == LEGACY_FORMAT:
            return None
        if fmt != FORMAT:
            raise _Unknown(f"field 'format' is {fmt!r}, this version reads {FORMAT!r} and {LEGACY_FORMAT!r}")
        try:
            block = int(meta["block_rows"])
            if block < 1:
                raise ValueError(f"block_rows {block}")
            int(meta["sha256_crc32"], 16)
            text = meta["block_crc32"]
            blocks = [int(text[i:i + 8], 16) for i in range(0, len(text), 8)]
        except (KeyError, ValueError) as e:
            raise _Corrupt(f"checksum fields unreadable ({type(e).__name__}: {e})") from None
        if len(blocks) != -(-rows // block) or len(text) != 8 * len(blocks):
            raise _Corrupt(f"field 'block_crc32' has {len(text)} characters, expected 8 per {block} rows")
        return block, blocks

    def _add_shard(self, path: Path, shas: Sequence[str], dim: int, blocks: tuple[int, list[int]] | None) -> None:
        if self._dim is not None and dim != self._dim:
            raise ValueError(f"{path}: field 'features' has width {dim}, the cache's other shards have {self._dim}")
        self._dim = dim
        shard = len(self._shards)
        self._shards.append(path)
        self._blocks.append(blocks)
        self._rows.append(len(shas))
        for row, sha in enumerate(shas):
            self._index.setdefault(sha, (shard, row))  # duplicates across shards: first wins

    def refresh(self) -> None:
        """Index shards that appeared since the last scan (e.g. written by another process).

        A shard that is truncated or fails its ``sha256`` checksum is quarantined (see the
        module docstring) and its rows are left out, so they count as missing.
        """
        self._scanned = True
        if not self.directory.is_dir():
            return
        known = set(self._shards) | self._skipped
        legacy = 0
        # Dot-prefixed temp files of unfinished writes never match the shard pattern.
        for path in sorted(self.directory.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}")):
            if path not in known:
                try:
                    shas, dim, blocks = self._read_shard_index(path)
                except _Corrupt as e:
                    if self._quarantine(path, str(e)) == path:
                        self._skipped.add(path)
                    continue
                except _Unknown as e:
                    # Not ours to judge, so not quarantined: its rows count as missing here and a
                    # copy this version can check is written beside it.
                    log.warning("%s: %s; skipped", path, e)
                    self._skipped.add(path)
                    continue
                self._add_shard(path, shas, dim, blocks)
                legacy += blocks is None
        if legacy and not self._warned_legacy:
            self._warned_legacy = True
            log.warning("%s: %d shard(s) predate checksums (%s) and are read unverified; delete them to have "
                        "their rows recomputed with checksums", self.directory, legacy, LEGACY_FORMAT)

    def _quarantine(self, path: Path, reason: str) -> Path:
        """Move a damaged shard out of the cache (kept for inspection) and say so in the log."""
        folder = self.directory / QUARANTINE
        target = folder / path.name
        try:
            folder.mkdir(exist_ok=True)
            os.replace(path, target)
            fsync_dir(self.directory)
            (folder / f"{path.name}.reason.txt").write_text(
                f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {reason}\n", encoding="utf-8")
        except FileNotFoundError:
            pass  # another process quarantined it first
        except OSError as e:
            # A read-only cache: the shard stays where it is, but this instance never reads it.
            log.warning("%s: %s; could not quarantine it (%s), so it is skipped", path, reason, e)
            return path
        log.warning("%s: %s; quarantined to %s, its rows will be recomputed", path, reason, target)
        return target

    def _drop_corrupt(self, path: Path, reason: str) -> tuple[Path, int]:
        """Quarantine one indexed shard and rebuild the index without it: ``(target, rows lost)``."""
        rows = self._rows[self._shards.index(path)]
        target = self._quarantine(path, reason)
        if target == path:
            self._skipped.add(path)
        self._verified = {key for key in self._verified if key[0] != path}
        self._reindex()
        return target, rows

    def _reindex(self) -> None:
        # Rebuild rather than patch: a row of a dropped shard may have a copy in another shard.
        self._generation += 1  # shard numbers change: a CachedRows made before is stale
        self._shards, self._blocks, self._rows, self._index, self._dim = [], [], [], {}, None
        self.refresh()

    def _ensure(self) -> None:
        if not self._scanned:
            self.refresh()

    @property
    def dim(self) -> int | None:
        """Feature width, or None while the cache is empty."""
        self._ensure()
        return self._dim

    @property
    def shards(self) -> list[Path]:
        """Shard files in index order."""
        self._ensure()
        return list(self._shards)

    def __len__(self) -> int:
        self._ensure()
        return len(self._index)

    def __contains__(self, sha: object) -> bool:
        self._ensure()
        return sha in self._index

    def missing(self, shas: Iterable[str]) -> list[str]:
        """The given hashes that have no row yet: unique, in first-seen order."""
        self._ensure()
        return [s for s in dict.fromkeys(shas) if s not in self._index]

    def bytes_per_row(self) -> float:
        """Bytes on disk per stored row, shard headers included; 0.0 when empty."""
        self._ensure()
        rows = 0
        size = 0
        for path in self._shards:
            with safe_open(str(path), framework="pt") as f:
                rows += int(f.get_slice("sha256").get_shape()[0])
            size += path.stat().st_size
        return size / rows if rows else 0.0

    # -- reading -------------------------------------------------------------------------
    def _locate(self, shas: Sequence[str]) -> list[tuple[int, int]]:
        self._ensure()
        where = [self._index.get(s) for s in shas]
        absent = [s for s, w in zip(shas, where) if w is None]
        if absent:
            unique = list(dict.fromkeys(absent))
            shown = ", ".join(s[:12] for s in unique[:5]) + (", ..." if len(unique) > 5 else "")
            raise CacheMissError(
                f"{len(unique)} of {len(set(shas))} images not in feature cache {self.directory}: {shown}"
            )
        return where  # type: ignore[return-value]

    def _layout(self, shard: int) -> tuple[int, int, int | None]:
        """``(file offset of features, bytes per row, file offset of scale or None)`` of one shard."""
        path = self._shards[shard]
        got = self._layouts.get(path)
        if got is None:
            got = _shard_layout(path, self._rows[shard], self._dim or 0, self.dtype)
            self._layouts[path] = got
        return got

    def _read_rows(self, shard: int, rows: list[int]) -> torch.Tensor:
        """float32 ``[len(rows), D]`` for the given rows of one shard, reading only runs of rows.

        Rows are read with ``pread`` at the offsets the shard's safetensors header gives: the
        bytes pass through the OS page cache, never through a mapping this process keeps,
        so reading a whole cache in random batches holds one batch. A checksummed block not
        yet verified by this instance is read whole and checked first.

        Raises:
            _Corrupt: a block's bytes do not match its checksum, or the file is shorter than its header says.
        """
        order = sorted(set(rows))
        path = self._shards[shard]
        checks = self._blocks[shard]
        block_rows = checks[0] if checks else self._rows[shard] + 1
        feat_off, row_bytes, scale_off = self._layout(shard)
        raw = bytearray(len(order) * row_bytes)
        raw_scale = bytearray(len(order) * 4) if scale_off is not None else None
        view = memoryview(raw)
        view_scale = memoryview(raw_scale) if raw_scale is not None else None
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            whole: dict[int, tuple[bytes, bytes | None]] = {}
            at = 0
            for lo, hi in _block_runs(order, block_rows):
                n = hi - lo
                b = lo // block_rows
                if checks and b not in whole and (path, b) not in self._verified:
                    whole[b] = self._check_block(shard, b, fd)
                if b in whole:
                    off = b * block_rows
                    block, block_scale = whole[b]
                    view[at * row_bytes:(at + n) * row_bytes] = block[(lo - off) * row_bytes:(hi - off) * row_bytes]
                    if view_scale is not None and block_scale is not None:
                        view_scale[at * 4:(at + n) * 4] = block_scale[(lo - off) * 4:(hi - off) * 4]
                else:
                    _pread_into(fd, view[at * row_bytes:(at + n) * row_bytes], feat_off + lo * row_bytes)
                    if view_scale is not None and scale_off is not None:
                        _pread_into(fd, view_scale[at * 4:(at + n) * 4], scale_off + lo * 4)
                at += n
        data = _as_float(raw, raw_scale, len(order), self._dim or 0, self.dtype)
        if order == rows:
            return data
        pos = {r: i for i, r in enumerate(order)}
        return data[[pos[r] for r in rows]]

    def _check_block(self, shard: int, b: int, fd: int) -> tuple[bytes, bytes | None]:
        """Block ``b``'s raw ``features`` (and ``scale``) bytes, read from ``fd``, after checking their checksum."""
        block_rows, crcs = self._blocks[shard]  # type: ignore[misc]
        start, stop = b * block_rows, min((b + 1) * block_rows, self._rows[shard])
        feat_off, row_bytes, scale_off = self._layout(shard)
        raw = bytearray((stop - start) * row_bytes)
        _pread_into(fd, memoryview(raw), feat_off + start * row_bytes)
        got = zlib.crc32(raw)
        raw_scale = None
        if scale_off is not None:
            raw_scale = bytearray((stop - start) * 4)
            _pread_into(fd, memoryview(raw_scale), scale_off + start * 4)
            got = zlib.crc32(raw_scale, got)
        if got != crcs[b]:
            raise _Corrupt(f"block {b} (rows {start}-{stop - 1}) fails its checksum")
        self._verified.add((self._shards[shard], b))
        return bytes(raw), bytes(raw_scale) if raw_scale is not None else None

    def load(self, shas: Sequence[str]) -> torch.Tensor:
        """Features as float32 ``[N, D]``, rows in the given order.

        Holds all N rows in memory; :meth:`rows` reads them on demand instead.

        Raises:
            CacheMissError: a ``KeyError`` saying how many (and which) hashes have no row.
            CorruptShardError: a block read failed its checksum; its shard was quarantined,
                so an extraction now recomputes its rows.
        """
        where = self._locate(list(shas))
        if not where:
            return torch.empty((0, self._dim or 0), dtype=torch.float32)
        shard = torch.tensor([w[0] for w in where], dtype=torch.int32)
        row = torch.tensor([w[1] for w in where], dtype=torch.int32)
        return self._gather(shard, row)

    def rows(self, shas: Sequence[str]) -> CachedRows:
        """The given rows as a lazy float32 ``[N, D]`` view that reads only the rows it is indexed with.

        What training on a cache larger than memory uses: ``view[idx]`` returns exactly what
        ``load(shas)[idx]`` would (the same float32 values), holding only those rows.

        Raises:
            CacheMissError: some hashes have no row (checked now, before any read).
        """
        return CachedRows(self, shas)

    def _gather(self, shard: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """float32 ``[n, D]`` of the rows at ``(shard[i], row[i])`` (int32 tensors), in that order."""
        if not len(shard):
            return torch.empty((0, self._dim or 0), dtype=torch.float32)
        order = torch.argsort(shard, stable=True)
        uniques, counts = torch.unique_consecutive(shard[order], return_counts=True)
        parts = []
        start = 0
        for s, n in zip(uniques.tolist(), counts.tolist()):
            positions = order[start:start + n]
            start += n
            path = self._shards[s]
            try:
                parts.append(self._read_rows(s, row[positions].tolist()))
            except _Corrupt as e:
                target, lost = self._drop_corrupt(path, str(e))
                raise CorruptShardError(f"{path}: {e}; quarantined to {target}, its {lost} rows are missing "
                                        f"until the next extraction recomputes them") from None
            except FileNotFoundError:
                # Another process quarantined it since this instance indexed it.
                self._reindex()
                raise CorruptShardError(f"{path}: shard was moved away (quarantined by another process); "
                                        f"its rows are missing until the next extraction recomputes them") from None
        data = torch.cat(parts) if len(parts) > 1 else parts[0]
        if len(parts) == 1 and bool((order == torch.arange(len(order))).all()):
            return data
        back = torch.empty_like(order)
        back[order] = torch.arange(len(order))
        return data[back]

    def verify(self, shas: Iterable[str]) -> int:
        """Check the blocks holding the given rows; quarantine every shard that fails.

        Extraction calls this before asking :meth:`missing`, so rows of a damaged shard
        are recomputed instead of read. Hashes without a row are ignored.

        Returns:
            How many rows were lost to quarantine (they are missing now, unless another shard
            holds a copy).
        """
        self._ensure()
        wanted = list(dict.fromkeys(shas))
        lost = 0
        while True:
            todo: dict[int, set[int]] = {}  # shard -> blocks not verified yet
            for sha in wanted:
                where = self._index.get(sha)
                checks = self._blocks[where[0]] if where is not None else None
                if checks is not None:
                    b = where[1] // checks[0]
                    if (self._shards[where[0]], b) not in self._verified:
                        todo.setdefault(where[0], set()).add(b)
            for shard, blocks in todo.items():
                try:
                    with open(self._shards[shard], "rb", buffering=0) as f:
                        for b in sorted(blocks):
                            self._check_block(shard, b, f.fileno())
                except _Corrupt as e:
                    lost += self._drop_corrupt(self._shards[shard], str(e))[1]
                    break  # the index was rebuilt: locate the rows again (copies may live elsewhere)
                except FileNotFoundError:  # quarantined by another process meanwhile
                    self._reindex()
                    break
            else:
                return lost

    def iter_batches(self, shas: Sequence[str], batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
        """``(shas, float32 [n, D])`` batches in the given order, holding one batch at a time.

        Every hash is checked up front, so a missing row fails before any batch is yielded.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        shas = list(shas)
        self._locate(shas)
        for start in range(0, len(shas), batch_size):
            chunk = shas[start:start + batch_size]
            yield chunk, self.load(chunk)

    # -- writing -------------------------------------------------------------------------
    def writer(self, rows_per_shard: int = 4096) -> CacheWriter:
        """A context manager that appends rows, one atomically written shard at a time."""
        return CacheWriter(self, rows_per_shard)

    def _write_shard(self, shas: list[str], features: torch.Tensor) -> Path:
        dim = int(features.shape[1])
        sha_tensor = torch.frombuffer(bytearray(b"".join(_sha_to_bytes(s) for s in shas)), dtype=torch.uint8)
        tensors = {"sha256": sha_tensor.reshape(len(shas), SHA_BYTES)}
        if self.dtype == "int8":
            tensors["features"], tensors["scale"] = quantize_int8(features)
        else:
            # Clamp rather than store inf: fp16 tops out at 65504.
            tensors["features"] = features.float().clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        meta = self._metadata(dim)
        meta["block_rows"] = str(BLOCK_ROWS)
        meta["sha256_crc32"] = f"{_crc(tensors['sha256']):08x}"
        scale = tensors.get("scale")
        crcs = [_crc(*(t[lo:lo + BLOCK_ROWS] for t in (tensors["features"], scale) if t is not None))
                for lo in range(0, len(shas), BLOCK_ROWS)]
        meta["block_crc32"] = "".join(f"{c:08x}" for c in crcs)
        blob = safetensors_save(tensors, metadata=meta)

        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{SHARD_PREFIX}{uuid.uuid4().hex}{SHARD_SUFFIX}"
        final = self.directory / name
        atomic_write(final, lambda f: f.write(blob))
        self._add_shard(final, shas, dim, (BLOCK_ROWS, crcs))
        return final


class CachedRows:
    """A read-only float32 ``[N, D]`` view of feature-cache rows that reads rows when indexed.

    Made by :meth:`FeatureCache.rows`. ``view[idx]`` (an int, a slice, a list or a
    ``LongTensor`` of positions) returns a new float32 tensor of those rows, read through
    the shards' memory maps and checked against their block checksums exactly as
    :meth:`FeatureCache.load` reads them, so it holds the same values ``load`` would. The
    view itself keeps two int32 numbers per row (shard, row), so a training loop drawing
    random batches from a million-row cache holds one batch, not the cache.

    A shard quarantined while the view is in use (a checksum failure) raises
    :class:`CorruptShardError` on that read, and on every read after it: the rows must be
    extracted again and a new view made.
    """

    def __init__(self, cache: FeatureCache, shas: Sequence[str]) -> None:
        where = cache._locate(list(shas))
        self.cache = cache
        self._shard = torch.tensor([w[0] for w in where], dtype=torch.int32)
        self._row = torch.tensor([w[1] for w in where], dtype=torch.int32)
        self._generation = cache._generation

    def __len__(self) -> int:
        return len(self._shard)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.cache.dim or 0))

    @property
    def ndim(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"CachedRows({len(self)} rows of {self.cache!r})"

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if self.cache._generation != self._generation:
            raise CorruptShardError(f"{self.cache.directory}: a shard was quarantined since these rows were "
                                    f"located; extract again and read the rows anew")
        if isinstance(idx, int):
            return self[[idx]][0]
        if isinstance(idx, slice):
            pos = torch.arange(len(self))[idx]
        else:
            pos = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
            if len(pos) and (int(pos.min()) < -len(self) or int(pos.max()) >= len(self)):
                raise IndexError(f"{self!r}: index out of range")
        return self.cache._gather(self._shard[pos], self._row[pos])


class CacheWriter:
    """Buffers rows and writes them as shards; use as a context manager.

    Rows whose hash is already in the cache (or already added) are skipped. A shard is
    written every ``rows_per_shard`` rows and on a clean exit; on an exception the
    unwritten rows are dropped and no partial file is left behind (shards completed
    before it stay: they are whole, and a rerun reuses them).
    """

    def __init__(self, cache: FeatureCache, rows_per_shard: int = 4096) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
        self.cache = cache
        self.rows_per_shard = rows_per_shard
        self._shas: list[str] = []
        self._feats: list[torch.Tensor] = []
        self._pending: set[str] = set()
        self._buffered = 0
        self.rows_written = 0
        self.shards_written: list[Path] = []

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.flush()
        else:
            self._clear()

    def _clear(self) -> None:
        self._shas, self._feats, self._pending, self._buffered = [], [], set(), 0

    def add(self, shas: Sequence[str], feats: torch.Tensor) -> int:
        """Queue rows; returns how many were new (not cached, not queued before).

        Args:
            shas: one sha256 hex digest per row.
            feats: ``[N, D]`` features (any float dtype, any device).
        """
        shas = list(shas)
        if feats.ndim != 2 or feats.shape[0] != len(shas):
            raise ValueError(f"feature cache: field 'features': expected [{len(shas)}, D], got {list(feats.shape)}")
        dim = int(feats.shape[1])
        known = self.cache.dim
        if known is not None and dim != known:
            raise ValueError(f"{self.cache.directory}: field 'features': width {dim}, the cache holds width {known}")
        if self._feats and dim != self._feats[0].shape[1]:
            earlier = self._feats[0].shape[1]
            raise ValueError(f"feature cache: field 'features': width {dim}, earlier rows had {earlier}")
        keep = []
        for i, sha in enumerate(shas):
            _sha_to_bytes(sha)
            if sha not in self._pending and sha not in self.cache:
                self._pending.add(sha)
                keep.append(i)
        if keep:
            self._shas.extend(shas[i] for i in keep)
            self._feats.append(feats.detach()[keep].to("cpu", torch.float32))
            self._buffered += len(keep)
            while self._buffered >= self.rows_per_shard:
                self._write(self.rows_per_shard)
        return len(keep)

    def flush(self) -> None:
        """Write every buffered row now."""
        if self._buffered:
            self._write(self._buffered)

    def _write(self, n: int) -> None:
        feats = torch.cat(self._feats) if len(self._feats) > 1 else self._feats[0]
        shas = self._shas[:n]
        self.shards_written.append(self.cache._write_shard(shas, feats[:n]))
        self.rows_written += n
        self._shas = self._shas[n:]
        rest = feats[n:]
        self._feats = [rest] if rest.shape[0] else []
        self._buffered -= n
        self._pending.difference_update(shas)  # now in the cache's index instead


DECODE_ERRORS = "decode-errors.json"
DECODE_ERRORS_FORMAT = "decode-errors/1"
_SHA_HEX = re.compile(r"[0-9a-f]{64}")


class DecodeErrors:
    """Content hashes that did not decode, with their reasons: ``<root>/decode-errors.json``.

    The file holds ``{"format": "decode-errors/1", "errors": {sha: {"error", "path",
    "decoder"}}}``: the one-line reason, the path it was decoded under (reasons quote it)
    and the :func:`trunk.decode.decoder_stamp` that judged it. Only entries of this
    process's stamp count. It is JSON, checked entry by entry on reading: a file that
    cannot be read or parsed counts as empty (with a warning), and it is replaced by the
    next :meth:`save`, which costs nothing but decoding those files again.

    Concurrency: :meth:`save` re-reads the file and merges this instance's new entries into
    it just before its atomic replace (:func:`trunk.files.write_json_atomic`). Two
    extractions saving at the same instant can still drop one's entries; the only cost is
    that those files are decoded (and recorded) again by the next run.

    Args:
        root: the feature cache's root folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / DECODE_ERRORS
        self.stamp = decoder_stamp()
        self._entries: dict[str, dict[str, str]] = {}
        self._new: dict[str, dict[str, str]] = {}

    @classmethod
    def load(cls, root: str | Path) -> DecodeErrors:
        """The record under ``root`` as it is now (empty when there is none)."""
        record = cls(root)
        record._entries = record._read()
        return record

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log.warning("%s: cannot be read (%s: %s); decode failures will be tried again", self.path,
                        type(e).__name__, e)
            return {}
        if not isinstance(doc, dict) or doc.get("format") != DECODE_ERRORS_FORMAT \
                or not isinstance(doc.get("errors"), dict):
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            log.warning("%s: not a decode-errors file (format %r, expected %r); decode failures will be tried "
                        "again", self.path, got, DECODE_ERRORS_FORMAT)
            return {}
        entries = {}
        for sha, entry in doc["errors"].items():
            if (isinstance(sha, str) and _SHA_HEX.fullmatch(sha) and isinstance(entry, dict)
                    and all(isinstance(entry.get(k), str) for k in ("error", "path", "decoder"))):
                entries[sha] = {k: entry[k] for k in ("error", "path", "decoder")}
        return entries

    def get(self, sha: str) -> tuple[str, str] | None:
        """``(reason, path it was decoded under)`` for a hash this decoder failed on, else None."""
        entry = self._new.get(sha) or self._entries.get(sha)
        if entry is None or entry["decoder"] != self.stamp:
            return None
        return entry["error"], entry["path"]

    def __contains__(self, sha: object) -> bool:
        return isinstance(sha, str) and self.get(sha) is not None

    def __len__(self) -> int:
        return sum(1 for sha in {**self._entries, **self._new} if sha in self)

    def add(self, sha: str, error: str, path: str) -> None:
        """Remember that the bytes hashing to ``sha`` (read from ``path``) failed to decode with ``error``."""
        _sha_to_bytes(sha)
        self._new[sha] = {"error": str(error), "path": str(path), "decoder": self.stamp}

    @property
    def unsaved(self) -> int:
        """Entries added since the last :meth:`save`."""
        return len(self._new)

    def save(self) -> None:
        """Merge the new entries into the file as it is now and replace it atomically.

        Raises:
            OSError: the folder cannot be created or written; the file is unchanged.
        """
        if not self._new:
            return
        merged = self._read()
        merged.update(self._new)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"format": DECODE_ERRORS_FORMAT, "errors": merged}, indent=1,
                          sort_keys=True)
        self._entries, self._new = merged, {}
