"""The bulk-classification output folder: its files, its schema, and commit-once writes.

The folder is a contract (DESIGN.md, "Bulk classification output")::

    _JOB.json            written first: the job's fingerprint, release, heads, shard size
    part-00000.parquet   rows 0 .. rows_per_shard-1 of the input list, in input order
    part-00001.parquet   ...
    _part-00000.monitor.safetensors  that shard's monitoring stats, committed just before it
    _MONITOR.safetensors the job's monitoring stats: the exact merge of every shard's, before _SUCCESS.json
    _SUCCESS.json        written last: release, counts, errors by reason, throughput
    .vtp-<job id>.claim-00000.0      a run's claim on shard 0 while it computes it, deleted once committed

Each shard carries its provenance in its Parquet key-value metadata, one JSON document
under :data:`PROVENANCE_KEY` (``vtp.provenance``): the release, the trunk's version and
trunk_id, each head's version and class list, the job (fingerprint, id, shard size,
settings) and which rows of the input list the shard holds (:func:`job_provenance`,
:func:`shard_schema`). A shard copied out of its folder still says where it came from:
:func:`shard_provenance` reads it back. It depends only on the job, never on the
backend, the host or the time, so a resumed job's shards are byte for byte a clean run's.

The monitoring files start with ``_`` so that Parquet readers of the folder (Arrow's dataset
discovery skips ``_`` and ``.`` names) see only the shards. They (:class:`heads.predict.MonitorStats`: per head label counts and score
histogram, per tap feature moments and a sample) are kept per shard for the same reason
the rows are: a shard's stats depend only on its rows, so a resumed job reads the stats of
the shards it skips from their sidecars instead of recomputing them, and the job's stats
are those of a clean run.

Every file is committed once (:func:`trunk.files.atomic_write` with ``exclusive=True``):
written to a temp file named with the job's id (see :func:`temp_prefix`), flushed and
fsynced, then *hard-linked* to its final name and the folder fsynced. ``link(2)`` fails when the
name exists, so two jobs racing on one folder cannot both commit a shard: the loser gets
``False`` back and drops its copy (both copies hold the same rows, since a shard's rows
depend only on the job's fingerprint). A reader never sees a partial file. This needs a
POSIX file system (local disk or a shared mount); object stores have no atomic link.

Claims. Two runs of one job on one folder split the work: before computing shard k a run
claims it with ``.vtp-<job id>.claim-NNNNN.<generation>`` (:class:`ShardClaims`), created
whole and exclusively like every commit, holding its owner (a random id, host, pid and that
pid's start time) and lease; the run renews the lease (the file's mtime) while it works and
deletes the claim once the shard is committed. Other runs skip a shard under a live claim;
a claim whose owner died (its pid gone on this host, or its lease expired) is taken over
by creating the next generation exclusively, so exactly one run takes it. Claims only save
work: correctness still rests on commit-once, so a mistaken takeover costs a duplicate
computation, never a duplicate row. As dot files named with the job id, claims are
invisible to Parquet readers and no foreign file.

The job touches only files it created. Its temp files and set-aside damaged shards start
with ``.vtp-<job id>.`` (the first 16 hex digits of the job's fingerprint), and only those
are ever removed; a folder holding any other file the platform does not write is refused
(:func:`foreign_files`) unless the caller allows it, and then such files are left alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from trunk.files import atomic_write, fsync_dir, json_bytes, write_json_atomic

JOB_FILE = "_JOB.json"
SUCCESS_FILE = "_SUCCESS.json"
SHARD_GLOB = "part-*.parquet"
MONITOR_FILE = "_MONITOR.safetensors"
SHARD_MONITOR_SUFFIX = ".monitor.safetensors"
# Every temp file the platform writes, whichever job wrote it; a job removes only its own.
TEMP_GLOB = ".vtp-*.tmp"
PLATFORM_PREFIX = ".vtp-"
JOB_ID_LENGTH = 16
# The Parquet key-value metadata key of a shard's provenance (JSON), and that document's format.
PROVENANCE_KEY = "vtp.provenance"
PROVENANCE_FORMAT = 1
# Names a classification folder may hold: the job's files, and dot files named with a job id.
_PLATFORM_NAME = re.compile(rf"(_JOB\.json|_SUCCESS\.json|_MONITOR\.safetensors|part-[0-9]{{5,}}\.parquet|"
                            rf"_part-[0-9]{{5,}}\.monitor\.safetensors|"
                            rf"{re.escape(PLATFORM_PREFIX)}[0-9a-f]{{{JOB_ID_LENGTH}}}\..+)", re.DOTALL)


def shard_name(k: int) -> str:
    """File name of shard ``k``."""
    return f"part-{k:05d}.parquet"


def shard_monitor_name(k: int) -> str:
    """File name of shard ``k``'s monitoring stats (committed before the shard)."""
    return f"_part-{k:05d}{SHARD_MONITOR_SUFFIX}"


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


