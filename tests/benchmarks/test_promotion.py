"""The promotion benchmark, small: 2 promoter processes x 2 heads through a real ``mlflow server``."""

from __future__ import annotations

import pytest

from benchmarks.promotion import format_promotion_table, run_promotion_benchmark


@pytest.mark.slow  # a server, 2 promoter processes and 5 heads registered (the races: test_promotion_race.py)
def test_racing_promoters_lose_no_head(tmp_path):
    result = run_promotion_benchmark(processes=2, heads_per_process=2, preload=(1,), root=tmp_path)
    print("\n" + format_promotion_table(result))
    assert result["lost"] == 0 and result["errors"] == 0
    (phase,) = result["phases"]
    assert (phase["preload"], phase["heads_at_start"], phase["heads_at_end"]) == (1, 1, 5)
    for phase in result["phases"]:
        assert phase["promotions"] == phase["succeeded"] == 4 and phase["lost_heads"] == []
        assert 0 <= phase["rebuilt"] <= 3  # a promotion can lose the race at most once per other promotion
        assert phase["promotions_per_s"] > 0 and phase["s_per_promotion"] > 0
        assert phase["median_latency_s"] <= phase["max_latency_s"] <= phase["wall_s"] + 1
    assert "2 processes x 2 heads" in format_promotion_table(result)
