"""The one training loop of the platform, and the few pieces every caller of it shares.

Pooled heads on cached features, branch heads from images, multi-task trunk training,
distillation and the head-training benchmark all run :func:`fit`. A caller supplies its
model, its batches (anything iterable once per epoch: a :class:`TensorBatches`, a
:func:`shuffled_loader`, a list) and its loss; optionally a function that turns an
epoch's figures into its history row (validation metrics, say) and a score that picks
the best epoch. The loop owns the rest: train mode, the optimiser (and scheduler) step,
bf16 autocast on CUDA, the seeded random stream, early stopping, restoring the best
epoch's weights, the progress bar and the per-epoch log line. A caller that wants each
epoch's row as it is made (to log training curves live) passes ``on_epoch``, a plain
callable: the loop knows nothing of where the row goes.

Reproducible on CPU: with ``seed`` the loop runs inside :func:`seeded_rng`, so dropout
draws from a stream that depends only on the seed and the caller's random state is left
as found; shuffling draws from generators of its own (:class:`EpochPermutation`,
:func:`shuffled_loader`), so the order does not depend on the device either.

Data-parallel (torchrun): a loop over one rank's shares of global batches combines the
ranks' gradients, batch-norm statistics and figures so that the step is one process's;
the plumbing is :mod:`trunk.distributed`, and :func:`fit` says what a caller must do.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from trunk import distributed
from trunk.dataset import reseed_worker

logger = logging.getLogger(__name__)

@dataclass
class EpochStats:
    """What the loop measured in one epoch's training pass.

    Attributes:
        epoch: 1-based epoch number.
        train_loss: the mean of the batches' losses, each weighted by its count
            (0.0 when every batch was skipped).
        seen: the sum of the counts (examples, or steps for a caller counting 1 per step).
        steps: optimiser steps taken.
        seconds: wall time of the training pass.
    """

    epoch: int
    train_loss: float
    seen: int
    steps: int
    seconds: float


@dataclass
class FitOutcome:
    """What :func:`fit` did.

    Attributes:
        best_epoch: the 1-based epoch whose weights the model holds at the end: the best
            one by ``score``, or the last one without a score (0 when no epoch ran).
        epochs_run: epochs actually trained (fewer than asked when stopped early).
        history: one row per epoch, as ``epoch_row`` made it.
    """

    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _default_row(stats: EpochStats) -> dict[str, Any]:
    return {"epoch": stats.epoch, "train_loss": stats.train_loss}


@contextlib.contextmanager
def seeded_rng(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """A context in which torch's global RNG (and the CUDA device's) is seeded, then restored.

    Args:
        seed: the seed of the stream inside the context.
        device: a CUDA device's RNG is forked too, so GPU dropout is reproducible as well.
    """
    dev = torch.device(device)
    devices = []
    if dev.type == "cuda":
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing elsewhere.

    On the CPU autocast is slow and would break bit-exact reproducibility.
    """
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on ``device``; image batches in channels_last on CUDA, where convolutions run faster so."""
    x = x.to(device, non_blocking=True)
    if torch.device(device).type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def predict(module: nn.Module, x: Tensor, device: torch.device, *, chunk: int,
            mixed_precision: bool = False) -> Tensor:
    """Float32 outputs of ``module`` (put in eval mode) on ``x``, in chunks, on the CPU.

    Chunks keep a large validation set from needing one huge activation.

    Args:
        module: the model, already on ``device``.
        x: inputs, any float dtype (fp16 cache rows are upcast first).
        device: where to run.
        chunk: rows per forward pass.
        mixed_precision: run under :func:`autocast` (CUDA only).
    """
    module.eval()
    out = []
    for i in range(0, len(x), chunk):
        with autocast(device) if mixed_precision else contextlib.nullcontext():
            out.append(module(to_device(x[i:i + chunk].float(), device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


class EpochPermutation(Sampler[int]):
    """A new seeded permutation of ``range(n)`` each epoch: one ``torch.randperm`` per pass.

    Unlike :class:`torch.utils.data.RandomSampler`, which draws a second (empty)
    permutation at the end of every pass, so the two give different orders from the
    second epoch on; each caller keeps the one its trained artifacts were made with.
    """

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=self.generator).tolist()


class TensorBatches:
    """Mini-batches of in-memory tensors, in a new order each epoch.

    Each item is a tuple with one slice of every tensor, rows chosen by ``order``.
    """

    def __init__(self, tensors: Sequence[Tensor], batch_size: int, order: Iterable[int]) -> None:
        """
        Args:
            tensors: tensors with the same first dimension (features, labels, ...).
            batch_size: rows per batch; the last batch may be smaller.
            order: iterated once per epoch for the row order (a seeded sampler).
        """
        if len({len(t) for t in tensors}) > 1:
            raise ValueError(f"tensors differ in length: {[len(t) for t in tensors]}")
        self.tensors = tuple(tensors)
        self.batch_size = batch_size
        self.order = order

    def __len__(self) -> int:
        return math.ceil(len(self.tensors[0]) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        order = torch.tensor(list(self.order), dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield tuple(t[idx] for t in self.tensors)


def shuffled_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    collate_fn: Callable[[list], Any],
    num_workers: int = 0,
    order_seed: int | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    worker_seed_bits: int = 32,
) -> DataLoader:
    """A seeded, shuffled training loader; each worker reseeds its copy of the dataset's augmentation.

    Args:
        dataset: a :class:`trunk.dataset.ImageDataset` (or any dataset with ``reseed``).
        batch_size: items per batch.
        seed: seeds the loader's generator, which seeds the workers (and, without
            ``order_seed``, the order too).
        collate_fn: list of items -> batch.
        num_workers: decoding processes; 0 decodes in this process.
        order_seed: seeds a generator of the order's own, so the order does not depend
            on the draws the workers' seeds take (which differ with persistent workers);
            None shares ``seed``'s generator.
        drop_last: drop a short last batch.
        pin_memory: page-locked batches for a fast copy to a GPU.
        persistent_workers: keep workers between epochs.
        worker_seed_bits: each worker seeds its augmentation with its torch seed modulo
            ``2**worker_seed_bits`` (branch heads were trained with 31, trunks with 32).
    """
    generator = torch.Generator().manual_seed(seed)
    order = generator if order_seed is None else torch.Generator().manual_seed(order_seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=order),
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_fn,
        worker_init_fn=functools.partial(reseed_worker, seed_bits=worker_seed_bits) if num_workers else None,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Peak learning rate decayed to 0 on a half cosine over ``steps`` optimiser steps."""
    total_steps = max(1, steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )


