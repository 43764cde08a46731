"""Training one head on cached features: AdamW, cross-entropy, early stopping.

Reproducible by construction: batches are shuffled by a seeded ``torch.Generator`` and
dropout draws from a seeded global RNG inside ``torch.random.fork_rng``, so the caller's
random state is untouched and two runs with the same seed give bit-identical weights on
CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trunk.loop import EpochPermutation, EpochStats, FitOutcome, TensorBatches, fit, predict

# Validation runs in chunks so a large val set never needs one huge activation.
EVAL_CHUNK = 8192

# What a head's training run did: best_epoch, epochs_run and one history row per epoch
# (``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy``).
TrainOutcome = FitOutcome


@dataclass(frozen=True)
class TrainSettings:
    """How a head trains: a head config's ``train`` block, as one object.

    Attributes:
        epochs: the most epochs to run.
        batch_size: examples per optimiser step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        patience: stop after this many epochs without a better best epoch; ``<= 0``
            disables early stopping.
        seed: seeds shuffling and dropout.
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    seed: int

    @classmethod
    def from_config(cls, train: Mapping[str, Any]) -> TrainSettings:
        """From a validated head config's ``train`` block (extra keys are ignored)."""
        return cls(int(train["epochs"]), int(train["batch_size"]), train["lr"], train["weight_decay"],
                   int(train["patience"]), int(train["seed"]))


def predict_logits(module: nn.Module, x: Tensor, device: str | torch.device = "cpu") -> Tensor:
    """Logits of ``module`` (put in eval mode) on ``x``, computed in chunks, on CPU."""
    return predict(module, x, torch.device(device), chunk=EVAL_CHUNK)


def val_metrics(logits: Tensor, y: Tensor) -> dict[str, float]:
    """``val_loss`` (cross-entropy) and ``val_accuracy`` of validation logits."""
    return {"val_loss": F.cross_entropy(logits, y).item(),
            "val_accuracy": (logits.argmax(1) == y).float().mean().item()}


def val_score(row: dict[str, Any]) -> tuple[float, float]:
    """A head's best epoch: the highest validation accuracy, ties to the lower validation loss."""
    return row["val_accuracy"], -row["val_loss"]


def train_on_features(module: nn.Module, train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                      settings: TrainSettings, *, device: str | torch.device = "cpu",
                      progress: bool = False,
                      on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainOutcome:
    """Train ``module`` in place and leave it holding its best weights, in eval mode.

    The best epoch is the one with the highest validation accuracy; ties go to the lower
    validation loss, then to the earlier epoch.

    Args:
        module: the head; moved to ``device``.
        train_x: ``(N, ...)`` features (any float dtype; fp16 cache rows are upcast), or a
            :class:`trunk.cache.CachedRows` view: batches index it with the same seeded
            permutation, so only one batch of rows is read and held at a time.
        train_y: ``(N,)`` class indices.
        val_x: validation features.
        val_y: validation class indices.
        settings: epochs, batch size, optimiser, early stopping and seed.
        device: where to train.
        progress: show a tqdm bar over epochs.
        on_epoch: receives each epoch's history row (``epoch``, ``train_loss``,
            ``val_loss``, ``val_accuracy``) as soon as it is made (live training curves).

    Returns:
        The best epoch, the epochs run and the per-epoch history.

    Raises:
        ValueError: empty or mismatched inputs.
    """
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError(f"need training and validation examples (got {len(train_x)} and {len(val_x)})")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError(f"features and labels differ in length: train {len(train_x)} vs {len(train_y)}, "
                         f"val {len(val_x)} vs {len(val_y)}")
    train_y = torch.as_tensor(train_y, dtype=torch.long)
    val_y = torch.as_tensor(val_y, dtype=torch.long)
    device = torch.device(device)
    module.to(device)
    t = settings
    optimiser = torch.optim.AdamW(module.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    # Shuffling draws from its own CPU generator, so the order does not depend on the device.
    order = EpochPermutation(len(train_x), torch.Generator().manual_seed(t.seed))
    batches = TensorBatches((train_x, train_y), t.batch_size, order)

    def loss_fn(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        xb, yb = batch
        return F.cross_entropy(module(xb.to(device, torch.float32)), yb.to(device)), len(yb)

    def epoch_row(stats: EpochStats) -> dict[str, Any]:
        return {"epoch": stats.epoch, "train_loss": stats.train_loss,
                **val_metrics(predict_logits(module, val_x, device), val_y)}

    outcome = fit(module, batches, loss_fn, optimizer=optimiser, epochs=t.epochs, device=device,
                  epoch_row=epoch_row, score=val_score, patience=t.patience, seed=t.seed, progress=progress,
                  desc="train head", on_epoch=on_epoch)
    module.eval()
    return outcome
