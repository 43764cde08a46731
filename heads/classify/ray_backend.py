"""Bulk classification on Ray Data: the same per-batch code, spread over a cluster.

One Ray Data row is one planned batch (:class:`heads.classify.engine.BatchJob`), so each batch
holds exactly the images it holds on the local backend and the rows come out the same,
bit for bit on the same hardware. Two stages:

1. decoding, as Ray tasks on CPUs: :func:`trunk.loader.decode_batch`, the loader
   workers' code;
2. the trunk plus every head, in an actor pool: each actor holds one copy of the model
   (one GPU per actor when the job runs on CUDA) and runs
   :class:`heads.predict.BatchPredictor` and :func:`heads.predict.batch_rows`.

Only paths go out and only predictions come back to the driver. Between the stages a
batch travels as JSON (paths, hashes, errors) plus the raw bytes of its pixel tensor, and
predictions (and, when monitoring, the batch's :class:`heads.predict.MonitorStats`, exact
in JSON) as JSON: nothing a worker sends is unpickled by this code. Paths cross as
:func:`trunk.images.path_text` (valid UTF-8 for Arrow and JSON, even for a file name that
is not) and are turned back with :func:`trunk.images.path_from_text` on the other side. The driver
assembles whole shards and commits them exactly as the local backend does, so output
folder, schema, each shard's provenance metadata and exactly-once guarantees are the
same (a job may even be started on one backend and finished on the other, or run on
both at once: the driver claims each window's shards before submitting it, so a local
run and a Ray run on one folder split the shards).

Ray is imported here only, so the platform runs without it (``pip install
"vision-trunk-platform[ray]"``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from heads.bank import HeadBank
from heads.predict import BatchPredictor, MonitorStats, batch_rows, empty_columns
from trunk.images import path_from_text, path_text
from trunk.loader import DecodedBatch, decode_batch

log = logging.getLogger(__name__)

DEFAULTS = {"address": None, "actors": 1, "gpus_per_actor": None, "decode_cpus": 1, "actor_cpus": 1,
            "decode_memory_mb": 1024, "batches_per_block": 4, "actor_start_timeout_s": 600,
            "window_batches": 4096}


# Pixel dtypes a decoded batch may carry between stages (the eval transform gives float32).
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}


def pack_batch(batch: DecodedBatch) -> dict[str, Any]:
    """A decoded batch as plain data: ``meta`` (JSON) and ``pixels`` (the tensor's raw bytes)."""
    pixels = batch.pixels.contiguous()
    dtype = str(pixels.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"decoded pixels of dtype {dtype} cannot be sent between stages; "
                         f"known: {', '.join(_DTYPES)}")
    meta = {"indices": list(batch.indices), "paths": [path_text(p) for p in batch.paths], "shas": list(batch.shas),
            "errors": list(batch.errors), "shape": list(pixels.shape), "dtype": dtype}
    return {"meta": json.dumps(meta), "pixels": pixels.numpy().tobytes()}


def unpack_batch(meta: str, pixels: bytes) -> DecodedBatch:
    """The inverse of :func:`pack_batch`."""
    m = json.loads(meta)
    dtype = _DTYPES[m["dtype"]]
    shape = [int(n) for n in m["shape"]]
    tensor = (torch.frombuffer(bytearray(pixels), dtype=dtype).reshape(shape) if pixels
              else torch.empty(shape, dtype=dtype))
    return DecodedBatch(indices=m["indices"], paths=[path_from_text(p) for p in m["paths"]], shas=m["shas"],
                        errors=m["errors"], pixels=tensor)


def _decode(row: dict[str, Any], transform, draft_side: int | None) -> dict[str, Any]:
    """Ray Data ``map`` task: one planned batch of paths -> the decoded batch, packed."""
    batch = decode_batch(list(row["indices"]), [path_from_text(p) for p in row["paths"]], transform, draft_side)
    return {"shard": row["shard"], "batch": row["batch"], **pack_batch(batch)}


class _Predict:
    """Ray Data actor: one trunk + bank copy; a packed batch -> output columns as JSON."""

    def __init__(self, trunk, bank: HeadBank, device: str, amp: bool, threads: int, monitor: bool = False) -> None:
        torch.set_num_threads(max(1, int(threads)))
        self.predictor = BatchPredictor(trunk, bank, torch.device(device), amp=amp, monitor=monitor)
        self.names = list(bank.names)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        batch = unpack_batch(row["meta"], row["pixels"])
        columns = empty_columns(self.names)
        predictions, stats = self.predictor.run(batch.pixels, [batch.shas[p] for p in batch.ok])
        batch_rows(batch, predictions, columns)
        columns["path"] = [path_text(p) for p in columns["path"]]
        # JSON keeps every float32 score exactly (repr of its float64 widening round-trips).
        return {"shard": row["shard"], "batch": row["batch"], "columns": json.dumps(columns),
                "stats": stats.to_json() if stats is not None else ""}


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` merged with :data:`DEFAULTS`; a one-line ``ValueError`` for an unknown or bad one."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"field 'ray.{unknown[0]}': unknown; known: {', '.join(DEFAULTS)}")
    merged = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("actors", "decode_cpus", "actor_cpus", "decode_memory_mb", "batches_per_block",
                "actor_start_timeout_s", "window_batches"):
        if float(merged[key]) <= 0:
            raise ValueError(f"field 'ray.{key}': must be positive, got {merged[key]}")
    return merged


def connect_ray(address: str | None) -> bool:
    """Join or start Ray; True when this call started it (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address is None:
            # A private single-machine cluster (address="local" never joins a running one);
            # nothing but this process talks to it, so no auth token file is written.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=str(address), logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        hint = ' (ray:// needs pip install "ray[client]")' if str(address).startswith("ray://") else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"field 'ray.address': cannot connect to Ray at '{address}': {first}{hint}") from None
    return True


def build_dataset(trunk, bank: HeadBank, names: Sequence[str] | None, jobs: Sequence, transform, draft_side: int | None, *,
                  gpus: float, amp: bool, options: Mapping[str, Any], monitor: bool = False):
    """The two-stage Ray Dataset over the planned batches (lazy: nothing runs until iterated).

    Each output row: ``shard``, ``batch``, ``columns`` (the output columns as JSON) and
    ``stats`` (the batch's monitoring stats as JSON; empty without ``monitor``).
    Arguments as for :func:`ray_batches`; ``gpus`` per actor; ``options`` already merged
    with :data:`DEFAULTS`.
    """
    import ray.data

    opts = options
    items = [{"shard": job.shard, "batch": job.batch, "indices": job.indices,
              "paths": [path_text(p) for p in (job.paths if job.paths is not None else [names[i] for i in job.indices])]}
             for job in jobs]
    # A few batches per block: each block costs Ray Data tens of ms per stage.
    n_blocks = -(-len(items) // int(opts["batches_per_block"]))
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    # Decoding reserves memory, the model actors do not: Ray Data fuses a task stage into
    # the next actor stage when their resource requests match, which would decode inside
    # the model actors; different requests keep decoding a CPU stage of its own that
    # scales apart from the model copies.
    ds = ds.map(_decode, fn_kwargs={"transform": transform, "draft_side": draft_side},
                num_cpus=float(opts["decode_cpus"]), memory=float(opts["decode_memory_mb"]) * 2**20)
    # A GPU actor reserves one CPU by default; asking for CPUs too is "experimental" in Ray.
    resources = {"num_gpus": float(gpus)} if gpus else {"num_cpus": float(opts["actor_cpus"])}
    ds = ds.map(_Predict, fn_constructor_kwargs={"trunk": trunk.cpu(), "bank": bank.cpu(),
                                                 "device": "cuda" if gpus else "cpu", "amp": amp,
                                                 "threads": max(1, int(opts["actor_cpus"])),
                                                 "monitor": bool(monitor)},
                compute=ray.data.ActorPoolStrategy(size=int(opts["actors"])), **resources)
    return ds


def _windows(jobs: Iterable, size: int) -> Iterator[list]:
    """The planned batches, ``size`` at a time (the last window shorter)."""
    it = iter(jobs)
    while window := list(itertools.islice(it, size)):
        yield window


def ray_batches(trunk, bank: HeadBank, names: Sequence[str] | None, jobs: Iterable, transform,
                draft_side: int | None, *,
                device: torch.device, amp: bool, options: Mapping[str, Any],
                monitor: bool = False) -> Iterator[tuple[int, int, dict, MonitorStats | None]]:
    """Decode and classify the planned batches on Ray; yield ``(shard, batch, columns, stats)`` as they finish.

    Args:
        trunk: the release's trunk (copied once into each actor).
        bank: the release's heads (likewise).
        names: the job's input paths or URIs; every Ray worker must be able to open them.
            None when the jobs carry their own paths (a streamed plan).
        jobs: :func:`heads.classify.engine.plan_batches` output, or a stream of batches
            carrying their paths (:func:`heads.classify.engine.plan_stream`, or the
            engine's claiming plan), which is read ``window_batches`` at a time: each window
            is one Ray Dataset, so the driver never holds more than a window of paths (the
            actors start again per window), and a plan that claims each shard as it is read
            (:class:`heads.classify.output.ShardClaims`) claims a whole window before it is
            submitted, the next one only once the last is done.
        transform: the trunk's eval transform.
        draft_side: see :func:`trunk.loader.iter_decoded`.
        device: ``cuda`` gives each actor one GPU (unless ``gpus_per_actor`` says
            otherwise); ``cpu`` runs actors on CPUs.
        amp: bf16 autocast + channels_last in the actors.
        options: ``address`` (None: start a private local Ray; ``auto``: join the
            cluster of this machine; ``ray://host:10001``: Ray Client), ``actors`` (model
            copies), ``gpus_per_actor``, ``decode_cpus``, ``actor_cpus``,
            ``decode_memory_mb`` (reserved per decoding task), ``batches_per_block``,
            ``actor_start_timeout_s``, ``window_batches`` (planned batches per Ray Dataset). A Ray already initialised in this process is used
            as is.
        monitor: also compute each batch's monitoring stats in the actors (None otherwise).

    Raises:
        ValueError: one line, for a bad option or an unreachable cluster.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError('backend=ray needs Ray Data: pip install "vision-trunk-platform[ray]"') from None
    opts = check_options(options)
    windows = _windows(jobs, int(opts["window_batches"]))
    first = next(windows, None)
    if first is None:
        return
    gpus = opts["gpus_per_actor"]
    if gpus is None:
        gpus = 1 if device.type == "cuda" else 0
    started = connect_ray(opts["address"])
    try:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = False  # shards are assembled by (shard, batch)
        ctx.raise_original_map_exception = True  # a failing stage raises its own exception type
        # Fail rather than wait forever for actors the cluster cannot place (e.g. GPUs it lacks).
        ctx.wait_for_min_actors_s = int(opts["actor_start_timeout_s"])
        for window in itertools.chain([first], windows):
            ds = build_dataset(trunk, bank, names, window, transform, draft_side, gpus=gpus, amp=amp, options=opts,
                               monitor=monitor)
            for row in ds.iter_rows():
                columns = json.loads(row["columns"])
                columns["path"] = [path_from_text(p) for p in columns["path"]]  # as the local backend gives them
                stats = MonitorStats.from_json(row["stats"]) if row["stats"] else None
                yield int(row["shard"]), int(row["batch"]), columns, stats
    finally:
        if started:
            ray.shutdown()
