"""Multi-task trunk training: one shared backbone, one linear classifier per task on ``pooled``.

Training runs on the union of every task's images. Each image carries one label per task,
-1 where it has none, and cross-entropy ignores -1, so an image only contributes loss to
the tasks it is labelled for. The per-task classifiers exist only to shape the trunk;
the result is a new :class:`~trunk.model.Trunk` (a new ``trunk_id``) and the input trunk
is left untouched. Images that cannot be decoded are skipped with a warning and counted;
one bad file never stops a run.

A task may bring validation images (its head's val split, which the caller keeps out of
every task's training images): after each epoch each task's classifier is scored on them
with the trunk's eval transform, no augmentation and no gradients, as ``val_accuracy_<task>``.

Augmentation is seeded per image and epoch (:class:`EpochSeededImages`), so the trunk a
recipe trains does not depend on ``num_workers`` nor, under torchrun, on the number of
processes (:mod:`trunk.distributed`): N ranks train the trunk one process trains.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset
from tqdm import tqdm

from trunk import distributed
from trunk.augment import build_train_transform
from trunk.dataset import ImageDataset, ImageItem, readable
from trunk.decode import ImageError, load_image
from trunk.device import resolve_device
from trunk.loop import EpochStats, cosine_schedule, fit, seeded_rng
from trunk.model import POOLED, Trunk
from trunk.preprocess import eval_transform


@dataclass
class Task:
    """One labelled task the trunk learns.

    Attributes:
        name: task name (e.g. the head name).
        classes: class names; ``labels`` index into them.
        paths: image paths.
        labels: class index per path.
        val_paths: validation image paths (none: no validation figure for this task). They
            must not be training images of any task, or the figure means nothing.
        val_labels: class index per validation path.
    """

    name: str
    classes: list[str]
    paths: list[str]
    labels: list[int]
    val_paths: list[str] = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)


@dataclass
class TrunkTrainResult:
    """What :func:`train_trunk` gives back.

    Attributes:
        trunk: the trained trunk (a new object with a new ``trunk_id``).
        history: one dict per epoch (``epoch``, ``loss``, ``lr``, ``seconds``, and per task
            ``loss_<task>``, ``accuracy_<task>``, and ``val_accuracy_<task>`` for a task with
            validation images).
        metrics: final figures: ``train_loss``, ``train_loss_<task>``,
            ``train_accuracy_<task>``, ``val_accuracy_<task>`` and ``val_images_<task>`` (tasks
            with validation images), ``n_images``, ``skipped_images``, ``train_seconds``.
        skipped: one line per image that could not be decoded (path and reason).
        paths: the training images actually trained on (the decodable ones), in order.
    """

    trunk: Trunk
    history: list[dict]
    metrics: dict[str, float]
    skipped: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def _collate(items: list[ImageItem]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The readable items' pixels and label rows; None when none is readable."""
    items = readable(items)
    if not items:
        return None
    return torch.stack([it.pixels for it in items]), torch.stack([it.target for it in items])


def image_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image ``index`` in ``epoch`` of a run seeded ``seed`` (32 bits)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0])


