"""Streaming statistics a bulk run keeps per head and per tap, at negligible cost.

A bulk run already holds, per batch, every tap's features and every head's winning class
and score. The accumulators here fold those tensors in as they pass, so monitoring needs
no second pass over images or features:

- :class:`PredictionStats` (per head): predicted-label counts and a fixed-bin histogram of
  the top score (the winning class's softmax probability, ``bins`` equal bins on
  ``[0, 1]``). The share of low-confidence predictions is read from the histogram for any
  threshold on a bin edge (:meth:`PredictionStats.low_confidence_share`), so a team can
  change its threshold later without re-running anything.
- :class:`FeatureStats` (per tap): row count, per-dimension mean and variance, merged with
  Chan et al.'s pairwise update (the parallel form of Welford's algorithm: numerically
  stable, no sum-of-squares cancellation) in float64, and a bounded random sample of
  feature vectors (``sample_size`` rows, 256 by default) for the multivariate test in
  :mod:`heads.monitor.drift`.

Cost per batch: one ``bincount`` per head and, per tap, a mean, a centred sum of squares
and a sort of ``sample_size + B`` keys: O(B * D), against the trunk's O(B * GFLOPs). Only
``(D,)`` vectors and the few sampled rows leave the device.

Mergeable, exactly: counts add; moments merge by Chan's formula (equal to one pass up to
float64 rounding); the sample is a *bottom-k* sample: every row gets a 63-bit key and the
sample is the ``sample_size`` rows with the smallest keys. The union of two bottom-k
samples, cut to the k smallest keys, is the bottom-k sample of the union, so two workers'
stats merge into exactly what one pass over all rows gives, in any order. For that to hold
row for row, a row's key must depend on the row, not on where it was seen: pass
``keys=row_keys(shas, seed)`` (the images' content hashes, which a bulk run and the
feature cache both have). Without keys, keys are drawn from a generator seeded by
``(seed, stream, rows seen so far)``: still a uniform random sample, reproducible for one
stream, but workers must then use distinct ``stream`` numbers and the merged sample is
not row-identical to a single pass.

Tap reduction (:func:`summarise_tap`): pooled ``(N, D)`` is used as is; a feature map
``(N, C, H, W)`` is reduced to its spatial mean per channel ``(N, C)`` (what the head's
own pooling would see first, and translation-invariant, so moments mean something); a
token sequence ``(N, T, C)`` to its mean over tokens.

Serialised without pickles: :meth:`PredictionStats.to_dict` is small plain JSON (for
``_SUCCESS.json``); :meth:`FeatureStats.to_tensors` gives tensors plus a JSON-able meta
dict, and :func:`save_run_stats` / :func:`load_run_stats` write and read a whole run's
stats as one safetensors file whose metadata carries a digest that loading checks.

Wiring (for the bulk run)::

    preds = {name: PredictionStats(bank.classes[name]) for name in bank.names}
    feats = {tap: FeatureStats(seed=job_seed) for tap in bank.taps}
    keys = row_keys(batch_shas, seed=job_seed)               # per batch
    for tap, x in features.items(): feats[tap].update(x, keys=keys)
    for name, logits in bank(features).items(): preds[name].update_logits(logits)
    # per worker / shard: merge with a.merge(b); at the end:
    save_run_stats(out / "_MONITOR.safetensors", preds, feats, meta={"release": ...})
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from trunk.files import atomic_write
from trunk.record import RecordError, read_record, record_bytes

SCORE_BINS = 20
SAMPLE_SIZE = 256
RUN_FORMAT = "monitor-run/1"
_KEY_RANGE = 1 << 62


class MonitorStatsError(RecordError):
    """Stats that cannot be combined, fed or read; the message names the object or file."""


def summarise_tap(features: torch.Tensor) -> torch.Tensor:
    """One vector per image from a tap's output: ``(N, D)`` as is, ``(N, C, H, W)`` -> spatial mean, ``(N, T, C)`` -> token mean.

    Raises:
        MonitorStatsError: any other rank.
    """
    if features.dim() == 2:
        return features
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 3:
        return features.mean(dim=1)
    raise MonitorStatsError(f"a tap's features must be (N, D), (N, T, C) or (N, C, H, W); got shape {tuple(features.shape)}")


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") % _KEY_RANGE


def row_keys(shas: Sequence[str], seed: int = 0) -> torch.Tensor:
    """Sampling keys from images' content hashes: the same image gets the same key in every worker and restart.

    Args:
        shas: sha256 hex digests, one per row.
        seed: changes which rows a sample picks (same seed, same sample).

    Returns:
        int64 ``(N,)`` keys in ``[0, 2**62)``.
    """
    return torch.tensor([_hash_int(f"{seed}:{s}") for s in shas], dtype=torch.int64)


class PredictionStats:
    """One head's predictions over a run: label counts and a top-score histogram.

    Args:
        classes: the head's class names; index i means ``classes[i]``.
        bins: equal-width score bins on ``[0, 1]``.
    """

    def __init__(self, classes: Sequence[str], bins: int = SCORE_BINS) -> None:
        if not classes:
            raise MonitorStatsError("prediction stats need at least one class")
        if bins < 1:
            raise MonitorStatsError(f"score bins must be >= 1, got {bins}")
        self.classes: list[str] = [str(c) for c in classes]
        self.bins = int(bins)
        self._index = {c: i for i, c in enumerate(self.classes)}
        self.label_counts = torch.zeros(len(self.classes), dtype=torch.int64)
        self.score_counts = torch.zeros(self.bins, dtype=torch.int64)

    @property
    def count(self) -> int:
        """Predictions folded in."""
        return int(self.label_counts.sum())

    def update(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Fold in one batch of predicted class indices and their top scores (any device)."""
        indices = torch.as_tensor(indices).reshape(-1).to(torch.int64)
        scores = torch.as_tensor(scores).reshape(-1).to(torch.float32)
        if indices.numel() != scores.numel():
            raise MonitorStatsError(f"{indices.numel()} predicted labels but {scores.numel()} scores")
        if not indices.numel():
            return
        k = len(self.classes)
        if int(indices.min()) < 0 or int(indices.max()) >= k:
            raise MonitorStatsError(f"predicted class index out of range [0, {k}) for classes {self.classes}")
        # bincount on the tensors' own device; only the (K,) and (bins,) counts move.
        self.label_counts += torch.bincount(indices, minlength=k).cpu()
        binned = (scores.clamp(0.0, 1.0) * self.bins).floor().to(torch.int64).clamp(max=self.bins - 1)
        self.score_counts += torch.bincount(binned, minlength=self.bins).cpu()

    def update_labels(self, labels: Sequence[str], scores: torch.Tensor) -> None:
        """Fold in class names (as :meth:`heads.bank.HeadBank.predict` returns them) and scores."""
        try:
            indices = torch.tensor([self._index[label] for label in labels], dtype=torch.int64)
        except KeyError as e:
            raise MonitorStatsError(f"label {e.args[0]!r} is not one of the head's classes {self.classes}") from None
        self.update(indices, scores)

    def update_logits(self, logits: torch.Tensor, probabilities: bool = False) -> None:
        """Fold in ``(N, K)`` logits (softmax taken in float32) or, with ``probabilities``, class probabilities."""
        if logits.dim() != 2 or logits.shape[1] != len(self.classes):
            raise MonitorStatsError(f"expected (N, {len(self.classes)}) scores, got shape {tuple(logits.shape)}")
        probs = logits.float() if probabilities else torch.softmax(logits.float(), dim=-1)
        score, index = probs.max(dim=-1)
        self.update(index, score)

    def _check_compatible(self, other: PredictionStats) -> None:
        if other.classes != self.classes or other.bins != self.bins:
            raise MonitorStatsError(f"cannot merge prediction stats over classes {other.classes} / {other.bins} bins "
                                    f"into {self.classes} / {self.bins} bins")

    def merge(self, other: PredictionStats) -> PredictionStats:
        """A new accumulator holding both (same classes and bins required)."""
        self._check_compatible(other)
        out = PredictionStats(self.classes, self.bins)
        out.label_counts = self.label_counts + other.label_counts
        out.score_counts = self.score_counts + other.score_counts
        return out

    def label_distribution(self) -> torch.Tensor:
        """float64 ``(K,)`` share of predictions per class (zeros when empty)."""
        return self.label_counts.double() / max(self.count, 1)

    def low_confidence_count(self, threshold: float) -> int:
        """Predictions whose top score is below ``threshold`` (which must lie on a bin edge)."""
        edge = threshold * self.bins
        if not 0.0 <= threshold <= 1.0 or abs(edge - round(edge)) > 1e-6:
            raise MonitorStatsError(f"low-confidence threshold {threshold} is not a multiple of 1/{self.bins} "
                                    f"(the score histogram's bin width)")
        return int(self.score_counts[: int(round(edge))].sum())

    def low_confidence_share(self, threshold: float) -> float | None:
        """Share of predictions with top score below ``threshold``; None when empty."""
        return self.low_confidence_count(threshold) / self.count if self.count else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (ints and strings only)."""
        return {"classes": list(self.classes), "bins": self.bins, "label_counts": self.label_counts.tolist(),
                "score_counts": self.score_counts.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "prediction stats") -> PredictionStats:
        """Inverse of :meth:`to_dict`.

        Raises:
            MonitorStatsError: a field is missing or malformed (named with ``source``).
        """
        for field_name in ("classes", "bins", "label_counts", "score_counts"):
            if field_name not in data:
                raise MonitorStatsError(f"{source}: missing field '{field_name}'")
        out = cls(data["classes"], int(data["bins"]))
        labels = torch.tensor(data["label_counts"], dtype=torch.int64)
        scores = torch.tensor(data["score_counts"], dtype=torch.int64)
        if labels.shape != out.label_counts.shape or bool((labels < 0).any()):
            raise MonitorStatsError(f"{source}: field 'label_counts' needs {len(out.classes)} non-negative counts")
        if scores.shape != out.score_counts.shape or bool((scores < 0).any()) or int(scores.sum()) != int(labels.sum()):
            raise MonitorStatsError(f"{source}: field 'score_counts' needs {out.bins} non-negative counts "
                                    f"summing to the label counts")
        out.label_counts, out.score_counts = labels, scores
        return out


class FeatureStats:
    """One tap's features over a run: count, per-dimension mean and variance, and a bottom-k sample.

    Args:
        dim: feature width; taken from the first batch when None.
        sample_size: rows kept in the sample (bounded memory: ``sample_size * dim`` floats).
        seed: sampling seed (mixed into generated keys; pass the same seed to :func:`row_keys`).
        stream: distinguishes workers that feed rows without keys (see the module docstring).
    """

    def __init__(self, dim: int | None = None, sample_size: int = SAMPLE_SIZE, seed: int = 0, stream: int = 0) -> None:
        if sample_size < 0:
            raise MonitorStatsError(f"sample_size must be >= 0, got {sample_size}")
        self.sample_size = int(sample_size)
        self.seed = int(seed)
        self.stream = int(stream)
        self.count = 0
        self.dim: int | None = None
        self.mean = torch.zeros(0, dtype=torch.float64)
        self.m2 = torch.zeros(0, dtype=torch.float64)
        self.sample = torch.zeros(0, 0, dtype=torch.float32)
        self.sample_keys = torch.zeros(0, dtype=torch.int64)
        if dim is not None:
            self._init_dim(int(dim))

    def _init_dim(self, dim: int) -> None:
        self.dim = dim
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)
        self.sample = torch.zeros(0, dim, dtype=torch.float32)

    @classmethod
    def from_features(cls, features: torch.Tensor, keys: torch.Tensor | None = None, sample_size: int = SAMPLE_SIZE,
                      seed: int = 0) -> FeatureStats:
        """Stats of features already in memory (e.g. a head's cached training rows), in one call."""
        out = cls(sample_size=sample_size, seed=seed)
        out.update(features, keys=keys)
        return out

    @property
    def var(self) -> torch.Tensor:
        """Per-dimension unbiased variance (as ``torch.var``'s default); zeros below two rows."""
        return self.m2 / (self.count - 1) if self.count > 1 else torch.zeros_like(self.m2)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def _moments_merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        # Chan, Golub & LeVeque: exact pairwise merge of (n, mean, M2), no cancellation.
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.count = n

    def _generated_keys(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_hash_int(f"{self.seed}:{self.stream}:{self.count}"))
        return torch.randint(0, _KEY_RANGE, (n,), generator=g, dtype=torch.int64)

    def _keep(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        # Bottom-k: the sample_size smallest keys; a stable sort keeps ties deterministic.
        order = torch.sort(keys, stable=True).indices[: self.sample_size]
        self.sample_keys, self.sample = keys[order], rows[order]

    def update(self, features: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """Fold in one batch of a tap's features (any device, any of :func:`summarise_tap`'s shapes).

        Args:
            features: ``(N, D)``, ``(N, T, C)`` or ``(N, C, H, W)``.
            keys: int64 ``(N,)`` sampling keys (:func:`row_keys`); generated when None.
        """
        x = summarise_tap(features.detach())
        n = int(x.shape[0])
        if self.dim is None:
            self._init_dim(int(x.shape[1]))
        if x.shape[1] != self.dim:
            raise MonitorStatsError(f"features of width {x.shape[1]} fed to stats of width {self.dim}")
        if not n:
            return
        if keys is None:
            keys = self._generated_keys(n)
        keys = torch.as_tensor(keys, dtype=torch.int64).reshape(-1).cpu()
        if keys.numel() != n:
            raise MonitorStatsError(f"{keys.numel()} sampling keys for {n} feature rows")
        x64 = x.to(torch.float64)
        mean_b = x64.mean(dim=0)
        m2_b = (x64 - mean_b).square().sum(dim=0)
        self._moments_merge(n, mean_b.cpu(), m2_b.cpu())
        if self.sample_size:
            old = self.sample_keys.numel()
            all_keys = torch.cat([self.sample_keys, keys])
            order = torch.sort(all_keys, stable=True).indices[: self.sample_size]
            new_rows = order[order >= old] - old
            # Only the rows that enter the sample leave the device.
            picked = x[new_rows.to(x.device)].to(torch.float32).cpu()
            rows = torch.cat([self.sample, picked])
            keys_kept = torch.cat([self.sample_keys, keys[new_rows]])
            self._keep(keys_kept, rows)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new accumulator holding both (same width, sample size and seed required)."""
        if (other.sample_size, other.seed) != (self.sample_size, self.seed):
            raise MonitorStatsError(f"cannot merge feature stats with sample size / seed {other.sample_size}/{other.seed} "
                                    f"into {self.sample_size}/{self.seed}")
        if self.dim is not None and other.dim is not None and other.dim != self.dim:
            raise MonitorStatsError(f"cannot merge feature stats of width {other.dim} into width {self.dim}")
        out = FeatureStats(self.dim if self.dim is not None else other.dim, self.sample_size, self.seed, self.stream)
        for part in (self, other):
            if part.count:
                out._moments_merge(part.count, part.mean, part.m2)
        if out.dim is not None:
            out._keep(torch.cat([self.sample_keys, other.sample_keys]),
                      torch.cat([self.sample.reshape(-1, out.dim), other.sample.reshape(-1, out.dim)]))
        return out

    def to_tensors(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (``mean``, ``m2``, ``sample``, ``sample_keys``, names prefixed) and a JSON-able meta dict."""
        dim = self.dim or 0
        tensors = {f"{prefix}mean": self.mean.clone(), f"{prefix}m2": self.m2.clone(),
                   f"{prefix}sample": self.sample.reshape(int(self.sample_keys.numel()), dim).clone(), f"{prefix}sample_keys": self.sample_keys.clone()}
        meta = {"count": self.count, "dim": self.dim, "sample_size": self.sample_size, "seed": self.seed,
                "stream": self.stream}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], prefix: str = "",
                     source: str = "feature stats") -> FeatureStats:
        """Inverse of :meth:`to_tensors`.

        Raises:
            MonitorStatsError: a tensor or field is missing or inconsistent (named with ``source``).
        """
        try:
            out = cls(meta["dim"], int(meta["sample_size"]), int(meta["seed"]), int(meta.get("stream", 0)))
            count = int(meta["count"])
            mean, m2 = tensors[f"{prefix}mean"], tensors[f"{prefix}m2"]
            sample, keys = tensors[f"{prefix}sample"], tensors[f"{prefix}sample_keys"]
        except KeyError as e:
            raise MonitorStatsError(f"{source}: missing field '{e.args[0]}'") from None
        dim = out.dim or 0
        if mean.shape != (dim,) or m2.shape != (dim,) or sample.dim() != 2 or sample.shape[1] != dim:
            raise MonitorStatsError(f"{source}: field 'mean'/'m2'/'sample' do not match width {dim}")
        if keys.shape != (sample.shape[0],) or sample.shape[0] > min(count, out.sample_size) or count < 0:
            raise MonitorStatsError(f"{source}: field 'sample' holds {sample.shape[0]} rows for count {count} "
                                    f"and sample size {out.sample_size}")
        out.count = count
        out.mean, out.m2 = mean.to(torch.float64), m2.to(torch.float64)
        out.sample, out.sample_keys = sample.to(torch.float32), keys.to(torch.int64)
        return out


def save_run_stats(path: str | Path, predictions: Mapping[str, PredictionStats], features: Mapping[str, FeatureStats],
                   meta: Mapping[str, str] | None = None) -> Path:
    """Write a run's stats (per head, per tap) atomically as one safetensors file with a digest; returns ``path``.

    Args:
        path: the file (e.g. ``<output>/_MONITOR.safetensors`` beside ``_SUCCESS.json``).
        predictions: ``{head name: PredictionStats}``.
        features: ``{tap: FeatureStats}``.
        meta: extra string metadata (release, job id, ...), returned by :func:`load_run_stats`.
    """
    path = Path(path)
    blob = run_stats_bytes(predictions, features, meta)
    atomic_write(path, lambda f: f.write(blob))
    return path


def run_stats_bytes(predictions: Mapping[str, PredictionStats], features: Mapping[str, FeatureStats],
                    meta: Mapping[str, str] | None = None) -> bytes:
    """The bytes :func:`save_run_stats` writes, for a caller that commits them itself (e.g. commit-once)."""
    tensors: dict[str, torch.Tensor] = {}
    head_meta: dict[str, Any] = {}
    for name, stats in predictions.items():
        tensors[f"pred/{name}/labels"] = stats.label_counts.clone()
        tensors[f"pred/{name}/scores"] = stats.score_counts.clone()
        head_meta[name] = {"classes": stats.classes, "bins": stats.bins}
    tap_meta: dict[str, Any] = {}
    for tap, stats in features.items():
        t, m = stats.to_tensors(prefix=f"feat/{tap}/")
        tensors.update(t)
        tap_meta[tap] = m
    body = json.dumps({"heads": head_meta, "taps": tap_meta, "meta": dict(meta or {})}, sort_keys=True)
    return record_bytes(RUN_FORMAT, tensors, body)


def load_run_stats(path: str | Path) -> tuple[dict[str, PredictionStats], dict[str, FeatureStats], dict[str, str]]:
    """Read what :func:`save_run_stats` wrote: ``(predictions, features, meta)``.

    Raises:
        MonitorStatsError: unreadable, of another format, or altered since it was written.
    """
    path = Path(path)
    tensors, body, _ = read_record(path, RUN_FORMAT, "a monitoring stats file", error=MonitorStatsError)
    doc = json.loads(body)
    predictions: dict[str, PredictionStats] = {}
    for name, m in doc["heads"].items():
        predictions[name] = PredictionStats.from_dict(
            {**m, "label_counts": tensors[f"pred/{name}/labels"].tolist(),
             "score_counts": tensors[f"pred/{name}/scores"].tolist()}, source=f"{path}: head '{name}'")
    features = {tap: FeatureStats.from_tensors(tensors, m, prefix=f"feat/{tap}/", source=f"{path}: tap '{tap}'")
                for tap, m in doc["taps"].items()}
    return predictions, features, {str(k): str(v) for k, v in doc["meta"].items()}
