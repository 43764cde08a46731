"""The cascade benchmark on a tiny generated workspace: its result's structure, no timing asserts."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.cascade import format_cascade_table, run_cascade_benchmark


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def test_each_run_trains_every_head_on_a_fresh_candidate(tmp_path):
    # Serial runs only: a pool's outcomes equal serial's (tests/registry/jobs/test_cascade.py);
    # here the benchmark's own bookkeeping is what is checked.
    result = run_cascade_benchmark(2, (1, 1), root=tmp_path / "ws", n_images=60, image_size=32, head_epochs=1,
                                   mlp_every=2, branch_every=0, progress=False)
    assert result["settings"]["n_heads"] == 2 and result["cores"] >= 1
    n = result["heads_in_release"]
    assert 1 <= n <= 2
    first, second = result["runs"]
    assert (first["workers"], first["backend"], first["threads"]) == (1, "serial", None)
    for run in result["runs"]:
        # Nothing reused: each run's candidate is a new trunk, so every head is trained for it.
        assert (run["heads"], run["trained"], run["reused"], run["failed"]) == (n, n, 0, 0)
        assert math.isfinite(run["seconds"]) and run["seconds"] > 0
        assert run["seconds_per_head"] == pytest.approx(run["seconds"] / n)
    assert first["candidate_version"] != second["candidate_version"]
    json.dumps(result)  # tools.bench writes it as JSON
    table = format_cascade_table(result).splitlines()
    assert table[0].startswith(f"cascade over {n} heads")
    assert table[2].split()[0] == "serial"


def test_bad_settings_are_one_line_errors_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="field 'workers'"):
        run_cascade_benchmark(3, (0, 2), root=tmp_path / "ws")
    with pytest.raises(ValueError, match="field 'backend'"):
        run_cascade_benchmark(3, (1,), root=tmp_path / "ws", backend="threads")
    assert not (tmp_path / "ws").exists()