def job_provenance(release: Mapping[str, Any], *, trunk_id: str, classes: Mapping[str, Sequence[str]],
                   fingerprint: str, rows_per_shard: int, images: int,
                   settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The provenance every shard of one job carries (:func:`shard_schema` adds which rows).

    Only what decides the rows goes in, so it is the same on every backend and every run.

    Args:
        release: the release dict (name, version, trunk_version, trunk_id, heads
            ``{name: version}``, ...), as in ``_JOB.json``.
        trunk_id: the id of the trunk the job runs.
        classes: ``{head name: class names}`` of the bank.
        fingerprint: the job's :func:`job_fingerprint`.
        rows_per_shard: rows per Parquet shard.
        images: length of the job's input list.
        settings: the job's row-changing settings (batch size, decoding, precision).

    Returns:
        ``format``, ``release`` (as given), ``trunk`` (``version``, ``trunk_id``),
        ``heads`` (``{name: {"version", "classes"}}``, sorted by name) and ``job``
        (``fingerprint``, ``id``, ``images``, ``rows_per_shard``, ``shards``, ``settings``).
    """
    versions = release.get("heads") or {}
    return {
        "format": PROVENANCE_FORMAT,
        "release": dict(release),
        "trunk": {"version": release.get("trunk_version"), "trunk_id": trunk_id},
        "heads": {name: {"version": versions.get(name), "classes": list(classes[name])} for name in sorted(classes)},
        "job": {"fingerprint": fingerprint, "id": job_id(fingerprint), "images": int(images),
                "rows_per_shard": int(rows_per_shard), "shards": math.ceil(images / rows_per_shard),
                "settings": dict(settings or {})},
    }


def shard_schema(schema: pa.Schema, provenance: Mapping[str, Any], k: int) -> pa.Schema:
    """``schema`` with shard ``k``'s provenance under :data:`PROVENANCE_KEY`; other metadata keys kept.

    Args:
        schema: :func:`output_schema` of the job's heads.
        provenance: :func:`job_provenance` of the job.
        k: the shard; its ``shard`` entry says which rows of the input list it holds
            (``index``, ``first_row``, ``rows``).
    """
    job = provenance["job"]
    first = k * int(job["rows_per_shard"])
    rows = min(int(job["rows_per_shard"]), int(job["images"]) - first)
    document = {**provenance, "shard": {"index": k, "first_row": first, "rows": rows}}
    # Sorted keys, no spaces: the same bytes for the same job, whichever process writes them.
    blob = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return schema.with_metadata({**(schema.metadata or {}), PROVENANCE_KEY.encode(): blob.encode()})


def shard_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance a classification shard carries (see :func:`job_provenance`), wherever the file now is.

    Args:
        path: a ``part-NNNNN.parquet`` file, in its output folder or copied elsewhere.

    Returns:
        The JSON document: ``release``, ``trunk``, ``heads`` (version and classes per head),
        ``job`` (fingerprint, id, ...) and ``shard`` (``index``, ``first_row``, ``rows``).

    Raises:
        ValueError: one line naming the file: not a readable Parquet file, no provenance
            (written before shards carried it, or not a classification shard), or damaged.
    """
    try:
        metadata = pq.read_metadata(path).metadata or {}
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0] if str(e) else e})") from None
    blob = metadata.get(PROVENANCE_KEY.encode())
    if blob is None:
        raise ValueError(f"{path}: has no '{PROVENANCE_KEY}' metadata; not a classification shard, "
                         "or written before shards carried their provenance")
    try:
        document = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: metadata '{PROVENANCE_KEY}' is not valid JSON ({e})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: metadata '{PROVENANCE_KEY}' is not a JSON object")
    return document


