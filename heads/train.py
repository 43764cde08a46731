"""Training one head on cached features: AdamW, cross-entropy, early stopping.

Reproducible by construction: batches are shuffled by a seeded ``torch.Generator`` and
dropout draws from a seeded global RNG inside ``torch.random.fork_rng``, so the caller's
random state is untouched and two runs with the same seed give bit-identical weights on
CPU.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Validation runs in chunks so a large val set never needs one huge activation.
EVAL_CHUNK = 8192


@dataclass
class TrainOutcome:
    """What a training run did.

    Attributes:
        best_epoch: the 1-based epoch whose weights the module now holds.
        epochs_run: epochs actually trained (fewer than asked when stopped early).
        history: one dict per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy``.
    """

    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def seeded_rng(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """A context in which torch's global RNG (and the device's) is seeded, then restored."""
    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def predict_logits(module: nn.Module, x: Tensor, device: str | torch.device = "cpu") -> Tensor:
    """Logits of ``module`` (put in eval mode) on ``x``, computed in chunks, on CPU."""
    module.eval()
    out = [module(x[i:i + EVAL_CHUNK].to(device, torch.float32)).float().cpu() for i in range(0, len(x), EVAL_CHUNK)]
    return torch.cat(out) if out else torch.empty(0)


def _validate(module: nn.Module, x: Tensor, y: Tensor, device) -> tuple[float, float]:
    logits = predict_logits(module, x, device)
    loss = F.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return loss, accuracy


def train_on_features(
    module: nn.Module,
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patience: int,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> TrainOutcome:
    """Train ``module`` in place and leave it holding its best weights, in eval mode.

    The best epoch is the one with the highest validation accuracy; ties go to the lower
    validation loss, then to the earlier epoch.

    Args:
        module: the head; moved to ``device``.
        train_x: ``(N, ...)`` features (any float dtype; fp16 cache rows are upcast).
        train_y: ``(N,)`` class indices.
        val_x: validation features.
        val_y: validation class indices.
        epochs: the most epochs to run.
        batch_size: examples per optimiser step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        patience: stop after this many epochs without a better best epoch; ``<= 0``
            disables early stopping.
        seed: seeds shuffling and dropout.
        device: where to train.
        progress: show a tqdm bar over epochs.

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
    module.to(device)
    optimiser = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    # Shuffling draws from its own CPU generator, so the order does not depend on the device.
    shuffle = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None  # (accuracy, -loss): larger is better
    best_epoch, best_state = 0, None
    n = len(train_x)

    epoch_iter = range(1, epochs + 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(epoch_iter, desc="train head", unit="epoch")
        epoch_iter = bar
    with seeded_rng(seed, device):
        for epoch in epoch_iter:
            module.train()
            order = torch.randperm(n, generator=shuffle)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                xb = train_x[idx].to(device, torch.float32)
                yb = train_y[idx].to(device)
                loss = F.cross_entropy(module(xb), yb)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.item() * len(idx)
            val_loss, val_acc = _validate(module, val_x, val_y, device)
            history.append({"epoch": epoch, "train_loss": total / n, "val_loss": val_loss, "val_accuracy": val_acc})
            if best is None or (val_acc, -val_loss) > best:
                best, best_epoch = (val_acc, -val_loss), epoch
                best_state = copy.deepcopy(module.state_dict())
            if bar is not None:
                bar.set_postfix(loss=f"{total / n:.4f}", val_acc=f"{val_acc:.4f}", best=best_epoch)
            if patience > 0 and epoch - best_epoch >= patience:
                break
    if bar is not None:
        bar.close()
    module.load_state_dict(best_state)
    module.eval()
    return TrainOutcome(best_epoch=best_epoch, epochs_run=len(history), history=history)
