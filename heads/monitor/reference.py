"""What a head version remembers at registration, to compare every later bulk run with.

A :class:`HeadReference` holds:

- the head's predictions on its validation split (:class:`~heads.monitor.stats.PredictionStats`:
  predicted-label counts and top-score histogram), the baseline for the label mix and the
  low-confidence share;
- the statistics of its training features at its tap (:class:`~heads.monitor.stats.FeatureStats`:
  moments and a bounded sample), computed from the feature-cache rows the head was
  trained on, which are already in memory at training time: no extra pass over images.

Stored as one small safetensors file (no pickles): counts, moments and the sample as
tensors, classes / tap / meta as JSON in the metadata, plus a digest over all of it.
:meth:`HeadReference.load` refuses a file whose contents do not hash to its digest, or to
the digest the registry recorded (pass it as ``expected_digest``), the same pattern as
:mod:`trunk.seen`. About 256 x D x 4 bytes: 0.5 MB for D = 512.

Wiring (registration, in ``registry``)::

    ref = HeadReference.build(val_logits, result.classes, train_features, tap=result.tap,
                              train_keys=row_keys(train_shas, seed), meta={"head": result.name})
    path = ref.save(tmp / "reference.safetensors")
    # log the file as an artifact of the head version's run, tag the version with
    # ``monitor_reference_digest = ref.digest``, and log ref.summary() as params/metrics.
    # At classify time: HeadReference.load(downloaded, expected_digest=version_tag).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from heads.monitor.stats import SAMPLE_SIZE, SCORE_BINS, FeatureStats, MonitorStatsError, PredictionStats
from trunk.record import RecordError, read_record, tensor_digest, write_record

FORMAT = "head-reference/1"


class HeadReferenceError(RecordError):
    """A reference file that cannot be read, or does not match its digest."""


class HeadReference:
    """A head version's reference: validation predictions and training-feature stats at its tap.

    Args:
        predictions: validation-split prediction stats.
        features: training-feature stats at ``tap`` (None when the features were not available).
        tap: the tap the head reads.
        meta: string metadata (head name, version, trunk_id, ...).
    """

    def __init__(self, predictions: PredictionStats, features: FeatureStats | None, tap: str,
                 meta: Mapping[str, str] | None = None) -> None:
        self.predictions = predictions
        self.features = features
        self.tap = str(tap)
        self.meta: dict[str, str] = {str(k): str(v) for k, v in (meta or {}).items()}

    @property
    def classes(self) -> list[str]:
        return self.predictions.classes

    @classmethod
    def build(cls, val_scores: torch.Tensor, classes: Sequence[str], train_features: torch.Tensor | None, *,
              tap: str, probabilities: bool = False, train_keys: torch.Tensor | None = None,
              sample_size: int = SAMPLE_SIZE, seed: int = 0, bins: int = SCORE_BINS,
              meta: Mapping[str, str] | None = None) -> HeadReference:
        """A reference from tensors already in memory after training.

        Args:
            val_scores: ``(N_val, K)`` logits of the head on its validation split (or class
                probabilities, with ``probabilities=True``).
            classes: the head's class names (K of them).
            train_features: the training rows' features at the tap, ``(N, D)`` (or any shape
                :func:`~heads.monitor.stats.summarise_tap` takes); None to record no features.
            tap: the head's tap.
            train_keys: sampling keys of the training rows (``row_keys(shas, seed)``); drawn from ``seed`` when None.
            sample_size: feature rows kept.
            seed: sampling seed.
            bins: score histogram bins (must match the run's).
            meta: string metadata.
        """
        predictions = PredictionStats(classes, bins)
        try:
            predictions.update_logits(val_scores, probabilities=probabilities)
        except MonitorStatsError as e:
            raise HeadReferenceError(f"validation scores: {e}") from None
        features = None
        if train_features is not None:
            features = FeatureStats.from_features(train_features, keys=train_keys, sample_size=sample_size, seed=seed)
        return cls(predictions, features, tap, meta)

    def summary(self) -> dict[str, Any]:
        """Small JSON-able figures for logging (counts, label mix, low-confidence share at 0.5, feature width)."""
        return {
            "tap": self.tap,
            "n_val": self.predictions.count,
            "label_distribution": dict(zip(self.classes, self.predictions.label_distribution().tolist())),
            "low_confidence_share": self.predictions.low_confidence_share(0.5),
            "n_train_features": self.features.count if self.features else 0,
            "feature_dim": self.features.dim if self.features else None,
            "feature_sample_rows": int(self.features.sample.shape[0]) if self.features else 0,
        }

    def _payload(self) -> tuple[dict[str, torch.Tensor], str]:
        tensors = {"labels": self.predictions.label_counts.clone(), "scores": self.predictions.score_counts.clone()}
        feature_meta = None
        if self.features is not None:
            t, feature_meta = self.features.to_tensors(prefix="features/")
            tensors.update(t)
        body = json.dumps({"classes": self.classes, "bins": self.predictions.bins, "tap": self.tap,
                           "meta": self.meta, "features": feature_meta}, sort_keys=True)
        return tensors, body

    @property
    def digest(self) -> str:
        """16 hex digits over everything stored: equal references have equal digests."""
        tensors, body = self._payload()
        return tensor_digest(tensors, body)

    def save(self, path: str | Path) -> Path:
        """Write the reference atomically as a record (:mod:`trunk.record`); returns ``path``."""
        tensors, body = self._payload()
        return write_record(path, FORMAT, tensors, body)

    @classmethod
    def load(cls, path: str | Path, expected_digest: str | None = None) -> HeadReference:
        """Read a reference written by :meth:`save`, checked against its own digest and ``expected_digest``.

        Raises:
            HeadReferenceError: unreadable, of another format, malformed, or altered (its contents do not
                hash to the digest it, or the caller, names).
        """
        path = Path(path)
        tensors, body, _ = read_record(path, FORMAT, "a head reference", expected_digest, error=HeadReferenceError)
        try:
            doc = json.loads(body)
            predictions = PredictionStats.from_dict(
                {"classes": doc["classes"], "bins": doc["bins"], "label_counts": tensors["labels"].tolist(),
                 "score_counts": tensors["scores"].tolist()}, source=str(path))
            features = None
            if doc.get("features") is not None:
                features = FeatureStats.from_tensors(tensors, doc["features"], prefix="features/", source=str(path))
            return cls(predictions, features, doc["tap"], doc.get("meta") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise HeadReferenceError(f"{path}: malformed head reference: {e}") from None
