"""Content hashes of image files, remembered by (size, mtime) so an unchanged file is not read again.

The platform keys images by the sha256 of their bytes (the feature cache's rows, a head's
``data_sha``, :class:`trunk.seen.SeenImages`). Hashing a million images reads every byte of
them; most runs see the same files as the last one. :class:`ContentHashes` keeps, per file
(its real path, symlinks resolved), ``(size, mtime_ns, sha256)`` and answers from that while
``os.stat`` still shows the same size and modification time; a file whose size or mtime
changed is read and hashed again.

Layout: ``<cache root>/content-hashes/<bb>.json``, 256 buckets chosen by a hash of the
file's folder, so a data set in a few folders loads (and rewrites) a few small files, not
one index of every image the platform ever saw. Each holds ``{"format":
"content-hashes/1", "folders": {folder: {name: [size, mtime_ns, sha256, hashed_ns]}}}``.
A bucket that cannot be read or parsed counts as empty (with a warning) and is replaced
by the next :meth:`ContentHashes.save`; the only cost is hashing those files again.

What it cannot see (the same caveat as ``make`` and ``rsync``'s quick check): a file
rewritten with the same size *and* the same mtime (a tool that restores mtimes, a clock
set back) keeps its old hash. Two guards narrow this: an entry hashed less than
:data:`RACY_NS` after the file's mtime is not trusted (a same-size rewrite within the file
system's timestamp granularity would otherwise go unseen; git's "racy clean" rule), so it
is hashed again on the next run; and ``verify=True`` hashes every file again, replacing
and counting (:attr:`ContentHashes.changed_in_place`) entries whose content changed.

Concurrency: :meth:`ContentHashes.save` re-reads each bucket it changed and merges its new
entries into it just before the atomic replace (:func:`trunk.files.write_json_atomic`), as
:class:`trunk.cache.DecodeErrors` does. Two jobs saving one bucket at the same instant can
drop one's entries; the next run hashes those files again. Entries of folders that no
longer exist are dropped when their bucket is saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from trunk.files import write_json_atomic

log = logging.getLogger(__name__)

FOLDER = "content-hashes"
FORMAT = "content-hashes/1"
# Entries hashed within this long after the file's mtime are hashed again next time: a
# same-size rewrite inside the file system's timestamp granularity (up to 2 s on FAT) would
# otherwise keep the same (size, mtime).
RACY_NS = 2_000_000_000
_SHA_HEX = re.compile(r"[0-9a-f]{64}")

Entry = tuple[int, int, str, int]  # size, mtime_ns, sha256 hex, hashed_ns (wall clock when hashed)


def bucket_of(folder: str) -> str:
    """The bucket (two hex digits) that holds the files of ``folder`` (a real path)."""
    return hashlib.sha256(folder.encode("utf-8", "surrogateescape")).hexdigest()[:2]


def hash_file(path: str | Path) -> tuple[str, os.stat_result]:
    """``(sha256 hex of the bytes, stat of the open file after reading it)``."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return digest, os.fstat(f.fileno())


