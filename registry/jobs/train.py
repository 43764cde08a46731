"""The head training job: train, evaluate, cost, gate and register a head; promote it when it passes.

Ties heads/ to the MLflow registry through :mod:`registry.store`; a tool composes its
Hydra config and calls one function here with explicit arguments. Trunk training is
:mod:`registry.jobs.train_trunk`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from mlflow import MlflowClient

from heads.checks.gate import GateReport, check_gate
from heads.result import HeadResult
from heads.spec import HeadSpec
from heads.store import LoadedHead
from heads.monitor.reference import HeadReference
from heads.monitor.stats import FeatureStats, row_keys
from heads.training.branch_train import fit_branch_head, train_tap_stats
from heads.training.cost import bank_cost
from heads.training.data import LabelledData, check_trainable, load_labelled_data
from heads.training.evaluate import seen_split_metrics
from heads.training.fit import fit_head
from registry.jobs.extract import extract_job
from registry.store.heads import (
    epoch_curve_logger,
    head_run,
    log_head_datasets,
    register_head,
)
from registry.store.releases import (
    PRODUCTION,
    Release,
    ReleaseError,
    get_release,
    load_release_heads,
    promote_head,
)
from registry.store.trunks import (
    load_trunk,
    trunk_trained_on,
)
from registry.store.runs import RunLog
from registry.store.workspace import Workspace
from trunk.loader import iter_decoded
from trunk.model import POOLED, Trunk
from trunk.preprocess import eval_transform
from trunk.seen import SeenImages, content_sha

# Version tag: the digest of the trunk's record of its training images the head's
# validation split was checked against, or "unknown" when the trunk has none.
TRUNK_TRAINED_ON_TAG = "trunk_trained_on"
UNKNOWN = "unknown"
# The sampling seed of every head reference's feature reservoir (keys from content hashes,
# so the same training images give the same sample whatever order they came in).
REFERENCE_SEED = 0
# Cached rows are fed to the reference's statistics in float32 chunks of this many rows,
# so a branch tap's fp16 maps are never copied whole.
REFERENCE_CHUNK = 1024

log = logging.getLogger(__name__)

class JobError(RuntimeError):
    """A job cannot go on; the message says why and what to do."""


def resolve_trunk(client: MlflowClient, trunk_version: str | int) -> tuple[Trunk, int]:
    """The trunk to work on: ``production`` (the production release's) or a version number."""
    if str(trunk_version) == PRODUCTION:
        release = get_release(client, PRODUCTION)
        if release is None:
            raise JobError("there is no production release yet: register a trunk first "
                           "(python -m tools.train_trunk, python -m tools.register_trunk or python -m tools.demo)")
        version = release.trunk_version
    else:
        try:
            version = int(trunk_version)
        except ValueError:
            raise JobError(f"trunk_version must be 'production' or a version number, got '{trunk_version}'") from None
    return load_trunk(client, version), version


def features_for(trunk: Trunk, spec: HeadSpec, data: LabelledData, *, workspace: Workspace, batch_size: int,
                 num_workers: int, device: str, progress: bool, lazy: bool = False):
    """Cached features for a head's train and val images, extracting what is missing first.

    Images that cannot be decoded are left out with a warning; a class left with no
    training image is a config error naming the data. ``lazy``: the training rows come as a
    :class:`trunk.cache.CachedRows` view that reads each batch from the shards (a
    million-row tap trains in bounded memory, same values as loading it).
    """
    samples = data.train + data.val
    result = extract_job(trunk, [s.path for s in samples], workspace=workspace, taps=(spec.tap,),
                         batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    sha_of = dict(zip((s.path for s in samples), result.shas))
    if result.errors:
        shown = "; ".join(f"{p}: {r}" for p, r in list(result.errors.items())[:3])
        log.warning("%s: %d images could not be decoded and are left out (%s%s)", spec.source,
                    len(result.errors), shown, " ..." if len(result.errors) > 3 else "")
    train = [s for s in data.train if sha_of[s.path]]
    val = [s for s in data.val if sha_of[s.path]]
    empty = sorted(set(data.classes) - {data.classes[s.label] for s in train})
    if empty:
        raise spec.error("data", f"class {', '.join(repr(c) for c in empty)} has no decodable training image")
    if not val:
        raise spec.error("data", "no decodable validation image")
    cache = result.caches[spec.tap]  # the instance that verified these rows during extraction
    train_shas = [sha_of[s.path] for s in train]
    train_x = cache.rows(train_shas) if lazy else cache.load(train_shas)
    val_x = cache.load([sha_of[s.path] for s in val])
    kept = LabelledData(classes=data.classes, train=train, val=val, data_sha=data.data_sha, source=data.source,
                        has_slices=data.has_slices)
    return kept, train_x, val_x, result


# -- heads ------------------------------------------------------------------------------
@dataclass
class HeadJobResult:
    result: HeadResult
    version: int
    trunk_version: int
    gate: GateReport
    release: Release | None = None
    refused: str | None = None
    extract_summary: dict[str, Any] = field(default_factory=dict)


def train_head_job(client: MlflowClient, spec: HeadSpec, *, workspace: Workspace, trunk_version: str | int = PRODUCTION,
                   batch_size: int, num_workers: int, device: str, progress: bool,
                   promote: bool = True) -> HeadJobResult:
    """Train, evaluate, cost and register one head; promote it into a new release if its gate passes.

    A head on ``pooled`` trains on cached features (extracting what is missing first). A
    branch head (an earlier tap) trains from images: the trunk's prefix runs frozen, the
    copied layers after the tap and the classifier learn, with the config's augmentation.

    Production is read before training: if other teams promote meanwhile, the promotion
    is rebuilt on top of theirs; if this head itself moved (another version of it reached
    production since), it is refused and ``refused`` says why (the tool exits non-zero).

    The head's MLflow run (experiment ``heads``) is opened before extraction and training
    and ends once the version is registered, so its duration is the job's; it gets the
    training curves epoch by epoch and the datasets read. A job that fails on the way
    ends its run ``FAILED`` and registers nothing.
    """
    started_from = get_release(client, PRODUCTION)
    trunk, tv = resolve_trunk(client, trunk_version)
    with head_run(client, spec, trunk_id=trunk.trunk_id, trunk_version=tv) as run:
        result, gate, summary = train_head_on(client, spec, trunk, tv, workspace=workspace, batch_size=batch_size,
                                              num_workers=num_workers, device=device, progress=progress, run=run)
        version = register_head(client, result, trunk_version=tv, gate_report=gate, run=run)
    job = HeadJobResult(result, version, tv, gate, extract_summary=summary)
    if gate.passed and promote:
        try:
            job.release = promote_head(client, spec.name, version, started_from=started_from)
        except ReleaseError as e:
            job.refused = str(e)
    return job


def train_head_on(client: MlflowClient, spec: HeadSpec, trunk: Trunk, trunk_version: int, *, workspace: Workspace,
                  batch_size: int, num_workers: int, device: str, progress: bool,
                  data: LabelledData | None = None,
                  run: RunLog | None = None) -> tuple[HeadResult, GateReport, dict[str, Any]]:
    """Train, evaluate and cost one head on one trunk, and check its own gate; registers nothing.

    Args:
        run: the head's open run (:func:`registry.store.heads.head_run`): it gets the
            datasets read and the training curves, live; None logs nothing.

    Returns:
        ``(result, gate, extraction summary)``.
    """
    tv = trunk_version
    spec.check_tap(trunk.taps)
    trained_on = trunk_trained_on(client, tv)
    # The platform's own split keeps images this trunk trained on out of validation.
    data = data if data is not None else load_labelled_data(spec, avoid=trained_on, hashes=workspace.content_hashes())
    check_trainable(spec, data)  # data handed in (cascade, refresh) gets the same refusal as a file
    out_dir = workspace.run_dir("head", spec.name)
    on_epoch = epoch_curve_logger(run) if run is not None else None
    # Content hashes of the images, from the extraction (the feature cache keys rows by them).
    sha_of: dict[str, str | None] = {}
    listed = [s.path for s in data.train + data.val]
    if spec.tap == POOLED:
        data, train_x, val_x, extracted = features_for(trunk, spec, data, workspace=workspace, batch_size=batch_size,
                                                       num_workers=num_workers, device=device, progress=progress,
                                                       lazy=True)
        result = fit_head(spec, data, train_x, val_x, trunk_id=trunk.trunk_id, out_dir=out_dir, device=device,
                          progress=progress, on_epoch=on_epoch)
        summary = dict(extracted.summary)
        result.metrics["cache_bytes_per_image"] = float(extracted.caches[spec.tap].bytes_per_row())
        sha_of = dict(zip(listed, extracted.shas))
    elif spec.config.get("augment"):
        # Augmented images need the prefix every step: train from images.
        result = fit_branch_head(spec, data, trunk, out_dir=out_dir, augment_ops=spec.config["augment"],
                                 device=device, num_workers=num_workers, progress=progress, on_epoch=on_epoch)
        # What caching this tap would cost, so teams see the storage side of the knob too.
        result.metrics["cache_bytes_per_image"] = float(math.prod(trunk.tap(spec.tap).shape) * 2 + 32)
        summary = {}
    else:
        # No augmentation: the tap's features are the same every epoch, so cache them once.
        data, train_x, val_x, extracted = features_for(trunk, spec, data, workspace=workspace, batch_size=batch_size,
                                                       num_workers=num_workers, device=device, progress=progress)
        shape = tuple(trunk.tap(spec.tap).shape)
        result = fit_branch_head(spec, data, trunk, out_dir=out_dir, augment_ops=None, device=device,
                                 num_workers=num_workers, progress=progress,
                                 cached=(train_x.view(-1, *shape), val_x.view(-1, *shape)), on_epoch=on_epoch)
        summary = dict(extracted.summary)
        result.metrics["cache_bytes_per_image"] = float(extracted.caches[spec.tap].bytes_per_row())
        sha_of = dict(zip(listed, extracted.shas))
    if run is not None:  # the splits it read, as the run's datasets (digest data_sha)
        log_head_datasets(run, spec.name, data)
    if spec.tap == POOLED or not spec.config.get("augment"):
        # The rows the head just trained on, from the cache: no extra pass over images.
        train_shas = [sha_of[s.path] for s in data.train]
        tap_shape = None if spec.tap == POOLED else tuple(trunk.tap(spec.tap).shape)
        stats = cached_rows_stats(train_x, train_shas, tap_shape)
        source = "feature cache rows the head trained on"
    else:
        # Trained from augmented images: no cached rows, so one frozen-prefix pass (eval transform).
        stats = train_tap_stats(trunk, data, spec.tap, device=device, batch_size=batch_size,
                                num_workers=num_workers, seed=REFERENCE_SEED)
        source = "frozen trunk prefix over the training images (eval transform)"
    result.reference = head_reference_for(result, stats, source)
    if data.kept_out_of_val:
        result.metrics["val_kept_out_seen"] = float(data.kept_out_of_val)
    # Augmented branch heads read image files, not the cache: hash their val files here.
    val_shas = [] if trained_on is None else [sha_of.get(p) or content_sha(p) for p in result.val_paths]
    check_val_overlap(result, trained_on, tv, val_shas)
    measure_in_release(client, trunk, tv, result, [s.path for s in data.val], device=device)
    slice_sizes = {k: v["n"] for k, v in result.slice_accuracy.items()}
    slice_acc = {k: v["accuracy"] for k, v in result.slice_accuracy.items()}
    gate = check_gate(spec.gate, result.metrics, slice_acc, slice_sizes)
    return result, gate, summary


def cached_rows_stats(train_x: torch.Tensor, train_shas: Sequence[str],
                      tap_shape: tuple[int, ...] | None = None) -> FeatureStats:
    """Monitoring statistics of a head's cached training rows at its tap.

    Args:
        train_x: ``(N, D)`` rows as the feature cache gives them (flattened for a branch tap).
        train_shas: the content hash of each row's image (sampling keys, so the reservoir
            is reproducible and the same one any other pass over these images keeps).
        tap_shape: a branch tap's shape (``(C, H, W)`` or ``(T, C)``); its rows are viewed
            so, and reduced as :func:`heads.monitor.stats.summarise_tap` does (per-channel
            spatial mean, token mean). None for ``pooled``.
    """
    stats = FeatureStats(seed=REFERENCE_SEED)
    keys = row_keys(list(train_shas), REFERENCE_SEED)
    for start in range(0, len(train_x), REFERENCE_CHUNK):
        rows = train_x[start:start + REFERENCE_CHUNK].float()  # fp16 means lose digits
        stats.update(rows if tap_shape is None else rows.view(-1, *tap_shape),
                     keys=keys[start:start + REFERENCE_CHUNK])
    return stats


def head_reference_for(result: HeadResult, train_stats: FeatureStats | None, source: str) -> HeadReference:
    """A trained head's monitoring reference: its validation logits and its training features' stats.

    Args:
        result: the trained head (its ``val_logits`` are its validation predictions).
        train_stats: its training features' statistics at its tap; None records predictions only.
        source: where the features came from, kept in the reference's ``meta["features"]``.
    """
    meta = {"head": result.name, "trunk_id": result.trunk_id, "config_sha": result.spec.config_sha,
            "data_sha": result.data_sha, "features": source if train_stats is not None else "none"}
    ref = HeadReference.build(result.val_logits, result.classes, None, tap=result.tap, meta=meta)
    ref.features = train_stats
    return ref


# trunk_ids whose missing training-image record was already said in this process.
_SAID_NO_RECORD: set[str] = set()


def check_val_overlap(result: HeadResult, trained_on: SeenImages | None, trunk_version: int,
                      val_shas: Sequence[str]) -> None:
    """Record how many of a head's validation images its trunk trained on, and accuracy on the rest.

    Sets the metrics of :func:`heads.training.evaluate.seen_split_metrics` on ``result``
    (``val_seen_by_trunk``, ``val_seen_share``, ``val_unseen_images``,
    ``val_accuracy_unseen``, ``val_macro_f1_unseen``) and the tag ``trunk_trained_on``
    (the record's digest). A trunk without a record (from timm, a weights file) gets
    ``trunk_trained_on=unknown`` and none of these metrics: no overlap is not claimed.

    Args:
        result: the trained head; its ``val_paths``/``val_predictions`` rows are scored.
        trained_on: the trunk's record (:func:`registry.store.trunks.trunk_trained_on`).
        trunk_version: for the log line.
        val_shas: the content hash of each of ``result.val_paths``.
    """
    if trained_on is None:
        result.tags[TRUNK_TRAINED_ON_TAG] = UNKNOWN
        if result.trunk_id not in _SAID_NO_RECORD:  # once per trunk and process: a cascade trains hundreds of heads
            _SAID_NO_RECORD.add(result.trunk_id)
            log.warning("head.%s: trunk v%s has no record of the images it trained on, so whether its validation "
                        "images were among them is unknown (every head trained on it is tagged %s=%s; said once "
                        "per trunk)", result.name, trunk_version, TRUNK_TRAINED_ON_TAG, UNKNOWN)
        return
    result.tags[TRUNK_TRAINED_ON_TAG] = trained_on.digest
    figures = seen_split_metrics(result.val_predictions, result.val_labels, result.classes,
                                 trained_on.mask(val_shas))
    result.metrics.update(figures)
    if figures["val_seen_by_trunk"]:
        unseen = figures.get("val_accuracy_unseen")
        log.warning("head.%s: %d of %d validation images (%.1f%%) were in trunk v%s's training data; "
                    "val_accuracy on the %d unseen: %s", result.name, figures["val_seen_by_trunk"],
                    len(val_shas), 100 * figures["val_seen_share"], trunk_version, figures["val_unseen_images"],
                    "none unseen" if unseen is None else f"{unseen:.4f}")


def overlap_line(job: HeadJobResult) -> str:
    """One summary line: the head's validation overlap with its trunk's training images."""
    m, tags = job.result.metrics, job.result.tags
    where = f"trunk v{job.trunk_version}'s training images"
    if tags.get(TRUNK_TRAINED_ON_TAG, UNKNOWN) == UNKNOWN or "val_seen_by_trunk" not in m:
        return f"  val overlap with {where}: unknown (the trunk has no record of what it trained on)"
    seen, total = int(m["val_seen_by_trunk"]), int(m["val_seen_by_trunk"] + m["val_unseen_images"])
    if not seen:
        return f"  val overlap with {where}: none (0 of {total})"
    unseen = m.get("val_accuracy_unseen")
    tail = ("no unseen image to score" if unseen is None else
            f"val_accuracy on the {int(m['val_unseen_images'])} unseen {unseen:.4f} "
            f"(macro-F1 {m['val_macro_f1_unseen']:.4f})")
    return f"  val overlap with {where}: {seen} of {total} ({100 * m['val_seen_share']:.1f}%); {tail}"


def measure_in_release(client: MlflowClient, trunk: Trunk, trunk_version: int, result: HeadResult,
                       paths: Sequence[str], *, device: str, n_images: int = 64) -> None:
    """Set ``added_ms_per_image`` to what the head adds inside the production release's bank.

    The bank holds every production head on the same trunk plus this one (replacing an
    older version of it), and runs on the trunk's features of up to ``n_images`` of the
    head's validation images. The head timed alone is kept as ``added_ms_per_image_alone``;
    ``added_ms_per_image_spread`` is the figure's timing spread (interquartile range per
    image, :func:`heads.training.cost.bank_cost`), so a cost below the noise reads as such.
    """
    heads: dict[str, LoadedHead] = {}
    release = get_release(client, PRODUCTION)
    if release is not None and release.trunk_version == trunk_version:
        # The release's own pack: constant tracking requests however many heads it holds.
        heads = {n: h for n, h in load_release_heads(client, release).items() if n != result.name}
    heads[result.name] = LoadedHead(result.module, result.meta())
    batch = next(iter_decoded(list(paths)[:n_images], eval_transform(trunk.data_config), batch_size=n_images))
    trunk.to(device)
    with torch.inference_mode():
        features = trunk(batch.pixels.to(device), sorted({h.tap for h in heads.values()}))
    result.metrics["added_ms_per_image_alone"] = result.metrics["added_ms_per_image"]
    if "added_ms_per_image_spread" in result.metrics:
        result.metrics["added_ms_per_image_alone_spread"] = result.metrics["added_ms_per_image_spread"]

    cost = bank_cost(result.name, heads, features, device=device)
    result.metrics["added_ms_per_image"] = cost["added_ms_per_image"]
    result.metrics["added_ms_per_image_spread"] = cost["added_ms_per_image_spread"]
    result.metrics["bank_heads"] = len(heads)
