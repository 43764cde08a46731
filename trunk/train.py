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
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from trunk.augment import build_train_transform
from trunk.dataset import ImageDataset, ImageItem, readable
from trunk.decode import ImageError, load_image
from trunk.device import resolve_device
from trunk.loop import EpochStats, cosine_schedule, fit, seeded_rng, shuffled_loader
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


def training_loader(dataset: ImageDataset, collate_fn, *, batch_size: int, num_workers: int, seed: int,
                    device: torch.device) -> DataLoader:
    """Seeded, shuffled training batches of augmented images, each worker with its own augmentation stream.

    Shared by trunk training and distillation.
    """
    return shuffled_loader(
        dataset, batch_size=batch_size, seed=seed, collate_fn=collate_fn, num_workers=num_workers,
        # A last batch of one image breaks batch norm; drop it when there is more than one batch.
        drop_last=len(dataset) > batch_size,
        pin_memory=device.type == "cuda",
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
    keep: list[int] = []
    skipped: list[str] = []
    for i, path in enumerate(tqdm(paths, desc="checking images", unit="img", disable=not progress, leave=False)):
        try:
            load_image(path)
        except ImageError as e:
            skipped.append(f"{path}: {e.reason}")
            warnings.warn(f"skipping image {path}: {e}", stacklevel=3)
            continue
        keep.append(i)
    return [paths[i] for i in keep], labels[keep], skipped


def _val_loaders(tasks: Sequence[Task], data_config: Mapping[str, Any], *, batch_size: int,
                 num_workers: int) -> dict[int, DataLoader]:
    """Per task index with validation images: an unshuffled loader of eval-transformed images."""
    transform = eval_transform(data_config)
    loaders = {}
    for j, task in enumerate(tasks):
        if task.val_paths:
            dataset = ImageDataset(list(task.val_paths), transform, targets=torch.tensor(task.val_labels))
            # A generator of its own: making the loader's iterator draws a seed, which must not
            # come from the (seeded) global stream training draws from.
            loaders[j] = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                    collate_fn=_collate, generator=torch.Generator().manual_seed(0))
    return loaders


@torch.no_grad()
def _val_accuracy(model: Trunk, classifier: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, int]:
    """Accuracy of ``classifier`` on the trunk's pooled features over ``loader``, and how many images counted."""
    correct = n = 0
    for batch in loader:
        if batch is None:
            continue  # no readable image in this batch
        x, y = batch[0].to(device), batch[1].to(device)
        correct += int((classifier(model(x, [POOLED])[POOLED]).argmax(1) == y).sum())
        n += len(y)
    return correct / max(n, 1), n


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

        def step_loss(batch: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, int] | None:
            if batch is None:
                return None
            x, y = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
            pooled = model(x, [POOLED])[POOLED]
            loss = pooled.new_zeros(())
            for j, task in enumerate(tasks):
                yj = y[:, j]
                labelled = int((yj >= 0).sum())
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
                    s["n"] += labelled
            # The epoch's loss is the mean over steps: each step counts 1.
            return loss, 1

        def epoch_row(stats: EpochStats) -> dict[str, Any]:
            row: dict[str, Any] = {"epoch": stats.epoch, "loss": stats.train_loss,
                                   "lr": optimizer.param_groups[0]["lr"], "seconds": stats.seconds}
            for name, s in sums.items():
                row[f"loss_{name}"] = s["loss"] / max(s["n"], 1)
                row[f"accuracy_{name}"] = s["correct"] / max(s["n"], 1)
                s.update(loss=0.0, correct=0, n=0)
            if val_loaders:
                # Batch norm on its running statistics, as the trunk's features are served.
                model.eval()
                classifiers.eval()
                for j, loader in val_loaders.items():
                    accuracy, val_counts[tasks[j].name] = _val_accuracy(model, classifiers[j], loader, dev)
                    row[f"val_accuracy_{tasks[j].name}"] = accuracy
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