def job_fingerprint(paths: Iterable[str], release: Mapping[str, Any], rows_per_shard: int,
                    head_names: Sequence[str], settings: Mapping[str, Any] | None = None, *,
                    images: int | None = None) -> str:
    """sha256 naming one job: its inputs in order, its release, shard size, heads and settings.

    Args:
        paths: the input paths as strings, in order: a sequence, or (with ``images``) any
            iterable, hashed as it streams (:class:`JobFingerprint`).
        release: the release dict (name, version, trunk, heads, ...).
        rows_per_shard: rows per Parquet shard.
        head_names: the bank's head names.
        settings: anything else that changes a row (batch size, draft decoding); omitted
            keys are not hashed, so older fingerprints stay valid.
        images: how many paths there are, for a stream (the count is hashed first);
            None: ``len(paths)``.

    Raises:
        ValueError: the stream holds another number of paths than ``images``.
    """
    h = JobFingerprint(release, rows_per_shard, head_names, settings, images=len(paths) if images is None else images)
    for p in paths:
        h.update(p)
    return h.hexdigest()


class JobFingerprint:
    """:func:`job_fingerprint`, computed incrementally over a stream of input paths.

    The count is hashed before the paths (so fingerprints of list-based jobs stay valid),
    which is why it must be known first: a bulk job counts its input stream in one pass and
    fingerprints it in the next.

    Args:
        release, rows_per_shard, head_names, settings: as for :func:`job_fingerprint`.
        images: the number of paths that will be given to :meth:`update`.
    """

    def __init__(self, release: Mapping[str, Any], rows_per_shard: int, head_names: Sequence[str],
                 settings: Mapping[str, Any] | None = None, *, images: int) -> None:
        self._h = hashlib.sha256()
        self.images = int(images)
        self.count = 0
        header = {"release": release, "rows_per_shard": int(rows_per_shard),
                  "heads": sorted(head_names), "images": self.images}
        if settings:
            header["settings"] = dict(settings)
        self._h.update(json.dumps(header, sort_keys=True, default=str).encode())

    def update(self, path: str) -> None:
        """Hash the next input path."""
        # NUL-separated: the one byte a file path cannot contain, so the list is unambiguous.
        self._h.update(b"\0")
        self._h.update(path.encode("utf-8", "surrogateescape"))
        self.count += 1

    def hexdigest(self) -> str:
        """The fingerprint; a ``ValueError`` when the stream's length was not ``images``."""
        if self.count != self.images:
            raise ValueError(f"the input stream held {self.count} paths, not the {self.images} counted; "
                             "inputs changed while the job was planned")
        return self._h.hexdigest()


def shard_digest(paths: Iterable[str]) -> bytes:
    """A short digest of one shard's input paths, in order: how a job checks each pass over its stream saw the same shard."""
    h = hashlib.sha256()
    for p in paths:
        h.update(b"\0")
        h.update(p.encode("utf-8", "surrogateescape"))
    return h.digest()


def error_reason(error: str) -> str:
    """The stable reason phrase of an ``error`` cell (``"not an image: a.jpg"`` -> ``"not an image"``)."""
    return error.split(": ", 1)[0]


def job_id(fingerprint: str) -> str:
    """The short id a job's own files are named with: the first 16 hex digits of its fingerprint."""
    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise ValueError(f"job fingerprint must be 64 hex digits, got '{fingerprint}'")
    return fingerprint[:JOB_ID_LENGTH]


def temp_prefix(job: str) -> str:
    """The name prefix of every temp file and set-aside shard of job ``job`` (a :func:`job_id`)."""
    if not re.fullmatch(rf"[0-9a-f]{{{JOB_ID_LENGTH}}}", job):
        raise ValueError(f"job id must be {JOB_ID_LENGTH} hex digits, got '{job}'")
    return f"{PLATFORM_PREFIX}{job}."


def foreign_files(directory: Path) -> list[str]:
    """Names in ``directory`` that no classification job writes, sorted (empty when none or no folder).

    The platform writes ``_JOB.json``, ``_SUCCESS.json``, ``part-NNNNN.parquet``, the monitoring
    files ``_part-NNNNN.monitor.safetensors`` and ``_MONITOR.safetensors``, and dot
    files named ``.vtp-<job id>.*`` (temps, set-aside damaged shards); anything else is
    someone else's. Names are as ``os.listdir`` gives them (undecodable bytes as surrogates).
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if not _PLATFORM_NAME.fullmatch(n))


# -- shard claims ------------------------------------------------------------------------
CLAIM_LEASE_S = 60.0


def claim_name(job: str, k: int, generation: int) -> str:
    """File name of generation ``generation`` of job ``job``'s claim on shard ``k``."""
    return f"{temp_prefix(job)}claim-{k:05d}.{generation}"


