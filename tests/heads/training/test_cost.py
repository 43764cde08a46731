"""Cost: parameter and FLOP counts checked against arithmetic; time is measured, not asserted."""

from __future__ import annotations

import pytest
import torch

from heads.training.cost import measure_cost
from heads.modules import LinearHead, MLPHead


def test_linear_head_cost():
    head = LinearHead(16, 4)
    cost = measure_cost(head, 16, batch_size=8, repeats=3)
    assert cost["params"] == 16 * 4 + 4
    # One image: 16*4 multiply-adds, 2 FLOPs each.
    assert cost["added_gflops"] == pytest.approx(2 * 16 * 4 / 1e9)
    assert cost["added_ms_per_image"] > 0


def test_mlp_head_cost_and_flops_are_per_image_not_per_batch():
    head = MLPHead(16, 4, hidden=32)
    small = measure_cost(head, 16, batch_size=4, repeats=2)
    big = measure_cost(head, 16, batch_size=64, repeats=2)
    assert small["params"] == (16 * 32 + 32) + (32 * 4 + 4)
    assert small["added_gflops"] == big["added_gflops"] == pytest.approx(2 * (16 * 32 + 32 * 4) / 1e9)


def test_module_is_left_as_it_was():
    head = MLPHead(8, 2, hidden=4, dropout=0.5).train()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    measure_cost(head, 8, batch_size=2, repeats=1)
    assert head.training
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())


def test_feature_map_input_shape():
    head = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    cost = measure_cost(head, (4, 3, 3), batch_size=2, repeats=1)
    assert cost["params"] == 4 * 2 + 2
    assert cost["added_gflops"] == pytest.approx(2 * 4 * 2 * 9 / 1e9)


def test_cost_inside_the_bank_sees_the_mix(monkeypatch):
    from heads.training.cost import measure_in_bank
    from heads.store import LoadedHead

    torch.manual_seed(0)
    heads = {f"lin{i}": LoadedHead(LinearHead(64, 5).eval(), {"name": f"lin{i}", "tap": "pooled",
                                                              "classes": list("abcde")}) for i in range(4)}
    heads["big"] = LoadedHead(MLPHead(64, 5, hidden=2048).eval(), {"name": "big", "tap": "pooled",
                                                                   "classes": list("abcde")})
    features = {"pooled": torch.randn(128, 64)}
    # Two banks, with and without the head, timed round by round: controlled round times
    # show the figure is the median per-round difference per image, floored at zero.
    rounds = iter([{"with": [10.0, 12.0, 11.0], "without": [2.0, 2.0, 9.0]},  # ms per round
                   {"with": [2.0, 2.0, 2.0], "without": [3.0, 4.0, 3.0]}])
    seen: list[set] = []

    def controlled(contenders, *, warmup, repeats, device):
        seen.append(set(contenders))
        for run in contenders.values():
            run()  # both banks really run on the features
        return next(rounds)

    monkeypatch.setattr("trunk.timing.interleaved", controlled)
    big = measure_in_bank("big", heads, features, repeats=3)
    assert big == pytest.approx(8.0 / 128)  # median of 8, 10 and 2 ms, per image...
    assert measure_in_bank("lin0", {"lin0": heads["lin0"]}, features, repeats=3) == 0.0  # ...never below 0
    assert seen == [{"with", "without"}] * 2
    with pytest.raises(ValueError, match="head 'nope' is not among the bank's heads"):
        measure_in_bank("nope", heads, features)
