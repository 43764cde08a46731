"""Bulk classification: the trunk once per image, every head of a release, Parquet out.

The output folder and its guarantees are described in :mod:`heads.classify.output`. One row per
input: ``path``, ``sha256`` (null when unreadable), ``error`` (null when decoded), then
per head in sorted name order ``<head>_label`` (string) and ``<head>_score`` (float32,
the softmax probability of the label), both null on error.

Provenance. Every shard carries the release, trunk and head versions, class lists and the
job in its Parquet key-value metadata (:func:`heads.classify.output.shard_provenance` reads
it); the driver writes it, so both backends write the same bytes.

Exactly once. Shard k always holds the same inputs (the input list is cut by position)
and is cut into the same batches, so its rows depend only on the job; it appears whole or
not at all and is committed at most once (:func:`heads.classify.output.commit_once`). A job
killed at any moment and run again skips the shards on disk and computes the rest; a
finished job (``_SUCCESS.json`` with the same fingerprint) writes nothing.

Two runs, one folder. Runs of the same job on one folder (two processes, two hosts on a
shared mount, one per backend) split its shards: each claims a shard just before computing
it (:class:`heads.classify.output.ShardClaims`: an exclusive claim file with a renewed
lease), skips shards a live run holds, and takes over those whose owner died (its pid
gone on this host, or its lease of ``claim_lease_s`` expired). When no shard is left to
claim, a run waits for the shards others hold to be committed, taking over any whose
owner dies meanwhile, so every run returns only once the whole output is in. The local
backend claims each shard as its loader reaches it (a few batches ahead); Ray claims a
window (``window_batches``) before submitting it. Claims save work only: if two runs ever
compute one shard, commit-once still lets exactly one commit it.

Speed. Decoding runs in loader worker processes (JPEGs in Pillow's draft mode), a
few batches ahead of the trunk; pixels are pinned for an overlapped copy when the trunk is
on a GPU; finished shards are encoded and fsynced by a writer thread while the next
batches run. ``backend="ray"`` runs the same per-batch code on Ray Data instead
(:mod:`heads.classify.ray_backend`).

Monitoring (``monitor=True``, the default). The same forward folds every batch into its
:class:`heads.predict.MonitorStats` (per head label counts and score histogram, per tap
feature moments and a sample keyed by the rows' sha256): no second pass over images. A
shard's stats are the merge of its batches' in batch order, committed as
``_part-NNNNN.monitor.safetensors`` *before* the shard, so a committed shard always has its
stats beside it; a reused shard's stats are read back from there (a shard on disk without
them, e.g. from a run with ``monitor=False``, is recomputed, and its committed rows kept).
When every shard is in, ``_MONITOR.safetensors`` (the merge of all shards' stats in shard
order: what a clean run gives, whatever the restarts or the backend) is committed before
``_SUCCESS.json``, whose ``monitor`` field summarises it.

No MLflow here: the registry resolves the release once and passes it in as a plain dict.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from heads.bank import HeadBank
from heads.monitor.stats import MonitorStatsError
from heads.predict import MONITOR_SEED, BatchPredictor, MonitorStats, batch_rows, empty_columns
from heads.classify.output import (
    CLAIM_LEASE_S, JOB_FILE, ShardClaims, claim_files, MONITOR_FILE, SHARD_GLOB, SUCCESS_FILE, JobFingerprint, commit_bytes, commit_json, commit_table, error_reason,
    foreign_files, job_fingerprint, job_id, job_provenance, job_temps, output_schema, read_json, remove_stale_temps,
    set_aside, shard_digest, shard_errors, shard_monitor_name, shard_name, shard_provenance, shard_schema,
)
from trunk.device import resolve_device
from trunk.images import path_text
from trunk.loader import iter_decoded_batches
from trunk.preprocess import decode_side, eval_transform

BACKENDS = ("local", "ray")
# How often a run waiting for shards another live run holds looks at them again.
CLAIM_POLL_S = 0.25
# The _JOB.json fields that decide a shard's rows, named in a refusal when they differ.
JOB_FIELDS = ("release", "heads", "rows_per_shard", "images", "settings")

__all__ = ["classify", "plan_batches", "plan_stream", "shard_chunks", "BatchJob", "BACKENDS", "JOB_FILE", "SUCCESS_FILE", "shard_name",
           "output_schema", "job_fingerprint", "error_reason", "shard_provenance"]


@dataclass(frozen=True)
class BatchJob:
    """Batch ``j`` of shard ``k``: the positions of its inputs in the job's input list (and their paths, when streamed)."""

    shard: int
    batch: int
    indices: list[int]
    paths: list[str] | None = None


