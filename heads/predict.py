"""One batch through the trunk and every head: the per-batch work of bulk classification.

Both engines (the local loader and Ray Data's actor pool) call the same two pieces:
:class:`BatchPredictor` turns a pixel batch into labels and scores, and :func:`batch_rows`
lines those up with the batch's inputs, good and bad, into output columns.

On CUDA the trunk runs in channels_last memory format under bf16 autocast (heads too:
they are a fraction of the work and autocast keeps their matmuls in bf16); scores come
back as float32. On the CPU everything stays float32, bit for bit what evaluation saw.

Monitoring (``monitor=True``): the same forward also folds each batch into a
:class:`MonitorStats`: per head a :class:`~heads.monitor.stats.PredictionStats` (label
counts, top-score histogram) and per tap the heads read a
:class:`~heads.monitor.stats.FeatureStats` (moments and a bottom-k sample keyed by the
rows' content hashes, :func:`~heads.monitor.stats.row_keys`), on the tensors already on
the device: no second pass. Keys from content hashes make a batch's stats depend only on
its rows, so the stats of a shard, merged batch by batch in batch order, are the same on
every backend and in every restart.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from heads.bank import HeadBank
from heads.monitor.stats import (
    FeatureStats,
    PredictionStats,
    load_run_stats,
    row_keys,
    run_stats_bytes,
)
from trunk.loader import DecodedBatch

Predictions = dict[str, tuple[list[str], list[float]]]
# Sampling seed of every bulk run's feature sample; a head reference built with
# ``row_keys(shas, MONITOR_SEED)`` samples its training rows the same way.
MONITOR_SEED = 0


class MonitorStats:
    """A set of rows' monitoring stats: ``predictions`` per head and ``features`` per tap; mergeable.

    Args:
        predictions: ``{head: PredictionStats}``.
        features: ``{tap: FeatureStats}``.
    """

    def __init__(self, predictions: Mapping[str, PredictionStats], features: Mapping[str, FeatureStats]) -> None:
        self.predictions = dict(predictions)
        self.features = dict(features)

    @classmethod
    def empty(cls, bank: HeadBank, seed: int = MONITOR_SEED) -> MonitorStats:
        """No rows yet, for every head and tap of ``bank``."""
        return cls({n: PredictionStats(bank.classes[n]) for n in bank.names},
                   {t: FeatureStats(seed=seed) for t in bank.taps})

    @property
    def count(self) -> int:
        """Rows folded in (the first head's prediction count)."""
        return next(iter(self.predictions.values())).count if self.predictions else 0

    def merge(self, other: MonitorStats) -> MonitorStats:
        """Both sets of rows (same heads and taps required)."""
        if set(other.predictions) != set(self.predictions) or set(other.features) != set(self.features):
            raise ValueError(f"cannot merge monitoring stats of heads {sorted(other.predictions)} / taps "
                             f"{sorted(other.features)} into {sorted(self.predictions)} / {sorted(self.features)}")
        return MonitorStats({n: s.merge(other.predictions[n]) for n, s in self.predictions.items()},
                            {t: s.merge(other.features[t]) for t, s in self.features.items()})

    @classmethod
    def merge_all(cls, parts: Sequence[MonitorStats]) -> MonitorStats:
        """Left-to-right merge of ``parts`` (at least one); the order is the caller's, for reproducible floats."""
        out = parts[0]
        for part in parts[1:]:
            out = out.merge(part)
        return out

    def to_json(self) -> str:
        """Plain JSON, exact: float64 moments and float32 samples survive ``repr`` round trips (no pickles)."""
        feats = {}
        for tap, stats in self.features.items():
            tensors, meta = stats.to_tensors()
            feats[tap] = {"meta": meta, **{k: v.tolist() for k, v in tensors.items()}}
        return json.dumps({"predictions": {n: s.to_dict() for n, s in self.predictions.items()}, "features": feats})

    @classmethod
    def from_json(cls, text: str) -> MonitorStats:
        """Inverse of :meth:`to_json`."""
        doc = json.loads(text)
        feats = {}
        for tap, f in doc["features"].items():
            dim = f["meta"]["dim"] or 0
            tensors = {"mean": torch.tensor(f["mean"], dtype=torch.float64),
                       "m2": torch.tensor(f["m2"], dtype=torch.float64),
                       "sample": torch.tensor(f["sample"], dtype=torch.float32).reshape(len(f["sample_keys"]), dim),
                       "sample_keys": torch.tensor(f["sample_keys"], dtype=torch.int64)}
            feats[tap] = FeatureStats.from_tensors(tensors, f["meta"], source=f"monitoring stats of tap '{tap}'")
        preds = {n: PredictionStats.from_dict(d, source=f"monitoring stats of head '{n}'")
                 for n, d in doc["predictions"].items()}
        return cls(preds, feats)

    def to_bytes(self, meta: Mapping[str, str] | None = None) -> bytes:
        """The safetensors file :func:`heads.monitor.stats.save_run_stats` would write."""
        return run_stats_bytes(self.predictions, self.features, meta)

    @classmethod
    def load(cls, path: str | Path) -> MonitorStats:
        """Read a file written from :meth:`to_bytes` (raises ``MonitorStatsError`` naming it when damaged)."""
        predictions, features, _ = load_run_stats(path)
        return cls(predictions, features)


class BatchPredictor:
    """The trunk once per batch, then every head of a bank, on one device.

    Args:
        trunk: a :class:`trunk.model.Trunk`; moved to ``device`` and put in eval mode.
        bank: the heads; moved alike.
        device: where to run.
        amp: bf16 autocast + channels_last; None means "on CUDA only".
        monitor: also give each batch's :class:`MonitorStats` (see :meth:`run`).
        seed: the feature sample's seed.
    """

    def __init__(self, trunk, bank: HeadBank, device: torch.device, amp: bool | None = None,
                 monitor: bool = False, seed: int = MONITOR_SEED) -> None:
        self.monitor = bool(monitor)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        self.trunk = trunk.to(self.device).eval()
        self.bank = bank.to(self.device).eval()
        if self.amp:
            self.trunk.to(memory_format=torch.channels_last)
        self.taps = list(bank.taps)
        self.names = list(bank.names)

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def __call__(self, pixels: torch.Tensor) -> Predictions:
        """``{head: (labels, scores)}`` for each row of ``pixels`` (``(n, C, H, W)``, n may be 0)."""
        return self.run(pixels)[0]

    def run(self, pixels: torch.Tensor, shas: Sequence[str] | None = None) -> tuple[Predictions, MonitorStats | None]:
        """Predictions and, with ``monitor``, the batch's :class:`MonitorStats` (None otherwise).

        Args:
            pixels: ``(n, C, H, W)``, n may be 0.
            shas: the rows' content hashes (sampling keys); required with ``monitor``.
        """
        stats = MonitorStats.empty(self.bank, self.seed) if self.monitor else None
        if pixels.shape[0] == 0:
            return {name: ([], []) for name in self.names}, stats
        if stats is not None and (shas is None or len(shas) != pixels.shape[0]):
            raise ValueError(f"monitoring needs one sha256 per decoded row: {pixels.shape[0]} rows, "
                             f"{'no' if shas is None else len(shas)} hashes")
        x = pixels.to(self.device, non_blocking=True)
        if self.amp:
            x = x.contiguous(memory_format=torch.channels_last)
        out: Predictions = {}
        with torch.inference_mode(), self._autocast():
            features = self.trunk(x, self.taps)
            logits = self.bank(features)
            for name, head_logits in logits.items():
                # As HeadBank.predict: softmax in float32 even if the trunk ran in half precision.
                score, index = torch.softmax(head_logits.float(), dim=-1).max(dim=-1)
                classes = self.bank.classes[name]
                out[name] = ([classes[i] for i in index.cpu().tolist()], score.cpu().tolist())
                if stats is not None:
                    stats.predictions[name].update(index, score)
            if stats is not None:
                keys = row_keys(shas, self.seed)
                for tap in self.taps:
                    stats.features[tap].update(features[tap].float(), keys=keys)
        return out, stats


def empty_columns(head_names: Sequence[str]) -> dict[str, list[Any]]:
    """Output columns with no rows, in the order of the output schema."""
    columns: dict[str, list[Any]] = {"path": [], "sha256": [], "error": []}
    for name in sorted(head_names):
        columns[f"{name}_label"] = []
        columns[f"{name}_score"] = []
    return columns


def batch_rows(batch: DecodedBatch, predictions: Predictions, columns: dict[str, list[Any]]) -> None:
    """Append one row per input of ``batch`` to ``columns``; failed inputs get nulls for every head.

    Args:
        batch: the decoded batch.
        predictions: :class:`BatchPredictor`'s output for ``batch.pixels``.
        columns: from :func:`empty_columns`, extended in place.
    """
    ok = batch.ok
    row_of = {pos: row for row, pos in enumerate(ok)}
    columns["path"] += batch.paths
    columns["sha256"] += batch.shas
    columns["error"] += batch.errors
    for name, (labels, scores) in predictions.items():
        if len(labels) != len(ok):
            raise RuntimeError(f"head '{name}' returned {len(labels)} rows for {len(ok)} decoded images")
        label_col, score_col = columns[f"{name}_label"], columns[f"{name}_score"]
        for pos in range(len(batch)):
            row = row_of.get(pos)
            label_col.append(None if row is None else labels[row])
            score_col.append(None if row is None else scores[row])
