"""Bulk classification: the trunk once per image, every head of a release, Parquet out.

The output folder is a contract (DESIGN.md, "Bulk classification output")::

    _JOB.json            written first: the job's fingerprint, release, heads, shard size
    part-00000.parquet   rows 0 .. rows_per_shard-1 of the input list, in input order
    part-00001.parquet   ...
    _SUCCESS.json        written last: release, counts, errors by reason, throughput

One row per input: ``path``, ``sha256`` (null when unreadable), ``error`` (null when
decoded), then per head in sorted name order ``<head>_label`` (string) and
``<head>_score`` (float32, the softmax probability of the label), both null on error.

Restarts are safe because shard k always holds the same inputs (the input list is cut
by position) and only ever appears whole: it is written to a dot-prefixed temp file,
fsynced, renamed into place and the folder fsynced. Each shard is decoded and batched on
its own, so a resumed shard sees exactly the batches a clean run gives it, and a killed
job rerun ends with the rows a clean run writes. A finished job (``_SUCCESS.json`` with
the same fingerprint) is not touched again. One job writes to a folder at a time.

No MLflow here: the registry resolves the release and passes it in as a plain dict.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from heads.bank import HeadBank
from trunk.cache import fsync_dir
from trunk.device import resolve_device
from trunk.loader import iter_decoded
from trunk.preprocess import eval_transform

JOB_FILE = "_JOB.json"
SUCCESS_FILE = "_SUCCESS.json"
SHARD_GLOB = "part-*.parquet"


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
                    head_names: Sequence[str]) -> str:
    """sha256 naming one job: its inputs in order, its release, shard size and heads.

    Args:
        paths: the input paths as strings, in order.
        release: the release dict (name, version, trunk, heads, ...).
        rows_per_shard: rows per Parquet shard.
        head_names: the bank's head names.
    """
    h = hashlib.sha256()
    header = {"release": release, "rows_per_shard": int(rows_per_shard),
              "heads": sorted(head_names), "images": len(paths)}
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    # NUL-separated: the one byte a file path cannot contain, so the list is unambiguous.
    for p in paths:
        h.update(b"\0")
        h.update(p.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def error_reason(error: str) -> str:
    """The stable reason phrase of an ``error`` cell (``"not an image: a.jpg"`` -> ``"not an image"``)."""
    return error.split(": ", 1)[0]


# -- durable writes ---------------------------------------------------------------------
def _publish(directory: Path, name: str, write) -> None:
    """Write ``directory/name`` through a dot-prefixed temp file so it appears whole or not at all."""
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(directory)


def _write_json(directory: Path, name: str, content: Mapping[str, Any]) -> None:
    blob = (json.dumps(content, indent=2, default=str) + "\n").encode()
    _publish(directory, name, lambda f: f.write(blob))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}); remove the output folder or choose another") from None


# -- shards -------------------------------------------------------------------------------
def _existing_shard_errors(path: Path, schema: pa.Schema, rows: int) -> list[str | None] | None:
    """The ``error`` column of a complete shard, or None when it must be (re)written."""
    if not path.is_file():
        return None
    try:
        meta = pq.read_metadata(path)
        if meta.num_rows != rows or not meta.schema.to_arrow_schema().equals(schema):
            return None
        return pq.read_table(path, columns=["error"]).column("error").to_pylist()
    except (pa.ArrowException, OSError):
        return None  # unreadable: a clean rewrite is the only way to its true content


def _classify_shard(trunk, bank: HeadBank, paths: list[str], transform, device: torch.device,
                    batch_size: int, num_workers: int, bar) -> dict[str, list]:
    columns: dict[str, list] = {"path": [], "sha256": [], "error": []}
    for name in bank.names:
        columns[f"{name}_label"] = []
        columns[f"{name}_score"] = []
    for batch in iter_decoded(paths, transform, batch_size=batch_size, num_workers=num_workers):
        ok = batch.ok
        predictions: dict[str, tuple[list[str], torch.Tensor]] = {}
        if ok:
            with torch.inference_mode():
                features = trunk(batch.pixels.to(device, non_blocking=True), bank.taps)
                predictions = bank.predict(features)
        row_of = {pos: row for row, pos in enumerate(ok)}
        columns["path"] += batch.paths
        columns["sha256"] += batch.shas
        columns["error"] += batch.errors
        for name in bank.names:
            labels, scores = predictions.get(name, ([], torch.empty(0)))
            score_list = scores.tolist()
            for pos in range(len(batch)):
                row = row_of.get(pos)
                columns[f"{name}_label"].append(None if row is None else labels[row])
                columns[f"{name}_score"].append(None if row is None else score_list[row])
        bar.update(len(batch))
    return columns


def classify(
    trunk,
    bank: HeadBank,
    paths: Sequence[str | Path],
    output: str | Path,
    *,
    release: Mapping[str, Any],
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    rows_per_shard: int = 10000,
    progress: bool = True,
) -> dict[str, Any]:
    """Classify images with every head of a release into a resumable Parquet folder.

    Args:
        trunk: a :class:`trunk.model.Trunk`; it is moved to ``device`` and run once per
            batch for ``bank.taps`` only.
        bank: the release's heads.
        paths: image files, in the order their rows are written; bad files become rows
            with an ``error``, never a failed job.
        output: the output folder (created if missing). It must be empty or hold this
            same job: a folder holding another job's output is refused.
        release: what is being run, as the registry resolved it (name, version, trunk
            version, trunk_id, heads ``{name: version}``); copied into ``_SUCCESS.json``.
            When it has a ``trunk_id``, it must be the trunk's.
        batch_size: images per trunk forward.
        num_workers: decoding processes (0: decode in this process).
        device: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` or a ``torch.device``.
        rows_per_shard: inputs per Parquet shard.
        progress: show a tqdm bar counting images.

    Returns:
        The ``_SUCCESS.json`` content: ``release``, ``fingerprint``, ``counts``
        (``images``, ``ok``, ``errors``, ``shards``), ``errors_by_reason``,
        ``images_per_s``, ``seconds`` (both for the work this call did), ``heads``,
        ``schema`` (column names) and ``shards_reused``.

    Raises:
        ValueError: one line, for bad arguments, a release for another trunk, or a
            folder holding another job's output.
    """
    start = time.perf_counter()
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    trunk_id = release.get("trunk_id")
    if trunk_id and trunk_id != trunk.trunk_id:
        raise ValueError(f"release field 'trunk_id' is {trunk_id} but the trunk given is {trunk.trunk_id}")
    for tap in bank.taps:
        trunk.tap(tap)  # raises a one-line TrunkError naming the valid taps

    names = [str(p) for p in paths]
    release = json.loads(json.dumps(dict(release), default=str))  # a plain, JSON-safe copy
    heads = list(bank.names)
    schema = output_schema(heads)
    fingerprint = job_fingerprint(names, release, rows_per_shard, heads)
    out = Path(output)
    refusal = f"{out}: holds another job's output (different inputs, release, heads or shard size); " \
              f"use a new output folder"

    success_path, job_path = out / SUCCESS_FILE, out / JOB_FILE
    if success_path.is_file():
        done = _read_json(success_path)
        if done.get("fingerprint") != fingerprint:
            raise ValueError(refusal)
        return done  # finished before: write nothing
    if job_path.is_file():
        if _read_json(job_path).get("fingerprint") != fingerprint:
            raise ValueError(refusal)
    elif out.is_dir() and any(out.glob(SHARD_GLOB)):
        raise ValueError(f"{out}: holds Parquet shards but no {JOB_FILE}; use a new output folder")

    n_shards = math.ceil(len(names) / rows_per_shard)
    out.mkdir(parents=True, exist_ok=True)
    if not job_path.is_file():
        _write_json(out, JOB_FILE, {"fingerprint": fingerprint, "release": release, "heads": heads,
                                    "rows_per_shard": rows_per_shard, "images": len(names),
                                    "shards": n_shards, "schema": schema.names})
    for stale in out.glob(".part-*.tmp"):
        stale.unlink()  # left by a killed run; never visible as a shard

    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    trunk.to(device).eval()
    bank.to(device).eval()
    transform = eval_transform(trunk.data_config)

    errors: list[str | None] = []
    reused = processed = 0
    with tqdm(total=len(names), unit="img", desc="classify", disable=not progress) as bar:
        for k in range(n_shards):
            shard_paths = names[k * rows_per_shard:(k + 1) * rows_per_shard]
            shard_path = out / shard_name(k)
            existing = _existing_shard_errors(shard_path, schema, len(shard_paths))
            if existing is not None:
                errors += existing
                reused += 1
                bar.update(len(shard_paths))
                continue
            columns = _classify_shard(trunk, bank, shard_paths, transform, device, batch_size, num_workers, bar)
            table = pa.Table.from_pydict(columns, schema=schema)
            _publish(out, shard_name(k), lambda f, t=table: pq.write_table(t, f))
            errors += columns["error"]
            processed += len(shard_paths)

    seconds = time.perf_counter() - start
    reasons = Counter(error_reason(e) for e in errors if e is not None)
    n_errors = sum(reasons.values())
    summary = {
        "release": release,
        "fingerprint": fingerprint,
        "counts": {"images": len(names), "ok": len(names) - n_errors, "errors": n_errors, "shards": n_shards},
        "errors_by_reason": dict(sorted(reasons.items())),
        "images_per_s": round(processed / seconds, 3) if seconds > 0 else 0.0,
        "seconds": round(seconds, 3),
        "heads": heads,
        "schema": schema.names,
        "shards_reused": reused,
    }
    _write_json(out, SUCCESS_FILE, summary)
    return summary
