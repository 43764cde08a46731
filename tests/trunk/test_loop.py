"""The one training loop, on controlled inputs: history, weighting, early stopping, seeding, order."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import RandomSampler

from trunk.loop import EpochPermutation, TensorBatches, cosine_schedule, fit, predict, seeded_rng, shuffled_loader


class Scalar(nn.Module):
    """One weight; the loss of a batch is ``w * value``, so each step moves ``w`` by a known sign."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))


def scripted(scores):
    """An epoch_row that reports the given validation score per epoch and records the weight."""
    weights = []

    def row(stats):
        weights.append(float(model.w.detach()))
        return {"epoch": stats.epoch, "train_loss": stats.train_loss, "val": scores[stats.epoch - 1]}

    model = Scalar()
    return model, row, weights


def sgd(model, lr=1.0):
    return torch.optim.SGD(model.parameters(), lr=lr)


def test_train_loss_is_the_count_weighted_mean_and_skipped_batches_do_not_step():
    model = Scalar()
    batches = [(1.0, 1), None, (3.0, 3)]  # None: a batch with nothing readable

    def loss_fn(b):
        return None if b is None else (model.w * 0 + b[0], b[1])

    out = fit(model, batches, loss_fn, optimizer=sgd(model), epochs=2)
    assert out.history == [{"epoch": 1, "train_loss": 2.5}, {"epoch": 2, "train_loss": 2.5}]
    assert out.epochs_run == 2 and out.best_epoch == 2  # no score: the last epoch is kept


def test_epoch_stats_count_steps_and_examples():
    model = Scalar()
    seen = []

    def row(stats):
        seen.append((stats.epoch, stats.seen, stats.steps))
        return {"epoch": stats.epoch}

    fit(model, [3, 4, None], lambda b: None if b is None else (model.w * b, b), optimizer=sgd(model, 0.0),
        epochs=2, epoch_row=row)
    assert seen == [(1, 7, 2), (2, 7, 2)]


def test_early_stopping_restores_the_best_epoch_weights():
    model, row, weights = scripted([0.1, 0.5, 0.3, 0.2, 0.9, 0.9])
    # Each step lowers w by 1: the weight after epoch e is -e.
    out = fit(model, [None, 1], lambda b: None if b is None else (model.w * b, 1), optimizer=sgd(model),
              epochs=6, epoch_row=row, score=lambda r: r["val"], patience=2)
    assert out.epochs_run == 4  # epochs 3 and 4 bring nothing better than epoch 2
    assert out.best_epoch == 2
    assert weights == [-1.0, -2.0, -3.0, -4.0]
    assert float(model.w.detach()) == -2.0  # epoch 2's weights, not the last epoch's
    assert [r["epoch"] for r in out.history] == [1, 2, 3, 4]


def test_ties_go_to_the_earlier_epoch_and_patience_zero_never_stops():
    model, row, _ = scripted([0.5, 0.5, 0.5])
    out = fit(model, [1], lambda b: (model.w * b, 1), optimizer=sgd(model), epochs=3, epoch_row=row,
              score=lambda r: r["val"], patience=0)
    assert out.epochs_run == 3 and out.best_epoch == 1 and float(model.w.detach()) == -1.0


def test_scheduler_steps_once_per_optimiser_step():
    model = Scalar()
    opt = sgd(model, 1.0)
    schedule = cosine_schedule(opt, 4)
    lrs = []
    fit(model, [1, None, 1], lambda b: None if b is None else (model.w * b, 1), optimizer=opt, epochs=2,
        scheduler=schedule, epoch_row=lambda s: lrs.append(opt.param_groups[0]["lr"]) or {"epoch": s.epoch})
    assert lrs == pytest.approx([0.5, 0.0])  # half-way, then the end, of a 4-step cosine


def test_model_is_put_in_train_mode_every_epoch():
    model = nn.Sequential(nn.Dropout(0.5))
    modes = []

    def row(stats):
        modes.append(model.training)
        model.eval()  # as validation does
        return {"epoch": stats.epoch}

    param = nn.Parameter(torch.ones(()))
    fit(model, [1], lambda b: (param * 1.0, 1), optimizer=sgd(nn.ParameterList([param])), epochs=2, epoch_row=row)
    assert modes == [True, True]