class ContentHashes:
    """sha256 of files, answered from a ``(size, mtime_ns)`` index under the cache root.

    Args:
        root: the feature cache's root folder (the index lives in ``root/content-hashes``).
        verify: hash every file again (and correct the index) instead of trusting it.

    Attributes:
        hits: files answered from the index without being read.
        hashed: files read and hashed.
        changed_in_place: with ``verify``, files whose content changed while size and mtime
            did not (what the index alone cannot see).
    """

    def __init__(self, root: str | Path, *, verify: bool = False) -> None:
        self.directory = Path(root) / FOLDER
        self.verify = verify
        self._buckets: dict[str, dict[str, dict[str, Entry]]] = {}
        self._new: dict[str, dict[str, dict[str, Entry]]] = {}
        self.hits = 0
        self.hashed = 0
        self.changed_in_place = 0

    def _path(self, bucket: str) -> Path:
        return self.directory / f"{bucket}.json"

    def _read(self, bucket: str) -> dict[str, dict[str, Entry]]:
        path = self._path(bucket)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log.warning("%s: cannot be read (%s: %s); its files will be hashed again", path, type(e).__name__, e)
            return {}
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("folders"), dict):
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            log.warning("%s: not a content-hashes file (format %r, expected %r); its files will be hashed again",
                        path, got, FORMAT)
            return {}
        folders: dict[str, dict[str, Entry]] = {}
        for folder, names in doc["folders"].items():
            if not isinstance(names, dict):
                continue
            kept = {}
            for name, e in names.items():
                if (isinstance(e, list) and len(e) == 4 and all(type(v) is int for v in (e[0], e[1], e[3]))
                        and isinstance(e[2], str) and _SHA_HEX.fullmatch(e[2])):
                    kept[name] = (e[0], e[1], e[2], e[3])
            if kept:
                folders[folder] = kept
        return folders

    def _bucket(self, bucket: str) -> dict[str, dict[str, Entry]]:
        if bucket not in self._buckets:
            self._buckets[bucket] = self._read(bucket)
        return self._buckets[bucket]

    @staticmethod
    def _key(path: str | Path) -> tuple[str, str]:
        folder, name = os.path.split(os.path.realpath(path))
        return folder, name

    def lookup(self, path: str | Path, st: os.stat_result | None = None) -> str | None:
        """The file's hash if the index holds it for its current size and mtime, else None (nothing read).

        ``st``: the file's stat, when the caller took it already (one ``os.stat`` per file).
        Always None with ``verify``. Raises ``OSError`` (e.g. ``FileNotFoundError``) from ``os.stat``.
        """
        st = os.stat(path) if st is None else st
        if self.verify:
            return None
        folder, name = self._key(path)
        entry = self._get(folder, name)
        if entry is None:
            return None
        size, mtime_ns, sha, hashed_ns = entry
        if size != st.st_size or mtime_ns != st.st_mtime_ns or hashed_ns - mtime_ns < RACY_NS:
            return None
        self.hits += 1
        return sha

    def _get(self, folder: str, name: str) -> Entry | None:
        bucket = bucket_of(folder)
        new = self._new.get(bucket, {}).get(folder, {}).get(name)
        return new if new is not None else self._bucket(bucket).get(folder, {}).get(name)

    def sha(self, path: str | Path) -> str:
        """The sha256 hex digest of the file's bytes: from the index, or read, hashed and recorded.

        Raises:
            OSError: the file cannot be opened or read.
        """
        sha = self.lookup(path)
        if sha is not None:
            return sha
        started = time.time_ns()
        before = os.stat(path)
        sha, after = hash_file(path)
        self.hashed += 1
        if self.verify:
            folder, name = self._key(path)
            old = self._get(folder, name)
            if old is not None and old[2] != sha and (old[0], old[1]) == (after.st_size, after.st_mtime_ns):
                self.changed_in_place += 1
                log.warning("%s: content changed without a new size or mtime; its hash is corrected", path)
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
            self.record(path, sha, after, hashed_ns=started)
        return sha

    def record(self, path: str | Path, sha: str, st: os.stat_result, *, hashed_ns: int | None = None) -> None:
        """Remember ``sha`` for ``path`` as ``st`` (a stat taken *before* its bytes were read) shows it.

        For callers that read the bytes anyway (extraction): nothing is read here.
        """
        if not _SHA_HEX.fullmatch(sha):
            raise ValueError(f"content hashes: '{sha}' is not a sha256 hex digest")
        folder, name = self._key(path)
        entry = (int(st.st_size), int(st.st_mtime_ns), sha, time.time_ns() if hashed_ns is None else hashed_ns)
        if self._get(folder, name) == entry:
            return
        self._new.setdefault(bucket_of(folder), {}).setdefault(folder, {})[name] = entry

    @property
    def unsaved(self) -> int:
        """Entries recorded since the last :meth:`save`."""
        return sum(len(names) for folders in self._new.values() for names in folders.values())

    def save(self) -> None:
        """Merge the new entries into their buckets as they are now and replace each atomically.

        Raises:
            OSError: the folder cannot be created or written; buckets not yet written are unchanged.
        """
        if not self._new:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for bucket in sorted(self._new):
            merged = self._read(bucket)
            for folder, names in self._new[bucket].items():
                merged.setdefault(folder, {}).update(names)
            # A folder that is gone (a deleted data set) takes its entries with it.
            merged = {f: names for f, names in merged.items() if os.path.isdir(f)}
            doc = {"format": FORMAT, "folders": {f: {n: list(e) for n, e in sorted(names.items())}
                                                 for f, names in sorted(merged.items())}}
            write_json_atomic(self._path(bucket), doc, indent=None)
            self._buckets[bucket] = merged
            del self._new[bucket]