def plan_batches(n_inputs: int, rows_per_shard: int, batch_size: int, shards: Sequence[int]) -> list[BatchJob]:
    """The batches of the given shards, none straddling two shards, in input order.

    Args:
        n_inputs: length of the job's input list.
        rows_per_shard: inputs per shard.
        batch_size: inputs per batch; a shard's last batch may be shorter.
        shards: which shards to plan.
    """
    jobs = []
    for k in shards:
        start, stop = k * rows_per_shard, min((k + 1) * rows_per_shard, n_inputs)
        for j, s in enumerate(range(start, stop, batch_size)):
            jobs.append(BatchJob(k, j, list(range(s, min(s + batch_size, stop)))))
    return jobs


def shard_chunks(paths: Iterable[str | Path], rows_per_shard: int) -> Iterator[list[str]]:
    """The input stream cut by position into shards' path lists (shard k: inputs ``k*rows_per_shard`` on).

    Only one shard's paths are held at a time.
    """
    chunk: list[str] = []
    for p in paths:
        chunk.append(str(p))
        if len(chunk) == rows_per_shard:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _survey(paths: Iterable[str | Path], rows_per_shard: int) -> tuple[int, list[bytes]]:
    """One pass over the inputs: their count and each shard's :func:`heads.classify.output.shard_digest`."""
    n, digests = 0, []
    for chunk in shard_chunks(paths, rows_per_shard):
        n += len(chunk)
        digests.append(shard_digest(chunk))
    return n, digests


def _fingerprint(paths: Iterable[str | Path], digests: Sequence[bytes], rows_per_shard: int,
                 hasher: JobFingerprint) -> str:
    """The second pass: the job fingerprint, each shard checked against the first pass's digest."""
    k = -1
    for k, chunk in enumerate(shard_chunks(paths, rows_per_shard)):
        if k >= len(digests) or shard_digest(chunk) != digests[k]:
            raise _changed(k)
        for p in chunk:
            hasher.update(p)
    if k + 1 != len(digests):
        raise _changed(k + 1)
    return hasher.hexdigest()


def _changed(k: int) -> RuntimeError:
    return RuntimeError(f"the inputs of shard {k} changed while the job ran (files added, removed or renamed, "
                        "or the manifest rewritten); nothing of it was written: rerun on a stable input")


def plan_stream(paths: Iterable[str | Path], rows_per_shard: int, batch_size: int, shards: Iterable[int],
                digests: Sequence[bytes], claim: Callable[[int], bool] | None = None) -> Iterator[BatchJob]:
    """:func:`plan_batches` over a stream: the batches of the given shards, each carrying its paths.

    The stream is read shard by shard; each shard's paths are checked against ``digests``
    (:func:`heads.classify.output.shard_digest` per shard, from the job's counting pass)
    before any of its batches is yielded, so a stream that is not the one the job was
    fingerprinted on never gets a row written. ``claim``, when given, is called with each
    wanted shard just before its first batch is yielded (so as late as the consumer reads);
    a shard it returns False for is skipped.

    Raises:
        RuntimeError: a shard's paths differ from its digest, or the stream is longer or
            shorter than the one counted.
    """
    wanted = set(shards)
    n = 0
    for k, chunk in enumerate(shard_chunks(paths, rows_per_shard)):
        if k >= len(digests) or shard_digest(chunk) != digests[k]:
            raise _changed(k)
        if k in wanted and (claim is None or claim(k)):
            first = k * rows_per_shard
            for j, s in enumerate(range(0, len(chunk), batch_size)):
                part = chunk[s:s + batch_size]
                yield BatchJob(k, j, list(range(first + s, first + s + len(part))), part)
        n = k + 1
    if n != len(digests):
        raise _changed(n)


