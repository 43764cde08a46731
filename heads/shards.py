"""The bulk-classification output folder: its files, its schema, and commit-once writes.

The folder is a contract (DESIGN.md, "Bulk classification output")::

    _JOB.json            written first: the job's fingerprint, release, heads, shard size
    part-00000.parquet   rows 0 .. rows_per_shard-1 of the input list, in input order
    part-00001.parquet   ...
    _SUCCESS.json        written last: release, counts, errors by reason, throughput

Every file is committed once: written to a dot-prefixed temp file, flushed and fsynced,
then *hard-linked* to its final name and the folder fsynced. ``link(2)`` fails when the
name exists, so two jobs racing on one folder cannot both commit a shard: the loser gets
``False`` back and drops its copy (both copies hold the same rows, since a shard's rows
depend only on the job's fingerprint). A reader never sees a partial file. This needs a
POSIX file system (local disk or a shared mount); object stores have no atomic link.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from trunk.cache import fsync_dir

JOB_FILE = "_JOB.json"
SUCCESS_FILE = "_SUCCESS.json"
SHARD_GLOB = "part-*.parquet"
TEMP_GLOB = ".*.tmp"


def shard_name(k: int) -> str:
    """File name of shard ``k``."""
    return f"part-{k:05d}.parquet"


def output_schema(head_names: Sequence[str]) -> pa.Schema:
    """The Parquet schema of a classification shard, heads in sorted name order.

    Args:
        head_names: the bank's head names.
    """
    fields = [pa.field("path", pa.string(), nullable=False),
              pa.field("sha256", pa.string()),
              pa.field("error", pa.string())]
    for name in sorted(head_names):
        fields += [pa.field(f"{name}_label", pa.string()), pa.field(f"{name}_score", pa.float32())]
    return pa.schema(fields)


def job_fingerprint(paths: Sequence[str], release: Mapping[str, Any], rows_per_shard: int,
                    head_names: Sequence[str], settings: Mapping[str, Any] | None = None) -> str:
    """sha256 naming one job: its inputs in order, its release, shard size, heads and settings.

    Args:
        paths: the input paths as strings, in order.
        release: the release dict (name, version, trunk, heads, ...).
        rows_per_shard: rows per Parquet shard.
        head_names: the bank's head names.
        settings: anything else that changes a row (batch size, draft decoding); omitted
            keys are not hashed, so older fingerprints stay valid.
    """
    h = hashlib.sha256()
    header = {"release": release, "rows_per_shard": int(rows_per_shard),
              "heads": sorted(head_names), "images": len(paths)}
    if settings:
        header["settings"] = dict(settings)
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    # NUL-separated: the one byte a file path cannot contain, so the list is unambiguous.
    for p in paths:
        h.update(b"\0")
        h.update(p.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def error_reason(error: str) -> str:
    """The stable reason phrase of an ``error`` cell (``"not an image: a.jpg"`` -> ``"not an image"``)."""
    return error.split(": ", 1)[0]


# -- commit-once writes -------------------------------------------------------------------
def _temp(directory: Path, name: str) -> Path:
    return directory / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def _write_synced(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def commit_once(directory: Path, name: str, write: Callable[[IO[bytes]], Any]) -> bool:
    """Write ``directory/name`` whole, unless it already exists.

    Args:
        directory: an existing folder on a POSIX file system.
        name: the final file name.
        write: writes the content to the binary file object it is given.

    Returns:
        True when this call created the file; False when it was already there (another
        job, or an earlier run, committed it first), in which case nothing changed.
    """
    tmp = _temp(directory, name)
    try:
        _write_synced(tmp, write)
        try:
            os.link(tmp, directory / name)
        except FileExistsError:
            return False
        except FileNotFoundError:
            # A finished run of this job swept our temp file away: it committed everything.
            if (directory / name).exists():
                return False
            raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(directory)
    return True


def set_aside(directory: Path, name: str) -> None:
    """Rename a damaged ``directory/name`` out of the way (kept, dot-prefixed) so it can be recommitted."""
    try:
        os.replace(directory / name, directory / f".{name}.damaged-{uuid.uuid4().hex[:8]}")
    except FileNotFoundError:
        return  # another job moved it first
    fsync_dir(directory)


def commit_json(directory: Path, name: str, content: Mapping[str, Any]) -> bool:
    """:func:`commit_once` of a JSON document."""
    blob = (json.dumps(content, indent=2, default=str) + "\n").encode()
    return commit_once(directory, name, lambda f: f.write(blob))


def commit_table(directory: Path, name: str, table: pa.Table) -> bool:
    """:func:`commit_once` of a Parquet file."""
    return commit_once(directory, name, lambda f: pq.write_table(table, f))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the folder, or a one-line ``ValueError`` naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}); remove the output folder or choose another") from None


def remove_stale_temps(directory: Path, older_than_s: float = 3600.0) -> int:
    """Delete temp files left by killed jobs, sparing recent ones a live job may still be writing.

    Returns:
        How many were deleted.
    """
    import time

    removed = 0
    now = time.time()
    for tmp in directory.glob(TEMP_GLOB):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def shard_errors(path: Path, schema: pa.Schema, rows: int) -> list[str | None] | None:
    """The ``error`` column of a complete, well-formed shard; None when absent or damaged.

    Args:
        path: the shard file.
        schema: the schema it must have.
        rows: the number of rows it must have.
    """
    if not path.is_file():
        return None
    try:
        meta = pq.read_metadata(path)
        if meta.num_rows != rows or not meta.schema.to_arrow_schema().equals(schema):
            return None
        return pq.read_table(path, columns=["error"]).column("error").to_pylist()
    except (pa.ArrowException, OSError):
        return None
