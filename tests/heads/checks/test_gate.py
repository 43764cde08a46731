"""The gate: floors and ceilings on a head's figures, and a report a person can read."""

from __future__ import annotations

import pytest

from heads.checks.gate import check_gate
from heads.spec import GateConfig

GOOD = {"val_accuracy": 0.91, "added_gflops": 0.002, "added_ms_per_image": 0.05}


def gate(**kw) -> dict:
    # The same shape a validated head config's gate block has.
    return {**GateConfig().__dict__, **kw}


def test_passes_when_every_limit_is_met():
    report = check_gate(gate(min_val_accuracy=0.8, max_added_gflops=0.01, max_added_ms_per_image=0.1), GOOD, {})
    assert report.passed
    assert [c.name for c in report.checks] == ["val_accuracy", "added_gflops", "added_ms_per_image"]
    text = report.format("head.colour v1")
    assert text.splitlines()[0] == "head.colour v1: PASSED (3/3 checks passed)"
    assert "[ok  ] val_accuracy" in text and "0.91 >= 0.8" in text
    assert "0.002 <= 0.01" in text


def test_fails_on_low_accuracy_and_names_the_check():
    report = check_gate(gate(min_val_accuracy=0.95), GOOD, {})
    assert not report.passed
    assert [c.name for c in report.failed] == ["val_accuracy"]
    text = report.format("head.colour v2")
    assert text.splitlines()[0] == "head.colour v2: FAILED (0/1 checks passed)"
    assert "[FAIL] val_accuracy  0.91 >= 0.95" in text


def test_fails_on_cost_ceiling():
    report = check_gate(gate(max_added_gflops=0.001), GOOD, {})
    assert not report.passed
    (failed,) = report.failed
    assert (failed.name, failed.value, failed.limit, failed.op) == ("added_gflops", 0.002, 0.001, "<=")


def test_missing_metric_fails_rather_than_passes():
    report = check_gate(gate(max_added_ms_per_image=1.0), {"val_accuracy": 0.9}, {})
    assert not report.passed
    assert "added_ms_per_image  missing <= 1" in report.format()
    assert "metric missing" in report.format()


def test_slice_floor_applies_to_large_slices_only():
    slices = {"night": {"accuracy": 0.55, "n": 40}, "day": {"accuracy": 0.95, "n": 60},
              "fog": {"accuracy": 0.10, "n": 5}}
    report = check_gate(gate(min_slice_accuracy=0.7, min_slice_size=20), GOOD, slices)
    assert not report.passed
    assert [c.name for c in report.failed] == ["slice_accuracy.night"]
    fog = next(c for c in report.checks if c.name == "slice_accuracy.fog")
    assert fog.passed and "n=5 < min_slice_size 20" in fog.note
    text = report.format()
    assert "[FAIL] slice_accuracy.night" in text and "0.55 >= 0.7" in text


def test_slice_sizes_argument_and_plain_accuracies():
    report = check_gate(gate(min_slice_accuracy=0.7, min_slice_size=20), GOOD,
                        {"night": 0.5, "day": 0.9}, {"night": 10, "day": 30})
    assert report.passed  # night is too small to judge
    report = check_gate(gate(min_slice_accuracy=0.7, min_slice_size=20), GOOD,
                        {"night": 0.5, "day": 0.9}, {"night": 25, "day": 30})
    assert [c.name for c in report.failed] == ["slice_accuracy.night"]


def test_unknown_gate_key_is_refused():
    with pytest.raises(ValueError, match="unknown field\\(s\\) min_val_acc"):
        check_gate({"min_val_acc": 0.9}, GOOD, {})
