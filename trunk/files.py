"""Atomic file writes: the one way the platform commits a file others may read.

A file is written whole to a dot-prefixed temp file in the target's folder, flushed and
fsynced, then given its final name in one step, and the folder is fsynced so that the
name survives a power cut:

- ``os.replace`` (the default): the name now holds the new content; a reader sees the
  old file or the new one, never a part of either.
- ``os.link`` (``exclusive=True``): ``link(2)`` fails when the name exists, so of several
  writers racing on one name exactly one commits, and the others get ``False`` back and
  change nothing (exactly-once commits of classification shards and job files).

On any failure, or an exception from the caller's ``write`` callback, the temp file is
removed and nothing is visible under the final name; an ``OSError`` that names no file
(``fsync``, Arrow's writes) is re-raised naming the temp file, so a storage error reads as
one line saying where. A process killed midway leaves at most a dot-prefixed temp file,
which no reader's glob matches (the feature cache's ``shard-*``, the classification
folder's ``part-*``); the classification engine names its temps with its job id so that
it can sweep its own (:mod:`heads.classify.output`).

This needs a POSIX file system (local disk or a shared mount); object stores have neither
atomic rename nor link.

Used by: feature-cache shards (:mod:`trunk.cache`), classification shards and their
``_JOB.json`` / ``_SUCCESS.json`` (:mod:`heads.classify.output`), ``trunk.json`` and the
trunk's weights (:meth:`trunk.model.Trunk.save`), ``head.json`` and the head's weights
(:func:`heads.store.save_head`), ``history.json`` (:mod:`heads.training.fit`), the
cascade report's ``outcomes.json``, benchmark results and the demo dataset's done marker.

Deliberately plain writes: files written into a private ``tempfile.TemporaryDirectory``
and then uploaded to MLflow (the release manifest in :mod:`registry.store.releases`, a
head's config and gate text in :mod:`registry.store.heads`): nobody can open them before
the write returns, and MLflow copies a finished file. Human-readable report pages
(Markdown, PNG) in a fresh, uniquely named report folder are plain too: nothing reads
them back, and a crash shows as a missing report, not a wrong figure.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or link inside ``directory`` durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def temp_path(path: str | Path, prefix: str = ".") -> Path:
    """The temp file :func:`atomic_write` writes ``path`` through: ``<prefix><name>.<pid>.<rand8>.tmp``.

    Args:
        path: the final file.
        prefix: starts the temp file's name; keep it starting with a dot so globs skip it.
    """
    path = Path(path)
    return path.parent / f"{prefix}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def named_error(e: OSError, path: str | Path) -> OSError:
    """``e``, or the same error naming ``path`` when it names no file (fsync, Arrow's writes)."""
    if e.filename is not None:
        return e
    text = str(e).strip()
    strerror = e.strerror or (text.splitlines()[0] if text else type(e).__name__)
    try:
        named = type(e)(e.errno, strerror, str(path))
    except TypeError:  # an OSError subclass with its own constructor
        named = OSError(e.errno, strerror, str(path))
    named.__cause__ = e
    return named


def _write_synced(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    # A module-level seam: the crash tests swap it to SIGKILL halfway through a write.
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, exclusive: bool = False,
                 temp_prefix: str = ".") -> bool:
    """Write ``path`` whole through a temp file in its folder (see the module docstring).

    Args:
        path: the final file; its folder must exist.
        write: writes the content to the binary file object it is given.
        exclusive: commit by ``os.link``, leaving an existing file untouched; otherwise
            replace whatever is there.
        temp_prefix: the temp file's name prefix (:func:`temp_path`).

    Returns:
        True when this call committed the file; False (only with ``exclusive``) when the
        name already existed, in which case nothing changed.

    Raises:
        OSError: the write, fsync, rename or link failed; its ``filename`` names a file,
            and nothing partial is left under ``path`` nor any temp file.
    """
    path = Path(path)
    tmp = temp_path(path, temp_prefix)
    try:
        _write_synced(tmp, write)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except FileNotFoundError:
                # Another process swept our temp file away after committing the same name.
                if path.exists():
                    return False
                raise
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise named_error(e, tmp) from e
    finally:
        tmp.unlink(missing_ok=True)  # after a link, the temp is a second name; after a rename, gone
    return True


def json_bytes(obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> bytes:
    """``obj`` as the platform writes JSON files: ``json.dumps`` plus a final newline, UTF-8."""
    return (json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n").encode()


def write_json_atomic(path: str | Path, obj: Any, *, exclusive: bool = False, indent: int | None = 2,
                      sort_keys: bool = False, default: Callable[[Any], Any] | None = None,
                      temp_prefix: str = ".") -> bool:
    """:func:`atomic_write` of ``obj`` as JSON (:func:`json_bytes`); the same arguments and return value.

    The document is serialised before any file is opened, so an object that is not
    JSON-able raises ``TypeError`` with nothing written.
    """
    blob = json_bytes(obj, indent=indent, sort_keys=sort_keys, default=default)
    return atomic_write(path, lambda f: f.write(blob), exclusive=exclusive, temp_prefix=temp_prefix)