class EpochSeededImages(Dataset):
    """Item ``(epoch, i)``: image ``i`` of ``dataset``, its augmentation reseeded by :func:`image_seed` first.

    So an image's augmentation in an epoch depends on the run's seed, the epoch and the
    image's position alone: not on which process, rank or loader worker decodes it, nor on
    what that process decoded before. That is what lets N ranks, or any ``num_workers``,
    train the very trunk one process trains.
    """

    def __init__(self, dataset: ImageDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> ImageItem:
        epoch, i = key
        self.dataset.reseed(image_seed(self.seed, epoch, i))
        return self.dataset[i]


class GlobalBatches(Sampler[list]):
    """Batches of ``(epoch, index)`` keys: the single-process order's global batches, this rank's share of each.

    Every rank draws the same seeded order (one :class:`~torch.utils.data.RandomSampler`
    pass per epoch) and cuts it into global batches of ``batch_size``; a rank keeps its
    :func:`trunk.distributed.share` of each. Alone, the share is the whole batch.

    Attributes:
        ranks: the run's ranks (None: one process); :func:`trunk.distributed.ranks_of` reads it.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int, drop_last: bool,
                 ranks: distributed.Ranks | None) -> None:
        self.order = RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
        self.n = n
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.ranks = ranks
        self.epoch = 0

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        self.epoch += 1
        order = list(self.order)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield [(self.epoch, i) for i in distributed.share(batch, self.ranks)]


def training_loader(dataset: ImageDataset, collate_fn, *, batch_size: int, num_workers: int, seed: int,
                    device: torch.device) -> DataLoader:
    """Seeded, shuffled training batches of augmented images, augmentation seeded per image and epoch.

    Shared by trunk training and distillation. In a data-parallel run (one rank of a
    torchrun group, :func:`trunk.distributed.current`) each rank loads its share of every
    global batch; every rank must get at least one image of each.
    """
    ranks = distributed.current()
    # A last batch of one image breaks batch norm; drop it when there is more than one batch.
    drop_last = len(dataset) > batch_size
    if ranks is not None and min(batch_size, len(dataset)) < ranks.world_size:
        raise ValueError(f"field 'batch_size': {ranks.world_size} processes need a global batch of at least "
                         f"{ranks.world_size} images; got batch_size {batch_size} over {len(dataset)} images")
    sampler = GlobalBatches(len(dataset), batch_size=batch_size, seed=seed, drop_last=drop_last, ranks=ranks)
    return DataLoader(
        EpochSeededImages(dataset, seed), batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
        # The workers' own seeds no longer reach the augmentation; a generator keeps them off the global stream.
        generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda",
    )


def check_settings(epochs: int, batch_size: int, num_workers: int) -> None:
    """One line naming the settings when any is out of range. Shared by trunk training and distillation."""
    if epochs < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError(
            f"need epochs >= 1, batch_size >= 1, num_workers >= 0; got {epochs}, {batch_size}, {num_workers}"
        )


def image_training(
    data_config: Mapping[str, Any],
    paths: Sequence[str],
    targets: torch.Tensor | None,
    collate_fn,
    modules: Sequence[nn.Module],
    *,
    augment_ops: Sequence[Mapping[str, Any]] | None,
    seed: int,
    batch_size: int,
    num_workers: int,
    lr: float,
    weight_decay: float,
    epochs: int,
    device: torch.device,
) -> tuple[DataLoader, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The augmented loader, AdamW over ``modules`` and the per-step cosine schedule.

    Shared by trunk training and distillation. Called inside the run's :func:`seeded_rng`,
    after the modules are built, so the random draws keep their order.

    Args:
        data_config: the trunk's data config (the eval transform after augmentation).
        paths: the training images.
        targets: one target row per path (None: images only).
        collate_fn: list of items -> batch.
        modules: every module whose parameters train, in order.
        augment_ops, seed, batch_size, num_workers, lr, weight_decay, epochs: as the callers take them.
        device: where training runs (pinned batches on CUDA).
    """
    transform = build_train_transform(data_config, augment_ops, seed=seed)
    loader = training_loader(ImageDataset(paths, transform, targets=targets), collate_fn, batch_size=batch_size,
                             num_workers=num_workers, seed=seed, device=device)
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return loader, optimizer, cosine_schedule(optimizer, epochs * len(loader))


def trained_trunk(model: Trunk, start: Trunk) -> Trunk:
    """A new :class:`Trunk` (a new ``trunk_id``) with ``model``'s trained weights and ``start``'s settings."""
    state = {k: v.detach().cpu() for k, v in model.model.state_dict().items()}
    return Trunk(start.model_name, data_config=start.data_config, model_kwargs=start.model_kwargs, state_dict=state)


def _check_tasks(tasks: Sequence[Task]) -> None:
    if not tasks:
        raise ValueError("train_trunk needs at least one task")
    seen: set[str] = set()
    for t in tasks:
        if t.name in seen:
            raise ValueError(f"task '{t.name}' is given twice")
        seen.add(t.name)
        if len(t.classes) < 2:
            raise ValueError(f"task '{t.name}': field 'classes' needs at least 2 classes, got {len(t.classes)}")
        if len(t.paths) != len(t.labels):
            raise ValueError(f"task '{t.name}': {len(t.paths)} paths but {len(t.labels)} labels")
        if len(t.val_paths) != len(t.val_labels):
            raise ValueError(f"task '{t.name}': {len(t.val_paths)} val_paths but {len(t.val_labels)} val_labels")
        if not t.paths:
            raise ValueError(f"task '{t.name}': no labelled images")
        bad = next((y for y in t.labels if not 0 <= int(y) < len(t.classes)), None)
        if bad is not None:
            raise ValueError(f"task '{t.name}': field 'labels' has {bad}, outside 0..{len(t.classes) - 1}")
        bad = next((y for y in t.val_labels if not 0 <= int(y) < len(t.classes)), None)
        if bad is not None:
            raise ValueError(f"task '{t.name}': field 'val_labels' has {bad}, outside 0..{len(t.classes) - 1}")


def _union(tasks: Sequence[Task]) -> tuple[list[str], torch.Tensor]:
    """Every image once, with its label per task (-1: no label for that task)."""
    index: dict[str, int] = {}
    paths: list[str] = []
    rows: list[list[int]] = []
    for j, task in enumerate(tasks):
        for path, label in zip(task.paths, task.labels):
            # Two manifests may spell one file differently (../images/x.png vs /abs/images/x.png).
            key = os.path.normpath(os.path.abspath(path))
            i = index.get(key)
            if i is None:
                i = index[key] = len(paths)
                paths.append(str(path))
                rows.append([-1] * len(tasks))
            if rows[i][j] not in (-1, int(label)):
                raise ValueError(f"task '{task.name}': image {path} has two different labels")
            rows[i][j] = int(label)
    return paths, torch.tensor(rows, dtype=torch.long)


def _decodable(paths: list[str], labels: torch.Tensor, progress: bool) -> tuple[list[str], torch.Tensor, list[str]]:
    """The paths that decode (with their label rows) and one line per one that does not.

    In a data-parallel run each rank checks its share of the paths and the ranks sum
    their verdicts; the few failures are read again on every rank for their reasons.
    """
    ranks = distributed.current()
    mine = range(len(paths)) if ranks is None else range(ranks.rank, len(paths), ranks.world_size)
    bad = torch.zeros(len(paths), dtype=torch.int64)
    reasons: dict[int, str] = {}
    show = progress and distributed.is_main()
    for i in tqdm(mine, desc="checking images", unit="img", disable=not show, leave=False):
        try:
            load_image(paths[i])
        except ImageError as e:
            bad[i] = 1
            reasons[i] = e.reason
            warnings.warn(f"skipping image {paths[i]}: {e}", stacklevel=3)
    bad = distributed.all_sum(bad, ranks)
    skipped: list[str] = []
    for i in torch.nonzero(bad).flatten().tolist():
        if i not in reasons:  # another rank found it
            try:
                load_image(paths[i])
                reasons[i] = "unreadable on another rank"
            except ImageError as e:
                reasons[i] = e.reason
        skipped.append(f"{paths[i]}: {reasons[i]}")
    keep = [i for i in range(len(paths)) if not bad[i]]
    return [paths[i] for i in keep], labels[keep], skipped


def _val_loaders(tasks: Sequence[Task], data_config: Mapping[str, Any], *, batch_size: int,
                 num_workers: int) -> dict[int, DataLoader]:
    """Per task index with validation images: an unshuffled loader of eval-transformed images.

    In a data-parallel run each rank scores every ``world_size``-th image from its rank on.
    """
    transform = eval_transform(data_config)
    ranks = distributed.current()
    loaders = {}
    for j, task in enumerate(tasks):
        if task.val_paths:
            dataset = ImageDataset(list(task.val_paths), transform, targets=torch.tensor(task.val_labels))
            if ranks is not None:
                dataset = Subset(dataset, range(ranks.rank, len(dataset), ranks.world_size))
            # A generator of its own: making the loader's iterator draws a seed, which must not
            # come from the (seeded) global stream training draws from.
            loaders[j] = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                    collate_fn=_collate, generator=torch.Generator().manual_seed(0))
    return loaders


