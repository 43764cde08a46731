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
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from heads.branch import BranchHead, branch_input, branch_input_shape, branch_kwargs, branch_taps
from heads.cost import measure_cost
from heads.data import LabelledData, Sample
from heads.fit import finish_head
from heads.result import HeadResult
from heads.spec import HeadSpec
from heads.train import seeded_rng
from trunk.augment import build_train_transform
from trunk.decode import ImageError, load_image
from trunk.preprocess import eval_transform

# Validation batches through the prefix and the branch; feature maps are larger than
# pooled vectors, so chunks are smaller than heads.train.EVAL_CHUNK.
EVAL_BATCH = 256


class ImageSamples(Dataset):
    """Decoded, transformed images of labelled samples; unreadable files are flagged, not raised.

    Items are ``(image (3, H, W), label, ok)``; ``ok`` is False for a file that could not
    be read or decoded (the image is then zeros of the right shape), so one bad file never
    stops a job. :func:`collate_readable` drops them from the batch.
    """

    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], Tensor],
                 input_size: tuple[int, int, int]) -> None:
        self.samples = samples
        self.transform = transform
        self.input_size = tuple(int(v) for v in input_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, bool]:
        sample = self.samples[index]
        try:
            image, _ = load_image(sample.path)
        except (ImageError, OSError):
            return torch.zeros(self.input_size), sample.label, False
        return self.transform(image), sample.label, True


def collate_readable(batch: list[tuple[Tensor, int, bool]]) -> tuple[Tensor, Tensor, int]:
    """Stack the readable items of a batch: ``(images, labels, n_skipped)``."""
    kept = [(x, y) for x, y, ok in batch if ok]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    return torch.stack([x for x, _ in kept]), torch.tensor([y for _, y in kept], dtype=torch.long), skipped


def _as_list(batch: list) -> list:
    # Keeps the ok flags per item: validation needs to know which samples (and slices) survive.
    return batch


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 autocast on CUDA only: on CPU it is slow and would break bit-exact reproducibility.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _prefix(trunk: nn.Module, x: Tensor, tap: str, device: torch.device) -> Tensor:
    """The frozen shared prefix's tap features for a batch of images, float32."""
    with torch.no_grad(), _autocast(device):
        return branch_input(trunk, _to_device(x, device), tap).float()


def _val_features(trunk: nn.Module, data: LabelledData, tap: str, device: torch.device, batch_size: int,
                  num_workers: int, source: str) -> tuple[Tensor, Tensor, list[str | None], int]:
    """Decode the validation images once and keep their tap features (CPU, float32)."""
    dataset = ImageSamples(data.val, eval_transform(trunk.data_config), trunk.data_config["input_size"])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_as_list)
    feats, labels, slices, skipped = [], [], [], 0
    start = 0
    for batch in loader:
        keep = [i for i, (_, _, ok) in enumerate(batch) if ok]
        skipped += len(batch) - len(keep)
        slices += [data.val[start + i].slice for i in keep]
        start += len(batch)
        x, y, _ = collate_readable(batch)
        if len(x):
            feats.append(_prefix(trunk, x, tap, device).cpu())
            labels.append(y)
    if not feats:
        raise ValueError(f"{source}: no readable validation images ({skipped} unreadable)")
    return torch.cat(feats), torch.cat(labels), slices, skipped


@torch.no_grad()
def _branch_logits(module: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    module.eval()
    out = []
    for i in range(0, len(x), EVAL_BATCH):
        with _autocast(device):
            out.append(module(_to_device(x[i:i + EVAL_BATCH], device)).float().cpu())
    return torch.cat(out)


def _seed_worker(worker_id: int) -> None:
    # Each worker reseeds its own copy of the augmentation pipeline, from the head's seed.
    info = torch.utils.data.get_worker_info()
    transform = info.dataset.transform
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(int(info.seed % 2**31))


def _train_loader(data: LabelledData, trunk: nn.Module, augment_ops: list | None, *, seed: int, batch_size: int,
                  num_workers: int) -> DataLoader:
    if augment_ops:
        transform = build_train_transform(trunk.data_config, augment_ops, seed=seed)
    else:
        transform = eval_transform(trunk.data_config)
    dataset = ImageSamples(data.train, transform, trunk.data_config["input_size"])
    # The order has its own generator: the loader's one also seeds workers, and draws from it
    # differ with and without (persistent) workers, which would change the order.
    order = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(
        dataset, batch_size=batch_size, sampler=order, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed + 1), collate_fn=collate_readable,
        worker_init_fn=_seed_worker if num_workers else None, persistent_workers=num_workers > 0,
        pin_memory=False, drop_last=False,
    )


