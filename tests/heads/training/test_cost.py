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
    from heads.training.cost import bank_cost
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

    def controlled(contenders, *, warmup, repeats, device, **_):
        seen.append(set(contenders))
        for run in contenders.values():
            run()  # both banks really run on the features
        return next(rounds)

    monkeypatch.setattr("trunk.timing.interleaved", controlled)
    big = bank_cost("big", heads, features, repeats=3)["added_ms_per_image"]
    assert big == pytest.approx(8.0 / 128)  # median of 8, 10 and 2 ms, per image...
    assert bank_cost("lin0", {"lin0": heads["lin0"]}, features, repeats=3)["added_ms_per_image"] == 0.0  # ...never below 0
    assert seen == [{"with", "without"}] * 2
    with pytest.raises(ValueError, match="head 'nope' is not among the bank's heads"):
        bank_cost("nope", heads, features)


class SlowStart(torch.nn.Module):
    """A head whose first calls are slow by construction (lazy initialisation spanning several calls)."""

    def __init__(self, slow_calls: int, sleep_s: float) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)
        self.calls, self.slow_calls, self.sleep_s = 0, slow_calls, sleep_s

    def forward(self, x):
        import time

        self.calls += 1
        if self.calls <= self.slow_calls:
            time.sleep(self.sleep_s)
        return self.fc(x)


def test_slow_first_calls_are_warmed_up_not_timed():
    # 8 slow calls of 20 ms: a fixed 3-call warm-up timed 4 of the 5 passes slow (a 10 ms
    # per image figure for a head that costs microseconds); the warm-up lasts at least
    # WARMUP_S seconds (0.2 s > 8 x 20 ms), so every timed pass is a steady one.
    from heads.training.cost import WARMUP_S

    assert WARMUP_S > 8 * 0.02
    cost = measure_cost(SlowStart(slow_calls=8, sleep_s=0.02), 4, batch_size=2, repeats=5)
    assert cost["added_ms_per_image"] < 2.0  # far below the 10 ms per image the slow calls give
    assert cost["added_ms_per_image_spread"] >= 0


def test_bank_cost_reports_its_spread(monkeypatch):
    from heads.store import LoadedHead
    from heads.training.cost import bank_cost

    heads = {"a": LoadedHead(LinearHead(8, 2).eval(), {"name": "a", "tap": "pooled", "classes": ["x", "y"]}),
             "b": LoadedHead(MLPHead(8, 2, hidden=4).eval(), {"name": "b", "tap": "pooled", "classes": ["x", "y"]})}
    seen = {}

    def controlled(contenders, *, warmup, repeats, device, warmup_s=0.0):
        seen.update(warmup=warmup, warmup_s=warmup_s)
        return {"with": [5.0, 9.0, 13.0, 7.0, 6.0], "without": [1.0, 1.0, 1.0, 1.0, 1.0]}

    monkeypatch.setattr("trunk.timing.interleaved", controlled)
    cost = bank_cost("b", heads, {"pooled": torch.randn(4, 8)}, repeats=5)
    # Per-round differences 4, 8, 12, 6, 5 ms over 4 images: median 6, quartiles 5 and 8.
    assert cost["added_ms_per_image"] == pytest.approx(6.0 / 4)
    assert cost["added_ms_per_image_spread"] == pytest.approx(3.0 / 4)
    assert seen["warmup"] >= 3 and seen["warmup_s"] > 0  # warmed up, in calls and in seconds


def test_costs_below_timing_noise_are_labelled():
    from heads.training.cost import below_noise, format_ms

    assert format_ms(0.001, 0.05) == "< 0.05 (below timing noise)"
    assert format_ms(0.0, 0.0) == "0 (below timing noise)"
    assert format_ms(0.55, 0.02) == "0.5500 (IQR 0.0200)"
    assert format_ms(0.55, None) == "0.5500"  # versions measured before spreads were: the bare figure
    assert format_ms(None, 0.1) == "-"
    assert below_noise(0.04, 0.05) and not below_noise(0.06, 0.05) and not below_noise(0.06, None)
