"""The promotion benchmark, small: 3 promoter processes x 2 heads through a real ``mlflow server``."""

from __future__ import annotations

import pytest

from benchmarks.promotion import format_promotion_table, run_promotion_benchmark


@pytest.mark.slow  # a server, 3 promoter processes and 8 heads registered: about a minute on 2 busy cores
def test_racing_promoters_lose_no_head(tmp_path):
    result = run_promotion_benchmark(processes=3, heads_per_process=2, preload=(2,), root=tmp_path)
    print("\n" + format_promotion_table(result))
    assert result["lost"] == 0 and result["errors"] == 0
    (phase,) = result["phases"]
    assert (phase["preload"], phase["heads_at_start"], phase["heads_at_end"]) == (2, 2, 8)
    for phase in result["phases"]:
        assert phase["promotions"] == phase["succeeded"] == 6 and phase["lost_heads"] == []
        assert 0 <= phase["rebuilt"] <= 5  # a promotion can lose the race at most once per other promotion
        assert phase["promotions_per_s"] > 0 and phase["s_per_promotion"] > 0
        assert phase["median_latency_s"] <= phase["max_latency_s"] <= phase["wall_s"] + 1
    assert "3 processes x 2 heads" in format_promotion_table(result)