class _Assembler:
    """Collects per-batch columns (and monitoring stats), in any arrival order, into whole shards."""

    def __init__(self, jobs: Sequence[BatchJob] | Mapping[int, int], head_names: Sequence[str]) -> None:
        # Batches per shard: counted from the planned batches, or given ({shard: batches}) for a stream.
        self.expected = Counter(jobs) if isinstance(jobs, Mapping) else Counter(job.shard for job in jobs)
        self.parts: dict[int, dict[int, dict[str, list]]] = {}
        self.stats: dict[int, dict[int, MonitorStats | None]] = {}
        self.head_names = head_names

    def add(self, shard: int, batch: int, columns: dict[str, list],
            stats: MonitorStats | None = None) -> tuple[dict[str, list], MonitorStats | None] | None:
        """Store one batch; return the shard's columns and stats when it is complete."""
        parts = self.parts.setdefault(shard, {})
        if batch in parts:
            raise RuntimeError(f"shard {shard} batch {batch} arrived twice")
        parts[batch] = columns
        self.stats.setdefault(shard, {})[batch] = stats
        if len(parts) < self.expected[shard]:
            return None
        whole = empty_columns(self.head_names)
        for j in sorted(parts):
            for key, values in parts[j].items():
                whole[key] += values
        batch_stats = self.stats.pop(shard)
        # Batch order, whatever the arrival order: the shard's floats are the same on every backend.
        ordered = [batch_stats[j] for j in sorted(batch_stats)]
        merged = MonitorStats.merge_all(ordered) if all(st is not None for st in ordered) else None
        del self.parts[shard]
        return whole, merged


def _local_batches(trunk, bank: HeadBank, jobs: Iterable[BatchJob], transform, draft_side, device: torch.device,
                   num_workers: int, amp: bool | None,
                   monitor: bool = False) -> Iterator[tuple[int, int, dict, MonitorStats | None]]:
    """Decode and classify planned batches that carry their paths, in this process; read lazily, a few batches ahead."""
    predictor = BatchPredictor(trunk, bank, device, amp=amp, monitor=monitor)
    sent: deque[BatchJob] = deque()

    def feed() -> Iterator[tuple[list[int], list[str]]]:
        for job in jobs:
            sent.append(job)
            yield job.indices, job.paths

    decoded = iter_decoded_batches(feed(), transform, num_workers=num_workers, draft_side=draft_side,
                                   pin_memory=device.type == "cuda")
    pairs = ((sent.popleft(), batch) for batch in decoded)  # batches come back in the order sent
    for job, batch in pairs:
        columns = empty_columns(bank.names)
        predictions, stats = predictor.run(batch.pixels, [batch.shas[p] for p in batch.ok])
        batch_rows(batch, predictions, columns)
        yield job.shard, job.batch, columns, stats


def _reasons(errors: Sequence[str | None]) -> Counter:
    """A shard's rows by error reason (None: decoded), all a job summary needs of its ``error`` column."""
    return Counter(None if e is None else error_reason(e) for e in errors)


def _shard_stats(out: Path, k: int) -> MonitorStats | None:
    """Shard ``k``'s committed monitoring stats; None when absent or unreadable."""
    path = out / shard_monitor_name(k)
    if not path.is_file():
        return None
    try:
        return MonitorStats.load(path)
    except MonitorStatsError:
        return None


def _commit_shard(out: Path, k: int, table: pa.Table, stats_blob: bytes | None, job: str) -> bool:
    # Stats first: a committed shard always has its stats beside it (a kill in between
    # leaves stats without a shard, which the rerun recomputes and recommits as is).
    if stats_blob is not None:
        commit_bytes(out, shard_monitor_name(k), stats_blob, job=job)
    return commit_table(out, shard_name(k), table, job=job)


def monitor_summary(stats: MonitorStats, low_confidence_below: float = 0.5) -> dict[str, Any]:
    """The small JSON form of a job's stats for ``_SUCCESS.json`` (the full stats are in ``_MONITOR.safetensors``)."""
    return {
        "file": MONITOR_FILE,
        "sample_seed": MONITOR_SEED,
        "low_confidence_below": low_confidence_below,
        "heads": {name: {"predictions": p.count,
                         "label_counts": dict(zip(p.classes, p.label_counts.tolist())),
                         "low_confidence_share": p.low_confidence_share(low_confidence_below)}
                  for name, p in sorted(stats.predictions.items())},
        "taps": {tap: {"rows": f.count, "dim": f.dim, "sample_rows": int(f.sample_keys.numel())}
                 for tap, f in sorted(stats.features.items())},
    }


