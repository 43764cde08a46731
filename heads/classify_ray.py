"""Bulk classification on Ray Data: the same per-batch code, spread over a cluster.

One Ray Data row is one planned batch (:class:`heads.classify.BatchJob`), so each batch
holds exactly the images it holds on the local backend and the rows come out the same,
bit for bit on the same hardware. Two stages:

1. decoding, as Ray tasks on CPUs: :func:`trunk.loader.decode_batch`, the loader
   workers' code;
2. the trunk plus every head, in an actor pool: each actor holds one copy of the model
   (one GPU per actor when the job runs on CUDA) and runs
   :class:`heads.predict.BatchPredictor` and :func:`heads.predict.batch_rows`.

Only paths go out and only predictions come back to the driver; the driver assembles
whole shards and commits them exactly as the local backend does, so output folder,
schema and exactly-once guarantees are the same (a job may even be started on one
backend and finished on the other).

Ray is imported here only, so the platform runs without it (``pip install
"vision-trunk-platform[ray]"``).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from heads.bank import HeadBank
from heads.predict import BatchPredictor, batch_rows, empty_columns
from trunk.loader import decode_batch

log = logging.getLogger(__name__)

DEFAULTS = {"address": None, "actors": 1, "gpus_per_actor": None, "decode_cpus": 1, "actor_cpus": 1}


def _decode(row: dict[str, Any], transform, draft_side: int | None) -> dict[str, Any]:
    """Ray Data ``map`` task: one planned batch of paths -> a pickled :class:`DecodedBatch`."""
    batch = decode_batch(list(row["indices"]), list(row["paths"]), transform, draft_side)
    return {"shard": row["shard"], "batch": row["batch"], "decoded": pickle.dumps(batch, protocol=5)}


class _Predict:
    """Ray Data actor: one trunk + bank copy; a pickled batch -> pickled output columns."""

    def __init__(self, trunk, bank: HeadBank, device: str, amp: bool, threads: int) -> None:
        torch.set_num_threads(max(1, int(threads)))
        self.predictor = BatchPredictor(trunk, bank, torch.device(device), amp=amp)
        self.names = list(bank.names)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        batch = pickle.loads(row["decoded"])
        columns = empty_columns(self.names)
        batch_rows(batch, self.predictor(batch.pixels), columns)
        return {"shard": row["shard"], "batch": row["batch"], "columns": pickle.dumps(columns, protocol=5)}


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"field 'ray.{unknown[0]}': unknown; known: {', '.join(DEFAULTS)}")
    merged = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("actors", "decode_cpus", "actor_cpus"):
        if float(merged[key]) <= 0:
            raise ValueError(f"field 'ray.{key}': must be positive, got {merged[key]}")
    return merged


def _connect(address: str | None) -> bool:
    """Join or start Ray; True when this call started it (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address is None:
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        else:
            ray.init(address=str(address), logging_level=logging.WARNING)
    except ConnectionError as e:
        raise ValueError(f"field 'ray.address': cannot connect to Ray at '{address}': {e}") from None
    return True


def ray_batches(trunk, bank: HeadBank, names: Sequence[str], jobs: Sequence, transform, draft_side: int | None, *,
                device: torch.device, amp: bool, options: Mapping[str, Any]) -> Iterator[tuple[int, int, dict]]:
    """Decode and classify the planned batches on Ray; yield ``(shard, batch, columns)`` as they finish.

    Args:
        trunk: the release's trunk (copied once into each actor).
        bank: the release's heads (likewise).
        names: the job's input paths or URIs; every Ray worker must be able to open them.
        jobs: :func:`heads.classify.plan_batches` output.
        transform: the trunk's eval transform.
        draft_side: see :func:`trunk.loader.iter_decoded`.
        device: ``cuda`` gives each actor one GPU (unless ``gpus_per_actor`` says
            otherwise); ``cpu`` runs actors on CPUs.
        amp: bf16 autocast + channels_last in the actors.
        options: ``address`` (None: start a local Ray; ``auto``; ``ray://host:10001``),
            ``actors`` (model copies), ``gpus_per_actor``, ``decode_cpus``,
            ``actor_cpus``. A Ray already initialised in this process is used as is.

    Raises:
        ValueError: one line, for a bad option or an unreachable cluster.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError('backend=ray needs Ray Data: pip install "vision-trunk-platform[ray]"') from None
    opts = _options(options)
    if not jobs:
        return
    gpus = opts["gpus_per_actor"]
    if gpus is None:
        gpus = 1 if device.type == "cuda" else 0
    started = _connect(opts["address"])
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the job's own bar counts images
        ctx.execution_options.preserve_order = False  # shards are assembled by (shard, batch)
        items = [{"shard": job.shard, "batch": job.batch, "indices": job.indices,
                  "paths": [names[i] for i in job.indices]} for job in jobs]
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 1000))
        # Distinct scheduling strategies keep Ray Data from fusing the two stages into one
        # actor (it fuses task -> actor maps whose remote args match): decoding stays a
        # CPU stage of its own, spread over the cluster, and scales apart from the models.
        ds = ds.map(_decode, fn_kwargs={"transform": transform, "draft_side": draft_side},
                    compute=ray.data.TaskPoolStrategy(), num_cpus=float(opts["decode_cpus"]),
                    scheduling_strategy="SPREAD")
        ds = ds.map(_Predict, fn_constructor_kwargs={"trunk": trunk.cpu(), "bank": bank.cpu(),
                                                     "device": "cuda" if gpus else "cpu", "amp": amp,
                                                     "threads": int(opts["actor_cpus"])},
                    compute=ray.data.ActorPoolStrategy(size=int(opts["actors"])),
                    num_cpus=float(opts["actor_cpus"]), num_gpus=float(gpus), scheduling_strategy="DEFAULT")
        for row in ds.iter_rows():
            yield int(row["shard"]), int(row["batch"]), pickle.loads(row["columns"])
    finally:
        if started:
            ray.shutdown()