def _cached_loader(data: LabelledData, cached: tuple[Tensor, Tensor], *, seed: int, batch_size: int, source: str):
    """Batches ``(features, labels, 0)`` over cached training features, shuffled by ``seed``."""
    train_x, val_x = cached
    if len(train_x) != len(data.train) or len(val_x) != len(data.val):
        raise ValueError(f"{source}: cached features ({len(train_x)} train, {len(val_x)} val) do not match the "
                         f"data ({len(data.train)} train, {len(data.val)} val)")
    train_y = torch.tensor([s.label for s in data.train])
    val_y = torch.tensor([s.label for s in data.val])
    batches = _TensorBatches(train_x, train_y, batch_size, torch.Generator().manual_seed(seed))
    return batches, val_x.float(), val_y, [s.slice for s in data.val]


class _TensorBatches:
    """Shuffled mini-batches over in-memory features, a new seeded order each epoch."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        # The same sampler as training from images, so both paths see the same batches.
        self.order = RandomSampler(range(len(x)), generator=generator)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int]]:
        order = torch.tensor(list(self.order))
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x[idx].float(), self.y[idx], 0


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
) -> HeadResult:
    """Train, evaluate and cost one branch head, and save it under ``out_dir``.

    From images (the frozen prefix runs every step, augmentation possible), or, with
    ``cached``, from the tap's features taken once from the feature cache: no
    augmentation, but no trunk pass per step either.

    Writes the same files as :func:`heads.fit.fit_head`: ``out_dir/confusion.png``,
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
            val_x, val_y, val_slices, val_skipped = _val_features(trunk, data, tap, dev, batch_size, num_workers,
                                                                  spec.source)
            loader = _train_loader(data, trunk, augment_ops, seed=seed, batch_size=batch_size,
                                   num_workers=num_workers)
        else:
            if augment_ops:
                raise spec.error("augment", "cached tap features cannot be augmented; train from images instead")
            loader, val_x, val_y, val_slices = _cached_loader(data, cached, seed=seed, batch_size=batch_size,
                                                              source=spec.source)
            val_skipped = 0
        optimiser = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad],
                                      lr=t["lr"], weight_decay=t["weight_decay"])
        history: list[dict[str, Any]] = []
        best: tuple[float, float] | None = None  # (accuracy, -loss): larger is better
        best_epoch, best_state, train_skipped = 0, None, 0
        epochs = range(1, int(t["epochs"]) + 1)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(epochs, desc=f"train branch {spec.name}", unit="epoch")
            epochs = bar
        with seeded_rng(seed, dev):
            for epoch in epochs:
                module.train()
                total, seen, skipped = 0.0, 0, 0
                for x, y, n_bad in loader:
                    skipped += n_bad
                    if not len(x):
                        continue
                    features = x if cached is not None else _prefix(trunk, x, tap, dev)
                    with _autocast(dev):
                        loss = F.cross_entropy(module(_to_device(features, dev)).float(), y.to(dev))
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    total += loss.item() * len(y)
                    seen += len(y)
                if not seen:
                    raise ValueError(f"{spec.source}: no readable training images ({skipped} unreadable)")
                train_skipped = skipped  # the same files every epoch
                logits = _branch_logits(module, val_x, dev)
                val_loss = F.cross_entropy(logits, val_y).item()
                val_acc = (logits.argmax(1) == val_y).float().mean().item()
                history.append({"epoch": epoch, "train_loss": total / seen, "val_loss": val_loss,
                                "val_accuracy": val_acc})
                if best is None or (val_acc, -val_loss) > best:
                    best, best_epoch = (val_acc, -val_loss), epoch
                    best_state = copy.deepcopy(module.state_dict())
                if bar is not None:
                    bar.set_postfix(loss=f"{total / seen:.4f}", val_acc=f"{val_acc:.4f}", best=best_epoch)
                if t["patience"] > 0 and epoch - best_epoch >= t["patience"]:
                    break
        if bar is not None:
            bar.close()
        module.load_state_dict(best_state)
        logits = _branch_logits(module, val_x, dev)

    module = module.to(memory_format=torch.contiguous_format) if dev.type == "cuda" else module
    # Cost counts only what the branch adds: its suffix and classifier, from the tap's features.
    cost = measure_cost(module, branch_input_shape(trunk, tap), device=dev)
    return finish_head(
        spec, data, module.cpu().eval(), logits, val_y, val_slices, cost,
        history=history, in_features=in_features, trunk_id=trunk.trunk_id, out_dir=out_dir,
        metrics={"best_epoch": best_epoch, "epochs_run": len(history), "train_size": len(data.train) - train_skipped,
                 "val_size": len(val_y), "train_skipped": train_skipped, "val_skipped": val_skipped},
        module_kwargs=full_kwargs,
    )
