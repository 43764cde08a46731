"""Fit one branch head end to end from images: build, train, evaluate, cost, save.

A branch head (:class:`heads.branch.BranchHead`) cannot train on cached pooled features:
it fine-tunes its own copy of the trunk's layers after an earlier tap. So it trains from
images. Each step runs the trunk's shared prefix frozen, under ``torch.no_grad``
(:func:`heads.branch.branch_input`), and trains only the branch (suffix + classifier).

Validation images are decoded and run through the frozen prefix *once*, and their tap
features are kept in memory for every epoch: the prefix is frozen and in eval mode, so
recomputing would give the same tensors, and at platform image sizes the maps are small
(e.g. 600 images x 128 x 8 x 8 floats = 20 MB for a ResNet ``layer2`` at 64 px).

Reproducible on CPU: initial weights, shuffling, dropout and augmentation all draw from
streams seeded by ``train.seed``, inside ``torch.random.fork_rng`` so the caller's random
state is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from heads.branch import BranchHead, branch_input, branch_input_shape, branch_kwargs, branch_taps
from heads.monitor.stats import FeatureStats, row_keys
from heads.training.cost import measure_cost
from heads.training.data import LabelledData, Sample
from heads.training.fit import finish_head
from heads.result import HeadResult
from heads.spec import HeadSpec
from heads.training.train import val_metrics, val_score
from trunk.augment import build_train_transform
from trunk.dataset import ImageDataset, ImageItem, readable
from trunk.loop import EpochStats, TensorBatches, autocast, fit, predict, seeded_rng, shuffled_loader, to_device
from trunk.preprocess import eval_transform
from trunk.seen import content_sha

# Validation batches through the prefix and the branch; feature maps are larger than
# pooled vectors, so chunks are smaller than heads.training.train.EVAL_CHUNK.
EVAL_BATCH = 256
# Branch heads seed each loader worker's augmentation with 31 bits of its torch seed
# (trunk training uses 32); kept so that trained heads reproduce.
WORKER_SEED_BITS = 31


def _images(samples: list[Sample], transform) -> ImageDataset:
    return ImageDataset([s.path for s in samples], transform, targets=[s.label for s in samples])


def collate_readable(batch: list[ImageItem]) -> tuple[Tensor, Tensor, int]:
    """Stack the readable items of a batch: ``(images, labels, n_skipped)``."""
    kept = readable(batch)
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    return torch.stack([it.pixels for it in kept]), torch.tensor([it.target for it in kept], dtype=torch.long), skipped


def _as_list(batch: list) -> list:
    # Keeps the items whole: validation needs to know which samples (and slices) survive.
    return batch


def _prefix(trunk: nn.Module, x: Tensor, tap: str, device: torch.device) -> Tensor:
    """The frozen shared prefix's tap features for a batch of images, float32."""
    with torch.no_grad(), autocast(device):
        return branch_input(trunk, to_device(x, device), tap).float()


