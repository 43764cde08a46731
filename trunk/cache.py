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

- reads are zero-copy slices of a memory-mapped file (``safe_open(...).get_slice``), so
  training can stream rows without holding the cache in memory;
- no pickle: a shard is a JSON header plus raw tensor bytes, safe to load from anywhere;
- one self-describing file per shard (dtype, shape and our key in the header), written
  whole to a dot-prefixed temp file, fsynced and atomically renamed, so a crash leaves
  either a complete shard or nothing visible. Appending is adding a shard; several
  processes can append at once without locks (unique names; first copy of a row wins).

Alternatives considered: Parquet stores columns of lists well but reading a row range
means decoding a row group, and partial files need the same rename dance; LMDB gives
random access but is one mutable file with its own locking and a fixed map size, awkward
on shared filesystems; HDF5 appends in place, so a crash mid-write can corrupt the whole
file, and it does not cope with concurrent writers. The torch stack already ships
safetensors, and the platform already stores head weights with it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

DTYPES = ("float16", "int8")
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
FORMAT = "feature-cache/1"
SHA_BYTES = 32
_FP16_MAX = float(torch.finfo(torch.float16).max)


class CacheMissError(KeyError):
    """Some requested rows are not in the cache; the message says how many and which."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


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


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def quantize_int8(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row absmax int8: ``(q int8 [N, D], scale float32 [N])``."""
    x = features.float()
    absmax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0])
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


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
        self._index: dict[str, tuple[int, int]] = {}
        self._dim: int | None = None
        self._scanned = False

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

    def _read_shard_index(self, path: Path) -> tuple[list[str], int]:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                shas = f.get_tensor("sha256")
                dim = int(f.get_slice("features").get_shape()[1])
        except (SafetensorError, OSError, KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{path}: not a readable feature-cache shard ({type(e).__name__}: {e})") from None
        expected = self._metadata(dim)
        for key in ("trunk_id", "tap", "preprocess_key", "dtype"):
            if meta.get(key) != expected[key]:
                raise ValueError(
                    f"{path}: field '{key}' is {meta.get(key)!r}, expected {expected[key]!r} for this folder"
                )
        if shas.dtype != torch.uint8 or shas.ndim != 2 or shas.shape[1] != SHA_BYTES:
            raise ValueError(
                f"{path}: field 'sha256' has shape {tuple(shas.shape)} {shas.dtype}, expected [N, 32] uint8"
            )
        blob = shas.numpy().tobytes()
        return [blob[i:i + SHA_BYTES].hex() for i in range(0, len(blob), SHA_BYTES)], dim

    def _add_shard(self, path: Path, shas: Sequence[str], dim: int) -> None:
        if self._dim is not None and dim != self._dim:
            raise ValueError(f"{path}: field 'features' has width {dim}, the cache's other shards have {self._dim}")
        self._dim = dim
        shard = len(self._shards)
        self._shards.append(path)
        for row, sha in enumerate(shas):
            self._index.setdefault(sha, (shard, row))  # duplicates across shards: first wins

    def refresh(self) -> None:
        """Index shards that appeared since the last scan (e.g. written by another process)."""
        self._scanned = True
        if not self.directory.is_dir():
            return
        known = set(self._shards)
        # Dot-prefixed temp files of unfinished writes never match the shard pattern.
        for path in sorted(self.directory.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}")):
            if path not in known:
                shas, dim = self._read_shard_index(path)
                self._add_shard(path, shas, dim)

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

    def _read_rows(self, shard: int, rows: list[int]) -> torch.Tensor:
        """float32 ``[len(rows), D]`` for the given rows of one shard, reading only runs of rows."""
        order = sorted(set(rows))
        runs: list[tuple[int, int]] = []
        for r in order:
            if runs and r == runs[-1][1]:
                runs[-1] = (runs[-1][0], r + 1)
            else:
                runs.append((r, r + 1))
        path = self._shards[shard]
        with safe_open(str(path), framework="pt") as f:
            feats = f.get_slice("features")
            scale = f.get_slice("scale") if self.dtype == "int8" else None
            parts = []
            for lo, hi in runs:
                block = feats[lo:hi].float()
                if scale is not None:
                    block = block * scale[lo:hi].float()[:, None]
                parts.append(block)
        data = torch.cat(parts) if len(parts) > 1 else parts[0]
        pos = {r: i for i, r in enumerate(order)}
        return data[[pos[r] for r in rows]]

    def load(self, shas: Sequence[str]) -> torch.Tensor:
        """Features as float32 ``[N, D]``, rows in the given order.

        Raises:
            CacheMissError: a ``KeyError`` saying how many (and which) hashes have no row.
        """
        where = self._locate(list(shas))
        if not where:
            return torch.empty((0, self._dim or 0), dtype=torch.float32)
        out = torch.empty((len(where), self._dim), dtype=torch.float32)
        by_shard: dict[int, list[int]] = {}
        for i, (shard, _) in enumerate(where):
            by_shard.setdefault(shard, []).append(i)
        for shard, positions in by_shard.items():
            out[positions] = self._read_rows(shard, [where[i][1] for i in positions])
        return out

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
        blob = safetensors_save({k: v.contiguous() for k, v in tensors.items()}, metadata=self._metadata(dim))

        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{SHARD_PREFIX}{uuid.uuid4().hex}{SHARD_SUFFIX}"
        final = self.directory / name
        tmp = self.directory / f".{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.directory)
        self._add_shard(final, shas, dim)
        return final


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
