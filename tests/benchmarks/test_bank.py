"""The head-bank benchmark on timm's test_resnet at 32 px: structure and MAC predictions. No timing asserts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bank import GOAL, bank_macs, format_bank_table, predicted_ratio, run_bank_benchmark
from benchmarks.heads import BenchTrunk, make_heads
from heads.bank import HeadBank
from trunk.model import POOLED

pytestmark = pytest.mark.usefixtures("one_thread")


def positive_finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bank_macs_are_width_times_total_classes():
    heads = make_heads(5, 24, mlp_every=0, num_classes=7)
    assert bank_macs(HeadBank(heads), 24) == 24 * 5 * 7
    assert bank_macs(HeadBank(heads, weight_dtype="bfloat16"), 24) == 24 * 5 * 7
    # MLPs count both layers: D*H + H*C per head (the grouped form pads nothing at one class count).
    mlps = make_heads(3, 24, mlp_every=1, num_classes=7, hidden=8)
    assert bank_macs(HeadBank(mlps), 24) == 3 * (24 * 8 + 8 * 7)
    assert predicted_ratio(1000.0, 130.0) == pytest.approx(1.13)


def test_run_bank_benchmark_structure_and_predictions():
    setup = BenchTrunk("test_resnet", image_size=32)
    result = run_bank_benchmark(setup, n_heads=4, num_classes=10, batch_sizes=(2, 3),
                                weight_dtypes=("float32", "bfloat16"), n_mlp=3, mlp_hidden=8, warmup=0, repeats=1)
    # The prediction from MACs: the trunk's counted as trunk.speed does, the heads' D * sum C.
    trunk = setup.build()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        trunk(torch.zeros(1, 3, 32, 32), [POOLED])
    trunk_macs = counter.get_total_flops() / 2
    width = trunk.tap(POOLED).channels
    assert result["width"] == width
    assert result["trunk_gmacs"] == pytest.approx(trunk_macs / 1e9)
    assert result["head_gmacs"] == pytest.approx(width * 4 * 10 / 1e9)
    assert result["predicted"] == pytest.approx((trunk_macs + width * 40) / trunk_macs)
    assert result["goal"] == GOAL

    rows = result["rows"]
    assert [(r["batch_size"], r["weight_dtype"]) for r in rows] == [(2, "float32"), (2, "bfloat16"),
                                                                   (3, "float32"), (3, "bfloat16")]
    for r in rows:
        assert all(positive_finite(r[k]) for k in ("trunk_ms", "ms", "ratio", "heads_ms", "heads_gb_per_s"))
        assert r["predicted"] == result["predicted"]
        assert r["vs_predicted"] == pytest.approx(r["ratio"] / r["predicted"])
        assert r["passed"] == (r["vs_predicted"] <= GOAL)
    # bfloat16 weights are half the bytes of float32 ones.
    assert rows[1]["weight_gb"] == pytest.approx(rows[0]["weight_gb"] / 2)
    assert rows[0]["weight_gb"] == pytest.approx(4 * (width * 10 + 10) * 4 / 1e9)

    assert [(m["batch_size"], m["n_mlp"]) for m in result["mlp"]] == [(2, 3), (3, 3)]
    assert all(positive_finite(m[k]) for m in result["mlp"] for k in ("grouped_ms", "one_by_one_ms", "speedup"))

    json.dumps(result)  # JSON-able, for benchmarks.heads.write_result
    table = format_bank_table(result)
    assert "meas/pred" in table and "bfloat16" in table and "3 MLP heads" in table
    assert len([line for line in table.splitlines() if line.endswith(("PASS", "FAIL"))]) == 4
