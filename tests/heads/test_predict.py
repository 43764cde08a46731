"""heads.predict and the batch plan: the per-batch work both classification backends share."""

from __future__ import annotations

import pytest
import torch

from heads.classify.engine import plan_batches
from heads.predict import BatchPredictor, batch_rows, empty_columns
from tests.heads.classify.driver import make_bank
from trunk.loader import DecodedBatch


def test_batches_never_straddle_shards():
    jobs = plan_batches(23, rows_per_shard=10, batch_size=4, shards=[0, 2])
    assert [(j.shard, j.batch, j.indices) for j in jobs] == [
        (0, 0, [0, 1, 2, 3]), (0, 1, [4, 5, 6, 7]), (0, 2, [8, 9]), (2, 0, [20, 21, 22])]
    # A shard's batches are the same whichever other shards are planned with it.
    assert [j.indices for j in plan_batches(23, 10, 4, [2])] == [[20, 21, 22]]


def test_rows_line_up_with_inputs_and_failures_get_nulls(tiny_trunk):
    bank = make_bank(tiny_trunk)
    predictor = BatchPredictor(tiny_trunk, bank, torch.device("cpu"))
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    batch = DecodedBatch(indices=[5, 6, 7], paths=["a", "b", "c"], shas=["sa", None, "sc"],
                         errors=[None, "file not found: b", None], pixels=pixels)
    predictions = predictor(pixels)
    columns = empty_columns(bank.names)
    batch_rows(batch, predictions, columns)
    assert list(columns) == ["path", "sha256", "error", "colour_label", "colour_score", "shape_label", "shape_score"]
    assert columns["path"] == ["a", "b", "c"] and columns["error"][1] == "file not found: b"
    with torch.inference_mode():
        direct = bank.predict(tiny_trunk(pixels, bank.taps))
    for name in bank.names:
        assert columns[f"{name}_label"] == [direct[name][0][0], None, direct[name][0][1]]
        assert columns[f"{name}_score"][1] is None
        assert columns[f"{name}_score"][2] == pytest.approx(direct[name][1][1].item(), abs=1e-6)
    assert predictor(torch.empty(0, 3, 32, 32)) == {name: ([], []) for name in bank.names}


def test_mismatched_predictions_are_refused(tiny_trunk):
    batch = DecodedBatch(indices=[0], paths=["a"], shas=["s"], errors=[None], pixels=torch.zeros(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="returned 0 rows for 1 decoded images"):
        batch_rows(batch, {"shape": ([], [])}, empty_columns(["shape"]))


def test_bf16_channels_last_path_runs_and_agrees(tiny_trunk):
    # The GPU path (autocast bf16 + channels_last), exercised on the CPU where autocast supports bf16 too.
    bank = make_bank(tiny_trunk)
    torch.manual_seed(1)
    pixels = torch.randn(16, 3, 32, 32)
    fp32 = BatchPredictor(tiny_trunk, bank, torch.device("cpu"), amp=False)(pixels)
    bf16 = BatchPredictor(tiny_trunk, bank, torch.device("cpu"), amp=True)(pixels)
    for name in bank.names:
        agree = sum(a == b for a, b in zip(fp32[name][0], bf16[name][0]))
        assert agree >= 14, name
        assert all(isinstance(s, float) for s in bf16[name][1])
        assert max(abs(a - b) for a, b in zip(fp32[name][1], bf16[name][1])) < 0.05
    tiny_trunk.to(memory_format=torch.contiguous_format)