def _train_pass(model: nn.Module, batches: Iterable, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                scheduler: Any, device: torch.device, mixed_precision: bool, bar: Any,
                ranks: distributed.Ranks | None = None) -> tuple[float, int, int]:
    """One pass over ``batches``: ``(weighted loss sum, count, steps)``, summed over the ranks of a run."""
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]] if ranks is not None else []
    # Losses stay on the device until the epoch ends: reading one per step would wait for
    # the GPU at every step.
    losses: list[Tensor] = []
    counts: list[int] = []
    for batch in batches:
        # Every rank takes every step: a rank whose share of a global batch is unreadable
        # would leave the others waiting in a collective, so the whole global batch is skipped.
        if ranks is not None and not distributed.everyone(batch is not None, ranks):
            logger.warning("rank %d: a global batch with no readable image on some rank is skipped", ranks.rank)
            continue
        with autocast(device) if mixed_precision else contextlib.nullcontext():
            step = loss_fn(batch)
        if step is None:
            if ranks is not None:
                raise RuntimeError(f"rank {ranks.rank}: loss_fn skipped a batch in a data-parallel run; every "
                                   f"rank must take every step")
            continue
        loss, count = step
        optimizer.zero_grad(set_to_none=True)
        if ranks is None:
            loss.backward()
        else:  # weighted before the backward: see combine_gradients
            (loss * float(count)).backward()
            distributed.combine_gradients(params, count, ranks)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
        counts.append(int(count))
        if bar is not None:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    total = 0.0
    # Summed in Python floats, in step order: the same figure as adding loss.item() each step.
    for value, count in zip(torch.stack(losses).tolist() if losses else [], counts):
        total += value * count
    seen = sum(counts)
    if ranks is not None:
        summed = distributed.reduce_sums({"total": total, "seen": float(seen)}, ranks)
        total, seen = summed["total"], int(round(summed["seen"]))
    return total, seen, len(counts)