def dropout_run(seed):
    torch.manual_seed(99)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    x = torch.ones(8, 4)
    before = torch.get_rng_state()
    out = fit(model, [x, x], lambda b: (model(b).sum(), len(b)), optimizer=sgd(model, 0.01), epochs=2, seed=seed)
    return model.state_dict(), out.history, before, torch.get_rng_state()


def test_a_seed_makes_dropout_reproducible_and_leaves_the_global_rng_as_found():
    (a, ha, before, after), (b, hb, _, _), (_, hc, _, _) = dropout_run(0), dropout_run(0), dropout_run(1)
    assert ha == hb and all(torch.equal(a[k], b[k]) for k in a)
    assert ha != hc  # the seed, not the caller's stream, drives dropout
    assert torch.equal(before, after)


def test_without_a_seed_the_loop_draws_from_the_callers_stream():
    def run():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        before = torch.get_rng_state()
        out = fit(model, [torch.ones(8, 4)], lambda b: (model(b).sum(), len(b)), optimizer=sgd(model, 0.01),
                  epochs=1)
        return before, torch.get_rng_state(), out.history

    (before, after, h1), (_, _, h2) = run(), run()
    assert h1 == h2
    assert not torch.equal(before, after)  # dropout drew from it


def test_seeded_rng_restores_the_global_state():
    state = torch.get_rng_state()
    with seeded_rng(7):
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), state)
    with seeded_rng(7):
        assert torch.equal(torch.rand(3), inside)


def test_zero_epochs_trains_nothing():
    model = Scalar()
    out = fit(model, [1], lambda b: (model.w * b, 1), optimizer=sgd(model), epochs=0)
    assert out.history == [] and out.epochs_run == 0 and out.best_epoch == 0 and float(model.w.detach()) == 0.0


def test_each_epoch_is_logged_and_the_progress_bar_runs(caplog):
    model = Scalar()
    with caplog.at_level(logging.INFO, logger="trunk.loop"):
        fit(model, [1], lambda b: (model.w * b, 1), optimizer=sgd(model), epochs=2, progress=True, desc="demo")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["demo epoch 1/2: train_loss 0", "demo epoch 2/2: train_loss -1"]


def test_epoch_permutation_is_one_randperm_per_epoch():
    sampler = EpochPermutation(10, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        assert list(sampler) == torch.randperm(10, generator=g).tolist()


def test_random_sampler_differs_from_the_second_epoch_on():
    # Why both exist: RandomSampler draws an extra (empty) permutation at the end of each pass.
    ours = EpochPermutation(10, torch.Generator().manual_seed(4))
    theirs = RandomSampler(range(10), generator=torch.Generator().manual_seed(4))
    assert list(ours) == list(theirs)
    assert list(ours) != list(theirs)


def test_tensor_batches_cover_every_row_once_per_epoch_in_the_samplers_order():
    x = torch.arange(10) * 10
    y = torch.arange(10)
    batches = TensorBatches((x, y), 4, EpochPermutation(10, torch.Generator().manual_seed(0)))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    epoch = list(batches)
    assert len(batches) == 3 and [len(b[0]) for b in epoch] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in epoch]), order)
    assert all(torch.equal(bx, by * 10) for bx, by in epoch)
    with pytest.raises(ValueError, match="differ in length"):
        TensorBatches((x, y[:3]), 4, range(10))


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return i

    def reseed(self, seed):
        pass


def order_of(**kwargs):
    loader = shuffled_loader(Numbers(), batch_size=5, collate_fn=list, **kwargs)
    return [list(loader) for _ in range(2)]


def test_shuffled_loader_is_seeded_and_an_order_seed_makes_the_order_its_own():
    assert order_of(seed=1) == order_of(seed=1)
    assert order_of(seed=1) != order_of(seed=2)
    # With its own generator the order no longer depends on the loader's seed.
    assert order_of(seed=1, order_seed=7) == order_of(seed=2, order_seed=7)
    assert [len(b) for b in order_of(seed=1, drop_last=True)[0]] == [5, 5]


def test_predict_runs_in_chunks_in_eval_mode_and_upcasts():
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.9))
    x = torch.randn(7, 3).half()
    out = predict(model, x, torch.device("cpu"), chunk=3)
    assert not model.training and out.dtype == torch.float32
    assert torch.equal(out, model(x.float()).detach())
    assert predict(model, x[:0], torch.device("cpu"), chunk=3).numel() == 0
