"""Training on features: learns, stops early, keeps the best weights, bit-identical run to run."""

from __future__ import annotations

import pytest
import torch

from heads.modules import LinearHead, MLPHead
from heads.training.train import TrainSettings, predict_logits, train_on_features

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussians(n_per_class: int = 40, classes: int = 3, dim: int = 16, spread: float = 0.6, seed: int = 0):
    """Class i centred on 2*e_i; overlapping enough that accuracy is not trivially 1.0 at epoch 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), dim, generator=g) * spread
    x[torch.arange(len(y)), y] += 2.0
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def split():
    x, y = gaussians()
    vx, vy = gaussians(n_per_class=15, seed=1)
    return x.half(), y, vx.half(), vy  # cache rows are fp16


SETTINGS = dict(epochs=30, batch_size=16, lr=0.05, weight_decay=1e-4, patience=5, seed=0)


def test_learns_separable_classes_and_records_history():
    x, y, vx, vy = split()
    torch.manual_seed(123)
    head = LinearHead(16, 3)
    out = train_on_features(head, x, y, vx, vy, TrainSettings(**SETTINGS))
    assert out.history[-1]["val_accuracy"] > 0.9
    assert out.history[0]["train_loss"] > out.history[-1]["train_loss"]
    assert [h["epoch"] for h in out.history] == list(range(1, out.epochs_run + 1))
    assert set(out.history[0]) >= {"epoch", "train_loss", "val_accuracy", "val_loss"}
    assert not head.training


def test_bit_identical_run_to_run_and_seed_matters():
    x, y, vx, vy = split()

    def run(seed):
        torch.manual_seed(7)  # same init; the training seed drives shuffling and dropout
        head = MLPHead(16, 3, hidden=32, dropout=0.3)
        settings = TrainSettings(**{**SETTINGS, "epochs": 6, "patience": 0, "seed": seed})
        out = train_on_features(head, x, y, vx, vy, settings)
        return head.state_dict(), out.history

    (a, ha), (b, hb), (c, _) = run(0), run(0), run(1)
    assert ha == hb
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_caller_random_state_is_untouched():
    x, y, vx, vy = split()
    head = MLPHead(16, 3, hidden=8, dropout=0.5)  # dropout draws random numbers while training
    state = torch.get_rng_state()
    train_on_features(head, x, y, vx, vy, TrainSettings(**{**SETTINGS, "epochs": 2}))
    assert torch.equal(torch.get_rng_state(), state)


def test_early_stopping_restores_the_best_epoch():
    # Noisy labels: validation accuracy peaks early, then the head overfits the training set.
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(60, 32, generator=g), torch.randint(0, 3, (60,), generator=g)
    vx, vy = torch.randn(30, 32, generator=g), torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(0)
    head = MLPHead(32, 3, hidden=64)
    settings = TrainSettings(epochs=200, batch_size=8, lr=0.01, weight_decay=0.0, patience=4, seed=0)
    out = train_on_features(head, x, y, vx, vy, settings)
    assert out.epochs_run < 200
    assert out.epochs_run == out.best_epoch + 4
    best = out.history[out.best_epoch - 1]
    assert best["val_accuracy"] == max(h["val_accuracy"] for h in out.history)
    # The module holds the best epoch's weights, not the last epoch's.
    logits = predict_logits(head, vx)
    assert (logits.argmax(1) == vy).float().mean().item() == best["val_accuracy"]
    assert torch.nn.functional.cross_entropy(logits, vy).item() == pytest.approx(best["val_loss"], rel=1e-6)


def test_rejects_empty_or_mismatched_inputs():
    x, y, vx, vy = split()
    with pytest.raises(ValueError, match="validation"):
        train_on_features(LinearHead(16, 3), x, y, vx[:0], vy[:0], TrainSettings(**SETTINGS))
    with pytest.raises(ValueError, match="differ in length"):
        train_on_features(LinearHead(16, 3), x, y[:-1], vx, vy, TrainSettings(**SETTINGS))


def test_on_epoch_gets_every_history_row_as_it_is_made():
    x, y, vx, vy = split()
    seen = []
    out = train_on_features(LinearHead(16, 3), x, y, vx, vy, TrainSettings(**{**SETTINGS, "epochs": 4, "patience": 0}),
                            on_epoch=lambda row: seen.append(dict(row)))
    assert seen == out.history and [r["epoch"] for r in seen] == [1, 2, 3, 4]
    assert set(seen[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy"}