def fit(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[Any], tuple[Tensor, int] | None],
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: str | torch.device = "cpu",
    scheduler: Any = None,
    epoch_row: Callable[[EpochStats], dict[str, Any]] | None = None,
    score: Callable[[dict[str, Any]], Any] | None = None,
    patience: int = 0,
    seed: int | None = None,
    mixed_precision: bool = False,
    progress: bool = False,
    desc: str = "train",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitOutcome:
    """Train ``model`` in place for up to ``epochs`` passes over ``batches``.

    Each epoch: ``model.train()``; for every batch, ``loss_fn(batch)``, then zero the
    gradients, backward, ``optimizer.step()`` and ``scheduler.step()`` (a per-step
    schedule); then ``epoch_row`` makes the epoch's history row (it may validate, and it
    may raise to end the run). With ``score`` the best row (largest score; ties go to the
    earlier epoch) is remembered, training stops after ``patience`` epochs without a new
    best, and the best epoch's weights are loaded back at the end. The model's mode is
    left as the last epoch (or ``epoch_row``) left it.

    Args:
        model: what trains; every module whose train/eval mode the loop should set (not a
            frozen teacher). Already on ``device``.
        batches: iterated once per epoch.
        loss_fn: batch -> ``(mean loss, count)``, the count weighting the batch in
            ``train_loss``; None skips the batch. Runs under :func:`autocast` with
            ``mixed_precision``; it moves its batch to the device itself.
        optimizer: over the parameters to train.
        epochs: the most epochs to run (0 runs none).
        device: where the model is.
        scheduler: stepped after every optimiser step, if given.
        epoch_row: :class:`EpochStats` -> the epoch's history row; default
            ``{"epoch", "train_loss"}``.
        score: row -> a comparable, larger is better; None keeps the last epoch.
        patience: with ``score``, stop after this many epochs without a new best; ``<= 0``
            never stops early.
        seed: run inside :func:`seeded_rng` (dropout and any other global draws depend
            only on it; the caller's random state is left as found); None draws from the
            random state as the caller left it (a caller that seeded model init in the
            same stream).
        mixed_precision: bf16 autocast around ``loss_fn`` on CUDA.
        progress: a tqdm bar over epochs and one over each epoch's batches.
        desc: label of the bar and of the per-epoch log line.
        on_epoch: called with each epoch's history row as soon as it is made (a job logs
            its training curves live through it); it must not change the row.

    Data-parallel: when ``batches`` are one rank's shares of global batches
    (:func:`trunk.distributed.ranks_of`; :func:`trunk.train.training_loader` under torchrun),
    every rank calls ``loss_fn`` on its share, and the global batch's loss is the
    count-weighted mean of the ranks' losses: each rank's gradients are combined so
    (:func:`trunk.distributed.combine_gradients`), which is the single-process step for a
    loss that is the mean over the share with ``count`` its size. A loss normalised
    otherwise scales itself (trunk training's per-task means, :func:`trunk.train.train_trunk`).
    Rank 0's state is broadcast first, batch norm uses the global batch's statistics
    (:func:`trunk.distributed.synced_batch_norm`), ``train_loss`` and ``seen`` are the run's,
    and only rank 0 shows progress bars and logs epochs. ``epoch_row`` runs on every rank
    and must reduce its own figures (:func:`trunk.distributed.reduce_sums`).

    Returns:
        The best (or last) epoch, the epochs run and the history.
    """
    device = torch.device(device)
    ranks = distributed.ranks_of(batches)
    if ranks is not None:
        progress = progress and ranks.rank == 0
        distributed.broadcast_state(model, ranks)
    epoch_row = epoch_row or _default_row
    history: list[dict[str, Any]] = []
    best, best_epoch, best_state = None, 0, None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc=desc, unit="epoch")
    with (seeded_rng(seed, device) if seed is not None else contextlib.nullcontext(),
          distributed.synced_batch_norm(model, ranks)):
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            inner = None
            if bar is not None:
                inner = tqdm(batches, desc=f"{desc} epoch {epoch}/{epochs}", unit="batch", leave=False)
            total, seen, steps = _train_pass(model, inner if inner is not None else batches, loss_fn, optimizer,
                                             scheduler, device, mixed_precision, inner, ranks)
            if inner is not None:
                inner.close()
            row = epoch_row(EpochStats(epoch=epoch, train_loss=total / max(seen, 1), seen=seen, steps=steps,
                                       seconds=time.perf_counter() - started))
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            current = None if score is None else score(row)
            if score is None:
                best_epoch = epoch
            elif best is None or current > best:
                best, best_epoch = current, epoch
                best_state = copy.deepcopy(model.state_dict())
            # A timed caller (the benchmark) pays nothing for the line; one rank of a run logs it.
            if (ranks is None or ranks.rank == 0) and logger.isEnabledFor(logging.INFO):
                logger.info("%s epoch %d/%d: %s", desc, epoch, epochs, _format_row(row))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row.get('train_loss', row.get('loss', 0.0)):.4f}", best=best_epoch)
            if score is not None and patience > 0 and epoch - best_epoch >= patience:
                logger.info("%s: no better epoch than %d in %d epochs; stopping early", desc, best_epoch, patience)
                break
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitOutcome(best_epoch=best_epoch, epochs_run=len(history), history=history)


def _format_row(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "epoch")