@torch.no_grad()
def _val_correct(model: Trunk, classifier: nn.Module, loader: DataLoader, device: torch.device) -> tuple[int, int]:
    """How many images over ``loader`` ``classifier`` gets right on the trunk's pooled features, of how many."""
    correct = n = 0
    for batch in loader:
        if batch is None:
            continue  # no readable image in this batch
        x, y = batch[0].to(device), batch[1].to(device)
        correct += int((classifier(model(x, [POOLED])[POOLED]).argmax(1) == y).sum())
        n += len(y)
    return correct, n


def train_trunk(
    trunk: Trunk,
    tasks: Sequence[Task],
    *,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    augment_ops: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrunkTrainResult:
    """Train a copy of ``trunk`` on several classification tasks at once.

    Args:
        trunk: the starting trunk; it is not modified.
        tasks: labelled tasks; an image may appear in any subset of them.
        epochs: passes over the union of images.
        batch_size: images per step.
        lr: peak learning rate of AdamW, decayed to 0 on a cosine over all steps.
        weight_decay: AdamW weight decay.
        augment_ops: albumentations ops as config entries (see :mod:`trunk.augment`).
        seed: seeds classifier init, shuffling and augmentation; global RNGs are left as found.
        device: ``cpu``, ``cuda[:n]`` or ``auto`` (see :func:`trunk.device.resolve_device`).
        num_workers: data-loader worker processes (0: decode in this process).
        progress: a progress bar per epoch.
        on_epoch: receives each epoch's history row (see :attr:`TrunkTrainResult.history`)
            as soon as it is made, so a job can log the curves live.

    Each task's validation images (if any) are scored after every epoch, the model in eval
    mode, with the trunk's eval transform; they never add loss.

    Under torchrun (:mod:`trunk.distributed`) every rank calls this with the same
    arguments: each trains on its share of every global batch, and all of them end with the
    weights one process would have trained (up to float summation order) and the same
    history and metrics. ``on_epoch`` is called on every rank; pass it on rank 0 only.

    Returns:
        The new trunk, per-epoch history and final metrics.

    Raises:
        ValueError: bad tasks or settings, or no image could be decoded.
    """
    check_settings(epochs, batch_size, num_workers)
    _check_tasks(tasks)
    dev = resolve_device(device)  # a bad name fails here, before every image is decoded
    started = time.perf_counter()
    paths, labels = _union(tasks)
    paths, labels, skipped = _decodable(paths, labels, progress)
    if not paths:
        raise ValueError(f"none of the {len(skipped)} training images could be decoded (first: {skipped[0]})")

    with seeded_rng(seed, dev):
        model = copy.deepcopy(trunk).to(dev).train()
        width = trunk.tap(POOLED).channels
        # A list, not a ModuleDict: task names need not be valid attribute names.
        classifiers = nn.ModuleList([nn.Linear(width, len(t.classes)) for t in tasks]).to(dev).train()
        loader, optimizer, schedule = image_training(
            trunk.data_config, paths, labels, _collate, [model, classifiers], augment_ops=augment_ops, seed=seed,
            batch_size=batch_size, num_workers=num_workers, lr=lr, weight_decay=weight_decay, epochs=epochs,
            device=dev)
        loss_fn = nn.CrossEntropyLoss(ignore_index=-1, reduction="sum")
        val_loaders = _val_loaders(tasks, trunk.data_config, batch_size=batch_size, num_workers=num_workers)
        val_counts: dict[str, int] = {}
        sums = {t.name: {"loss": 0.0, "correct": 0, "n": 0} for t in tasks}

        ranks = distributed.current()
        world = 1 if ranks is None else ranks.world_size

        def step_loss(batch: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, int] | None:
            if batch is None:
                return None
            x, y = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
            # Each task's loss is its mean over the global batch's labelled images: the counts
            # are the run's, the sums this rank's share.
            local = (y >= 0).sum(0)
            counts = distributed.all_sum(local, ranks).tolist()
            local = local.tolist()
            pooled = model(x, [POOLED])[POOLED]
            loss = pooled.new_zeros(())
            for j, task in enumerate(tasks):
                yj = y[:, j]
                labelled = int(counts[j])
                if labelled == 0:
                    continue  # a mean over no labels is NaN; this task just sits the batch out
                logits = classifiers[j](pooled)
                task_loss = loss_fn(logits, yj) / labelled
                loss = loss + task_loss
                with torch.no_grad():
                    mask = yj >= 0
                    s = sums[task.name]
                    s["loss"] += float(task_loss.detach()) * labelled
                    s["correct"] += int((logits.argmax(1)[mask] == yj[mask]).sum())
                    s["n"] += int(local[j])
            # The epoch's loss is the mean over steps: each step counts 1. The loop averages
            # the ranks' losses (and gradients) with equal counts, so each rank's share of
            # the global loss counts world times: the average is the global batch's loss.
            return (loss * world if world > 1 else loss), 1

        def epoch_row(stats: EpochStats) -> dict[str, Any]:
            row: dict[str, Any] = {"epoch": stats.epoch, "loss": stats.train_loss,
                                   "lr": optimizer.param_groups[0]["lr"], "seconds": stats.seconds}
            flat = distributed.reduce_sums({f"{k}/{j}": v for j, s in enumerate(sums.values()) for k, v in s.items()},
                                           ranks)
            for j, (name, s) in enumerate(sums.items()):
                n = max(flat[f"n/{j}"], 1)
                row[f"loss_{name}"] = flat[f"loss/{j}"] / n
                row[f"accuracy_{name}"] = flat[f"correct/{j}"] / n
                s.update(loss=0.0, correct=0, n=0)
            if val_loaders:
                # Batch norm on its running statistics, as the trunk's features are served.
                model.eval()
                classifiers.eval()
                for j, loader in val_loaders.items():
                    correct, n = _val_correct(model, classifiers[j], loader, dev)
                    total = distributed.reduce_sums({"correct": correct, "n": n}, ranks)
                    val_counts[tasks[j].name] = total["n"]
                    row[f"val_accuracy_{tasks[j].name}"] = total["correct"] / max(total["n"], 1)
                model.train()
                classifiers.train()
            return row

        history = fit(nn.ModuleList([model, classifiers]), loader, step_loss, optimizer=optimizer, epochs=epochs,
                      device=dev, scheduler=schedule, epoch_row=epoch_row, progress=progress,
                      desc="trunk", on_epoch=on_epoch).history

    new = trained_trunk(model, trunk)
    last = history[-1]
    metrics: dict[str, float] = {"train_loss": float(last["loss"])}
    for t in tasks:
        metrics[f"train_loss_{t.name}"] = float(last[f"loss_{t.name}"])
        metrics[f"train_accuracy_{t.name}"] = float(last[f"accuracy_{t.name}"])
        if f"val_accuracy_{t.name}" in last:
            metrics[f"val_accuracy_{t.name}"] = float(last[f"val_accuracy_{t.name}"])
            metrics[f"val_images_{t.name}"] = float(val_counts[t.name])
    metrics.update(n_images=float(len(paths)), skipped_images=float(len(skipped)),
                   train_seconds=time.perf_counter() - started)
    return TrunkTrainResult(trunk=new, history=history, metrics=metrics, skipped=skipped, paths=list(paths))