def claim_files(directory: Path, job: str) -> list[Path]:
    """Every claim file of job ``job`` in ``directory`` (any shard, generation or owner)."""
    mine = re.compile(rf"{re.escape(temp_prefix(job))}claim-[0-9]{{5,}}\.[0-9]+")
    try:
        return [directory / n for n in os.listdir(directory) if mine.fullmatch(n)]
    except FileNotFoundError:
        return []


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (``/proc/<pid>/stat`` field 22); None without ``/proc`` or a live, unreaped process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):  # killed, not yet reaped: dead
        return None
    return fields[19].decode()


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this host is alive (and, given ``start``, is the process that started then)."""
    if pid <= 0:
        return False
    if os.path.isdir("/proc/self"):
        now = _start_time(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class ShardClaims:
    """One run's claims on the shards of job ``job`` in ``directory`` (see the module docstring).

    Use as a context manager: a daemon thread renews the held claims' leases every quarter
    lease, and leaving releases whatever is still held (a run that fails frees its shards
    at once; a killed one leaves them to be taken over).

    Args:
        directory: the output folder.
        job: the job's :func:`job_id`.
        lease_s: how long a claim stays valid without renewal; another host's claim is
            taken over only after it (same-host claims also when their pid is dead). Hosts
            sharing a folder need clocks within a fraction of it.
    """

    def __init__(self, directory: Path, job: str, lease_s: float = CLAIM_LEASE_S) -> None:
        if not lease_s > 0:
            raise ValueError(f"claim lease must be positive, got {lease_s}")
        self.directory, self.job, self.lease_s = Path(directory), job, float(lease_s)
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_start": _start_time(os.getpid()), "lease_s": self.lease_s}
        self.held: dict[int, int] = {}  # shard -> the generation this run holds
        self.taken_over: set[int] = set()  # shards whose dead owner's claim this run took
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ShardClaims:
        self._thread = threading.Thread(target=self._renew, name="shard-claims", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for k in list(self.held):
            self.release(k)

    def _path(self, k: int, generation: int) -> Path:
        return self.directory / claim_name(self.job, k, generation)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            with self._lock:
                held = list(self.held.items())
            for k, g in held:
                try:
                    os.utime(self._path(k, g))
                except FileNotFoundError:
                    pass  # released meanwhile, or swept by a run that finished the job

    def alive(self, path: Path) -> bool | None:
        """Whether the claim at ``path`` has a live owner; None when the file is gone."""
        try:
            mtime = path.stat().st_mtime
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        try:
            lease = float(record.get("lease_s", self.lease_s))
        except (TypeError, ValueError):
            lease = self.lease_s
        if time.time() - mtime > lease:
            return False
        if record.get("host") == self.record["host"] and isinstance(record.get("pid"), int):
            return pid_alive(record["pid"], record.get("pid_start"))
        return True

    def take(self, k: int) -> bool:
        """Claim shard ``k``: True when this run now holds it (new, already held, or taken over from a dead owner);
        False when a live owner holds it."""
        with self._lock:
            if k in self.held:
                return True
        g, dead = 0, False
        while True:
            path = self._path(k, g)
            if not path.exists():
                try:
                    created = write_json_atomic(path, {**self.record, "shard": k, "claimed_at": time.time()},
                                                exclusive=True, temp_prefix="")
                except FileNotFoundError:
                    created = False  # our temp swept by a run that finished the job: look again
                if created:
                    with self._lock:
                        self.held[k] = g
                    if dead:
                        self.taken_over.add(k)
                    return True
                continue  # another run created it first: judge it
            if self._path(k, g + 1).exists():
                g, dead = g + 1, False
                continue
            state = self.alive(path)
            if state is None:
                continue  # released meanwhile: try again
            if state:
                return False
            g, dead = g + 1, True

    def release(self, k: int) -> None:
        """Delete every claim on shard ``k`` (once it is committed, all of them are garbage)."""
        with self._lock:
            g = self.held.pop(k, 0)
        for i in range(g + 1):
            self._path(k, i).unlink(missing_ok=True)
        i = g + 1
        while self._path(k, i).exists():
            self._path(k, i).unlink(missing_ok=True)
            i += 1


# -- commit-once writes -------------------------------------------------------------------
def commit_once(directory: Path, name: str, write: Callable[[IO[bytes]], Any], *, job: str) -> bool:
    """Write ``directory/name`` whole, unless it already exists (:func:`trunk.files.atomic_write`, exclusive).

    Args:
        directory: an existing folder on a POSIX file system.
        name: the final file name.
        write: writes the content to the binary file object it is given.
        job: the writing job's :func:`job_id`; the temp file is named with it
            (``.vtp-<job id>.<name>.<pid>.<rand8>.tmp``), so :func:`job_temps` finds it.

    Returns:
        True when this call created the file; False when it was already there (another
        job, or an earlier run, committed it first), in which case nothing changed.

    Raises:
        OSError: the write, link or fsync failed (read-only folder, disk full, ...); its
            ``filename`` names the file, and no partial file is left under ``name``.
    """
    return atomic_write(Path(directory) / name, write, exclusive=True, temp_prefix=temp_prefix(job))


def set_aside(directory: Path, name: str, *, job: str) -> None:
    """Rename a damaged ``directory/name`` out of the way (kept, named with the job's id) so it can be recommitted."""
    try:
        os.replace(directory / name, directory / f"{temp_prefix(job)}{name}.damaged-{uuid.uuid4().hex[:8]}")
    except FileNotFoundError:
        return  # another job moved it first
    fsync_dir(directory)


def commit_json(directory: Path, name: str, content: Mapping[str, Any], *, job: str) -> bool:
    """:func:`commit_once` of a JSON document."""
    blob = json_bytes(content, indent=2, default=str)
    return commit_once(directory, name, lambda f: f.write(blob), job=job)


def commit_table(directory: Path, name: str, table: pa.Table, *, job: str) -> bool:
    """:func:`commit_once` of a Parquet file."""
    return commit_once(directory, name, lambda f: pq.write_table(table, f), job=job)


def commit_bytes(directory: Path, name: str, blob: bytes, *, job: str) -> bool:
    """:func:`commit_once` of bytes already made (monitoring stats)."""
    return commit_once(directory, name, lambda f: f.write(blob), job=job)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the folder, or a one-line ``ValueError`` naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}); remove the output folder or choose another") from None