def _val_features(trunk: nn.Module, data: LabelledData, tap: str, device: torch.device, batch_size: int,
                  num_workers: int, source: str) -> tuple[Tensor, Tensor, list[Sample], int]:
    """Decode the validation images once and keep their tap features (CPU, float32).

    Returns:
        ``(features, labels, the readable samples in row order, unreadable count)``.
    """
    loader = DataLoader(_images(data.val, eval_transform(trunk.data_config)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_as_list)
    feats, labels, kept, skipped = [], [], [], 0
    for batch in loader:
        kept += [data.val[it.index] for it in readable(batch)]
        x, y, n_bad = collate_readable(batch)
        skipped += n_bad
        if len(x):
            feats.append(_prefix(trunk, x, tap, device).cpu())
            labels.append(y)
    if not feats:
        raise ValueError(f"{source}: no readable validation images ({skipped} unreadable)")
    return torch.cat(feats), torch.cat(labels), kept, skipped


def _branch_logits(module: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    return predict(module, x, device, chunk=EVAL_BATCH, mixed_precision=True)


def _train_loader(data: LabelledData, trunk: nn.Module, augment_ops: list | None, *, seed: int, batch_size: int,
                  num_workers: int) -> DataLoader:
    if augment_ops:
        transform = build_train_transform(trunk.data_config, augment_ops, seed=seed)
    else:
        transform = eval_transform(trunk.data_config)
    # The order has its own generator: the loader's one also seeds workers, and draws from it
    # differ with and without (persistent) workers, which would change the order.
    return shuffled_loader(_images(data.train, transform), batch_size=batch_size, seed=seed + 1, order_seed=seed,
                           collate_fn=collate_readable, num_workers=num_workers, persistent_workers=True,
                           worker_seed_bits=WORKER_SEED_BITS)


def _cached_loader(data: LabelledData, cached: tuple[Tensor, Tensor], *, seed: int, batch_size: int, source: str):
    """Batches ``(features, labels, 0)`` over cached training features, shuffled by ``seed``."""
    train_x, val_x = cached
    if len(train_x) != len(data.train) or len(val_x) != len(data.val):
        raise ValueError(f"{source}: cached features ({len(train_x)} train, {len(val_x)} val) do not match the "
                         f"data ({len(data.train)} train, {len(data.val)} val)")
    train_y = torch.tensor([s.label for s in data.train])
    val_y = torch.tensor([s.label for s in data.val])
    # The same sampler as training from images, so both paths see the same batches.
    order = RandomSampler(range(len(train_x)), generator=torch.Generator().manual_seed(seed))
    batches = _WithNoneSkipped(TensorBatches((train_x, train_y), batch_size, order))
    return batches, val_x.float(), val_y, list(data.val)


class _WithNoneSkipped:
    """Cached batches in the image loader's shape: ``(features, labels, 0 skipped)``."""

    def __init__(self, batches: TensorBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int]]:
        for x, y in self.batches:
            yield x.float(), y, 0


@contextlib.contextmanager
def _frozen_trunk(trunk: nn.Module, device: torch.device) -> Iterator[None]:
    """The trunk in eval mode on ``device``; its mode and device are restored afterwards."""
    was_training = trunk.training
    param = next(trunk.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    trunk.eval().to(device)
    try:
        yield
    finally:
        trunk.to(home).train(was_training)


def train_tap_stats(trunk: Any, data: LabelledData, tap: str, *, device: str | torch.device = "cpu",
                    batch_size: int = EVAL_BATCH, num_workers: int = 0, seed: int = 0) -> FeatureStats:
    """The training images' features at a branch head's tap, as monitoring statistics.

    For an augmented branch head, which trains from images and so has no cached tap rows:
    one pass of the frozen prefix (up to the tap, not the whole trunk) over ``data.train``
    under the *eval* transform, what a bulk run sees. Streamed into a
    :class:`~heads.monitor.stats.FeatureStats` (4-D maps reduced to per-channel spatial
    means as they pass), so memory stays at one batch. Cost: about one training epoch's
    prefix forward without the branch or a backward pass. Sampling keys come from the
    images' content hashes (:func:`~heads.monitor.stats.row_keys`), so the reservoir is the
    one cached rows of the same images would give.

    Args:
        trunk: the live trunk; left in its mode and on its device.
        data: the head's labelled data (its ``train`` images are read).
        tap: the head's branch tap.
        device: where to run the prefix.
        batch_size: images per prefix pass.
        num_workers: data-loader worker processes for decoding.
        seed: the sampling seed.

    Returns:
        Stats over the readable training images (unreadable ones are left out, as in training).
    """
    dev = torch.device(device)
    loader = DataLoader(_images(data.train, eval_transform(trunk.data_config)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    stats = FeatureStats(seed=seed)
    with _frozen_trunk(trunk, dev):
        for batch in loader:
            kept = readable(batch)
            if kept:
                x = torch.stack([it.pixels for it in kept])
                keys = row_keys([content_sha(it.path) for it in kept], seed)
                stats.update(_prefix(trunk, x, tap, dev), keys=keys)
    return stats


def fit_branch_head(
    spec: HeadSpec,
    data: LabelledData,
    trunk: Any,
    *,
    out_dir: Path,
    augment_ops: list | None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    cached: tuple[Tensor, Tensor] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> HeadResult:
    """Train, evaluate and cost one branch head, and save it under ``out_dir``.

    From images (the frozen prefix runs every step, augmentation possible), or, with
    ``cached``, from the tap's features taken once from the feature cache: no
    augmentation, but no trunk pass per step either.

    Writes the same files as :func:`heads.training.fit.fit_head`: ``out_dir/confusion.png``,
    ``out_dir/history.json`` and the head in ``out_dir/head``, whose stored kwargs are the
    full :func:`heads.branch.branch_kwargs` so :func:`heads.store.load_head` rebuilds it.

    The best epoch is the one with the highest validation accuracy; ties go to the lower
    validation loss, then to the earlier epoch; training stops after ``train.patience``
    epochs without a new best (``<= 0`` disables it) and the best weights are restored.

    Args:
        spec: the head config; ``attach.tap`` is the branch tap, ``module._target_`` a branch class.
        data: its labelled data (image paths).
        trunk: the live :class:`trunk.model.Trunk`; never trained, left in its mode and on its device.
        out_dir: folder for the artifacts (created).
        augment_ops: albumentations ops for training images; None or [] trains on the eval transform.
        device: where to train and time the head; CUDA uses bf16 autocast and channels_last.
        batch_size: images per step; None uses ``train.batch_size``.
        num_workers: data-loader worker processes for decoding.
        progress: show a progress bar over epochs.
        cached: ``(train_x, val_x)``, the tap's features of ``data.train`` and ``data.val``
            in order, shaped ``(N, *tap shape)``; then ``augment_ops`` must be empty.
        on_epoch: receives each epoch's history row (``epoch``, ``train_loss``,
            ``val_loss``, ``val_accuracy``) as soon as it is made (live training curves).

    Returns:
        The trained head (on CPU, eval mode) with its metrics and artifacts;
        ``metrics["train_skipped"]``/``["val_skipped"]`` count unreadable images.

    Raises:
        HeadConfigError: ``attach.tap`` is not a tap the trunk can branch from (field ``attach.tap``).
        ValueError: no readable training or validation images.
    """
    tap = spec.tap
    valid = branch_taps(trunk)
    if tap not in valid:
        raise spec.error("attach.tap", f"cannot branch '{trunk.model_name}' at tap '{tap}'; "
                                       f"valid branch taps: {', '.join(valid)}")
    t = spec.train
    seed = int(t["seed"])
    batch_size = int(batch_size or t["batch_size"])
    dev = torch.device(device)
    config_kwargs = {k: v for k, v in spec.module.items() if not k.startswith("_")}
    full_kwargs = branch_kwargs(trunk, tap, **config_kwargs)
    in_features = int(trunk.tap(tap).channels)

    with seeded_rng(seed, dev):
        module = BranchHead(in_features, len(data.classes), **full_kwargs).init_from_trunk(trunk)
    module.to(dev)
    if dev.type == "cuda":
        module.to(memory_format=torch.channels_last)

    with _frozen_trunk(trunk, dev):
        if cached is None:
            val_x, val_y, val_kept, val_skipped = _val_features(trunk, data, tap, dev, batch_size, num_workers,
                                                                  spec.source)
            loader = _train_loader(data, trunk, augment_ops, seed=seed, batch_size=batch_size,
                                   num_workers=num_workers)
        else:
            if augment_ops:
                raise spec.error("augment", "cached tap features cannot be augmented; train from images instead")
            loader, val_x, val_y, val_kept = _cached_loader(data, cached, seed=seed, batch_size=batch_size,
                                                              source=spec.source)
            val_skipped = 0
        optimiser = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad],
                                      lr=t["lr"], weight_decay=t["weight_decay"])
        counts = {"seen": 0, "skipped": 0, "train_skipped": 0}

        def loss_fn(batch: tuple[Tensor, Tensor, int]) -> tuple[Tensor, int] | None:
            x, y, n_bad = batch
            counts["skipped"] += n_bad
            if not len(x):
                return None
            features = x if cached is not None else _prefix(trunk, x, tap, dev)
            counts["seen"] += len(y)
            return F.cross_entropy(module(to_device(features, dev)).float(), y.to(dev)), len(y)

        def epoch_row(stats: EpochStats) -> dict[str, Any]:
            if not counts["seen"]:
                raise ValueError(f"{spec.source}: no readable training images ({counts['skipped']} unreadable)")
            counts.update(seen=0, skipped=0, train_skipped=counts["skipped"])  # the same files every epoch
            return {"epoch": stats.epoch, "train_loss": stats.train_loss,
                    **val_metrics(_branch_logits(module, val_x, dev), val_y)}

        outcome = fit(module, loader, loss_fn, optimizer=optimiser, epochs=int(t["epochs"]), device=dev,
                      epoch_row=epoch_row, score=val_score, patience=t["patience"], seed=seed,
                      mixed_precision=True, progress=progress, desc=f"train branch {spec.name}",
                      on_epoch=on_epoch)
        train_skipped = counts["train_skipped"]
        logits = _branch_logits(module, val_x, dev)

    module = module.to(memory_format=torch.contiguous_format) if dev.type == "cuda" else module
    # Cost counts only what the branch adds: its suffix and classifier, from the tap's features.
    cost = measure_cost(module, branch_input_shape(trunk, tap), device=dev)
    return finish_head(
        spec, data, module.cpu().eval(), logits, val_y, [s.slice for s in val_kept], cost,
        history=outcome.history, in_features=in_features, trunk_id=trunk.trunk_id, out_dir=out_dir,
        metrics={"best_epoch": outcome.best_epoch, "epochs_run": outcome.epochs_run,
                 "train_size": len(data.train) - train_skipped, "val_size": len(val_y),
                 "train_skipped": train_skipped, "val_skipped": val_skipped},
        module_kwargs=full_kwargs,
        val_paths=[s.path for s in val_kept],
    )