def _refusal(path: Path, on_disk: Mapping[str, Any], ours: Mapping[str, Any]) -> ValueError:
    """A one-line refusal naming the file and the first field that differs."""
    differing = [f for f in JOB_FIELDS if json.dumps(on_disk.get(f), sort_keys=True, default=str)
                 != json.dumps(ours.get(f), sort_keys=True, default=str)]
    what = f"field '{differing[0]}' differs" if differing else "the input list differs"
    if differing == ["settings"]:
        what = f"field 'settings' is {on_disk.get('settings')} there, {ours.get('settings')} here"
    return ValueError(f"{path}: holds another job's output ({what}); use a new output folder")


def classify(
    trunk,
    bank: HeadBank,
    paths: Iterable[str | Path],
    output: str | Path,
    *,
    release: Mapping[str, Any],
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    rows_per_shard: int = 10000,
    progress: bool = True,
    draft: bool = True,
    amp: bool | None = None,
    backend: str = "local",
    ray_options: Mapping[str, Any] | None = None,
    allow_foreign_files: bool = False,
    monitor: bool = True,
    claim_lease_s: float = CLAIM_LEASE_S,
) -> dict[str, Any]:
    """Classify images with every head of a release into a resumable Parquet folder.

    Args:
        trunk: a :class:`trunk.model.Trunk`; run once per batch for ``bank.taps`` only.
        bank: the release's heads.
        paths: image files or fsspec URIs, in the order their rows are written: a list, or
            a re-iterable stream giving the same paths on every ``iter()``
            (:class:`trunk.images.InputStream` of a folder or manifest), which is never held
            as a list: one pass counts it, one fingerprints it, and the shards are planned
            from a third, each shard checked against the first before it is computed; bad
            files become rows with an ``error``, never a failed job. A name that is not
            valid UTF-8 (``os.fsdecode``'s surrogates) is read as is; its ``path`` cell
            is :func:`trunk.images.path_text` of it.
        output: the output folder (created if missing), on a POSIX file system. It must
            be empty or hold this same job: a folder holding another job's output is
            refused, and so is one holding files the platform does not write.
        release: what is being run, as the registry resolved it (name, version, trunk
            version, trunk_id, heads ``{name: version}``); copied into ``_JOB.json``,
            ``_SUCCESS.json`` and every shard's provenance. When it has a ``trunk_id``, it
            must be the trunk's.
        batch_size: images per trunk forward.
        num_workers: decoding processes (0: decode in this process). Ray ignores it.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` or a ``torch.device``.
        rows_per_shard: inputs per Parquet shard.
        progress: show a bar with images/s and ETA.
        draft: decode JPEGs in Pillow's draft mode, no smaller than the trunk needs.
        amp: bf16 autocast + channels_last; None: on CUDA only.
        backend: ``local`` (this process plus loader workers) or ``ray`` (Ray Data).
        ray_options: for ``backend="ray"``, see :func:`heads.classify.ray_backend.ray_batches`.
        allow_foreign_files: run in a folder that also holds files the platform did not
            write; they are left untouched either way (the job removes only its own temps).
        monitor: stream monitoring stats (see the module docstring); False for the bare job
            (the cost is measured against it by ``tools.bench``'s ``monitor`` contender).
        claim_lease_s: how long this run's shard claims stay valid unrenewed (renewed every
            quarter of it while the run lives); another run on this host takes over a dead
            run's claims at once, one on another host after this lease.

    Returns:
        This call's job summary, which it commits as ``_SUCCESS.json``: ``release``,
        ``fingerprint``, ``counts`` (``images``, ``ok``, ``errors``, ``shards``),
        ``errors_by_reason``, ``heads``, ``schema`` (column names), ``settings``, ``monitor``
        (:func:`monitor_summary` of ``_MONITOR.safetensors``; None with ``monitor=False``),
        and this call's own work: ``backend``, ``images_per_s``, ``seconds``,
        ``shards_reused`` (on disk when it started), ``shards_written`` (committed by it),
        ``shards_by_others`` (committed by another run of the job while it ran; these three
        add up to ``counts.shards``), ``shards_computed`` (assembled by it: those it wrote,
        plus any whose commit another run won) and ``shards_taken_over`` (claims of dead
        runs it took). When a concurrent run committed ``_SUCCESS.json`` first, the file
        holds that run's summary, equal to this one but for the work fields. A call that
        finds the job finished returns ``_SUCCESS.json`` as it is.

    Raises:
        ValueError: one line, for bad arguments, a release for another trunk, or a
            folder holding another job's output or (without ``allow_foreign_files``)
            files the platform did not write.
        OSError: the folder cannot be written (read-only, disk full, ...), with its
            ``filename`` set; rerun the same job once fixed: it resumes exactly.
    """
    start = time.perf_counter()
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not claim_lease_s > 0:
        raise ValueError(f"claim_lease_s must be positive, got {claim_lease_s}")
    if backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' is not one of: {', '.join(BACKENDS)}")
    if backend == "ray":
        from heads.classify.ray_backend import check_options

        check_options(ray_options or {})  # before anything is written
    trunk_id = release.get("trunk_id")
    if trunk_id and trunk_id != trunk.trunk_id:
        raise ValueError(f"release field 'trunk_id' is {trunk_id} but the trunk given is {trunk.trunk_id}")
    for tap in bank.taps:
        trunk.tap(tap)  # raises a one-line TrunkError naming the valid taps

    if iter(paths) is paths:
        raise ValueError("paths: a one-shot iterator cannot be resumed; give a list or a re-iterable stream "
                         "(trunk.images.InputStream)")
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    amp = device.type == "cuda" if amp is None else bool(amp)
    # A list is used as is; a stream is only ever read shard by shard.
    names = [str(p) for p in paths] if isinstance(paths, Sequence) else None
    stream = names if names is not None else paths
    # First pass: the count (hashed first in the fingerprint) and one digest per shard.
    n_images, digests = _survey(stream, rows_per_shard)
    release = json.loads(json.dumps(dict(release), default=str))  # a plain, JSON-safe copy
    heads = sorted(bank.names)
    schema = output_schema(heads)
    draft_side = decode_side(trunk.data_config) if draft else None
    # What changes a row beyond the inputs and the release: batch composition, decoding, precision.
    settings = {"batch_size": batch_size, "draft": bool(draft), "precision": "bf16" if amp else "fp32"}
    if bank.weight_dtype is not None:  # reduced-precision head weights change the scores: part of the job
        settings["head_weights"] = str(bank.weight_dtype).removeprefix("torch.")  # bfloat16, float16, int8
    if names is not None:
        fingerprint = job_fingerprint(names, release, rows_per_shard, heads, settings)
    else:
        fingerprint = _fingerprint(stream, digests, rows_per_shard,
                                   JobFingerprint(release, rows_per_shard, heads, settings, images=n_images))
    # Every shard's Parquet metadata: where its rows came from, the same on every backend and run.
    provenance = job_provenance(release, trunk_id=trunk.trunk_id, classes=bank.classes, fingerprint=fingerprint,
                                rows_per_shard=rows_per_shard, images=n_images, settings=settings)
    job = {"fingerprint": fingerprint, "release": release, "heads": heads, "rows_per_shard": rows_per_shard,
           "images": n_images, "settings": settings, "schema": schema.names}
    out = Path(output)
    job_key = job_id(fingerprint)  # names this job's temp files: the only ones it ever removes
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output is not a folder")
    foreign = foreign_files(out)
    if foreign and not allow_foreign_files:
        raise ValueError(f"{out}: holds '{path_text(foreign[0])}', which the platform did not write; use an empty "
                         "output folder, or allow_foreign_files=true to leave such files alone")

    success_path, job_path = out / SUCCESS_FILE, out / JOB_FILE
    if success_path.is_file():
        done = read_json(success_path)
        if done.get("fingerprint") != fingerprint:
            raise _refusal(success_path, done, job)
        return done  # finished before: write nothing
    if not job_path.is_file() and out.is_dir() and any(out.glob(SHARD_GLOB)):
        raise ValueError(f"{out}: holds Parquet shards but no {JOB_FILE}; use a new output folder")
    n_shards = math.ceil(n_images / rows_per_shard)
    job["shards"] = n_shards
    out.mkdir(parents=True, exist_ok=True)
    if not commit_json(out, JOB_FILE, job, job=job_key):  # another run wrote it: it must be this same job
        on_disk = read_json(job_path)
        if on_disk.get("fingerprint") != fingerprint:
            raise _refusal(job_path, on_disk, job)
    remove_stale_temps(out, job_key)

    def rows_of(k: int) -> int:
        return min(rows_per_shard, n_images - k * rows_per_shard)

    def on_disk(k: int) -> Counter | None:
        """Shard ``k``'s rows by error reason when it is committed (with its stats, when monitoring); else None."""
        existing = shard_errors(out / shard_name(k), schema, rows_of(k), fingerprint)
        if existing is None or (monitor and not (out / shard_monitor_name(k)).is_file()):
            return None
        return _reasons(existing)

    # Which shards are already on disk, whole and well-formed: per shard, its rows' error reasons.
    errors_of: dict[int, Counter] = {}
    for k in range(n_shards):
        if monitor and (out / shard_monitor_name(k)).exists() and _shard_stats(out, k) is None:
            set_aside(out, shard_monitor_name(k), job=job_key)  # damaged: recomputed with its shard
        existing = shard_errors(out / shard_name(k), schema, rows_of(k), fingerprint)
        if existing is not None:
            if not monitor or (out / shard_monitor_name(k)).is_file():
                errors_of[k] = _reasons(existing)
            # else: rows without stats (a run with monitor off): recompute them; the shard on disk is kept
        elif (out / shard_name(k)).exists():
            # Damaged (not by us: commits are whole) or another job's: recompute it.
            set_aside(out, shard_name(k), job=job_key)
    reused = len(errors_of)
    pending = [k for k in range(n_shards) if k not in errors_of]
    expected = {k: math.ceil(rows_of(k) / batch_size) for k in pending}  # batches per shard
    transform = eval_transform(trunk.data_config)

    by_others: set[int] = set()  # shards another run of this job committed while this one ran
    held: list[int] = []  # shards of the current round a live run of this job holds
    computed = written = processed = 0

    def by_another(k: int, done: Counter) -> None:
        errors_of[k] = done
        by_others.add(k)
        claims.release(k)  # committed: every claim on it is garbage
        bar.update(rows_of(k))

    def take(k: int) -> bool:
        """Claim shard ``k`` just before its first batch is planned; False when it is done or a live run holds it."""
        done = on_disk(k)
        if done is None:
            if not claims.take(k):
                held.append(k)
                return False
            done = on_disk(k)  # committed between the look and the claim?
            if done is None:
                return True
        by_another(k, done)
        return False

    def plan(shards: Sequence[int]) -> Iterator[BatchJob]:
        """The batches of the shards this run claims, lazily: each shard is claimed as the backend reaches it."""
        if names is None:  # a stream, read shard by shard, each checked against the first pass
            yield from plan_stream(stream, rows_per_shard, batch_size, shards, digests, claim=take)
            return
        for k in shards:
            if take(k):
                for b in plan_batches(n_images, rows_per_shard, batch_size, [k]):
                    yield BatchJob(b.shard, b.batch, b.indices, [names[i] for i in b.indices])

    def run_batches(shards: Sequence[int]) -> Iterator[tuple[int, int, dict, MonitorStats | None]]:
        if backend == "ray":
            from heads.classify.ray_backend import ray_batches

            return ray_batches(trunk, bank, None, plan(shards), transform, draft_side, device=device, amp=amp,
                               options=ray_options or {}, monitor=monitor)
        return _local_batches(trunk, bank, plan(shards), transform, draft_side, device, num_workers, amp,
                              monitor=monitor)

    def commit(k: int, table: pa.Table, blob: bytes | None) -> bool:
        try:
            return _commit_shard(out, k, table, blob, job_key)
        finally:
            claims.release(k)

    def wait_for_others(shards: Sequence[int]) -> list[int]:
        """Wait until each shard a live run held is committed, or its owner died and this run took it over.

        Returns the shards to compute next (those taken over, and those still held elsewhere,
        which the next round looks at again); empty when all are committed.
        """
        waiting = list(shards)
        while waiting:
            still, mine = [], []
            for k in waiting:
                done = on_disk(k)
                if done is not None:
                    by_another(k, done)
                elif claims.take(k):
                    mine.append(k)
                else:
                    still.append(k)
            if mine:
                return sorted(mine + still)
            waiting = still
            if waiting:
                time.sleep(CLAIM_POLL_S)
        return []

    assembler = _Assembler(expected, heads)
    done_rows = sum(v.total() for v in errors_of.values())
    with ShardClaims(out, job_key, claim_lease_s) as claims, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer, \
            tqdm(total=n_images, initial=done_rows, unit="img", desc="classify", disable=not progress,
                 dynamic_ncols=True) as bar:
        todo = pending
        while todo:  # one round per pass over the shards left; a second only when a run holding some died
            held.clear()
            commits: list[tuple[int, Future]] = []
            for k, j, columns, batch_stats in run_batches(todo):
                n = len(columns["path"])
                processed += n
                bar.update(n)
                assembled = assembler.add(k, j, columns, batch_stats)
                if assembled is None:
                    continue
                computed += 1
                whole, shard_stats = assembled
                errors_of[k] = _reasons(whole["error"])
                # Parquet strings are UTF-8: a file name that is not gets its lossless escaped form.
                whole["path"] = [path_text(p) for p in whole["path"]]
                table = pa.Table.from_pydict(whole, schema=shard_schema(schema, provenance, k))
                blob = shard_stats.to_bytes({"shard": str(k), "fingerprint": fingerprint}) if monitor else None
                commits.append((k, writer.submit(commit, k, table, blob)))
                # Surface a failed write now rather than after the whole input.
                for _, future in commits:
                    if future.done():
                        future.result()
            for k, future in commits:
                if future.result():
                    written += 1
                else:  # another run committed it first; its rows are the same by construction
                    by_others.add(k)
                    theirs = shard_errors(out / shard_name(k), schema, rows_of(k), fingerprint)
                    if theirs is not None:
                        errors_of[k] = _reasons(theirs)
            # What live runs of this job hold: wait for their commits, or take over from one that died.
            todo = wait_for_others(sorted(held))
    missing = [k for k in range(n_shards) if k not in errors_of]
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:5]} were not produced; rerun the same job to finish them")

    monitored = None
    if monitor:
        stats = MonitorStats.empty(bank)
        for k in range(n_shards):  # shard order: the same floats as a clean run
            part = _shard_stats(out, k)
            if part is None:
                raise RuntimeError(f"{out}: {shard_monitor_name(k)} is missing or damaged; rerun the same job")
            stats = stats.merge(part)
        commit_bytes(out, MONITOR_FILE, stats.to_bytes({"fingerprint": fingerprint,
                                                        "release": json.dumps(release, sort_keys=True)}),
                     job=job_key)
        monitored = monitor_summary(stats)

    seconds = time.perf_counter() - start
    reasons: Counter = Counter()
    for k in range(n_shards):
        reasons.update(errors_of[k])
    del reasons[None]  # the rows that decoded
    n_errors = sum(reasons.values())
    summary = {
        "release": release,
        "fingerprint": fingerprint,
        "counts": {"images": n_images, "ok": n_images - n_errors, "errors": n_errors, "shards": n_shards},
        "errors_by_reason": dict(sorted(reasons.items())),
        "images_per_s": round(processed / seconds, 3) if seconds > 0 else 0.0,
        "seconds": round(seconds, 3),
        "heads": heads,
        "schema": schema.names,
        "settings": settings,
        "backend": backend,
        "shards_reused": reused,
        "shards_written": written,
        "shards_computed": computed,
        "shards_taken_over": len(claims.taken_over),
        "shards_by_others": len(by_others),
        "monitor": monitored,
    }
    if commit_json(out, SUCCESS_FILE, summary, job=job_key):
        for tmp in job_temps(out, job_key):
            tmp.unlink(missing_ok=True)  # every shard is committed: this job's leftovers of killed runs are garbage
    # else a concurrent run of this job finished first: its _SUCCESS.json differs from ours in the work fields only
    for claim in claim_files(out, job_key):
        claim.unlink(missing_ok=True)  # every shard is committed: claims (of killed runs too) are garbage
    return summary