def job_temps(directory: Path, job: str) -> list[Path]:
    """The temp files of job ``job`` in ``directory``: only names this job's commits create."""
    mine = re.compile(rf"{re.escape(temp_prefix(job))}.+\.[0-9]+\.[0-9a-f]{{8}}\.tmp", re.DOTALL)
    return [directory / n for n in os.listdir(directory) if mine.fullmatch(n)]


def remove_stale_temps(directory: Path, job: str, older_than_s: float = 3600.0) -> int:
    """Delete job ``job``'s temp files left by its killed runs, sparing recent ones a live run may still be writing.

    Files of other jobs and files the platform did not write are never touched.

    Returns:
        How many were deleted.
    """
    removed = 0
    now = time.time()
    for tmp in job_temps(directory, job):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def shard_errors(path: Path, schema: pa.Schema, rows: int, fingerprint: str | None = None) -> list[str | None] | None:
    """The ``error`` column of a complete, well-formed shard of this job; None when absent, damaged or another job's.

    Args:
        path: the shard file.
        schema: the schema it must have (columns and types; metadata is not compared).
        rows: the number of rows it must have.
        fingerprint: the job's fingerprint; a shard whose provenance names another job
            is not this job's. A shard without provenance (written before shards carried
            it) is judged by its schema and rows alone.
    """
    if not path.is_file():
        return None
    try:
        meta = pq.read_metadata(path)
        if meta.num_rows != rows or not meta.schema.to_arrow_schema().equals(schema):
            return None
        if fingerprint is not None:
            blob = (meta.metadata or {}).get(PROVENANCE_KEY.encode())
            if blob is not None and _fingerprint_of(blob) != fingerprint:
                return None
        return pq.read_table(path, columns=["error"]).column("error").to_pylist()
    except (pa.ArrowException, OSError):
        return None


def _fingerprint_of(blob: bytes) -> str | None:
    """The job fingerprint in a provenance document; None when it has none or is not JSON."""
    try:
        document = json.loads(blob)
        return document["job"]["fingerprint"] if isinstance(document, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None
