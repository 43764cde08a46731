"""The cache benchmark's structure at tiny sizes (the figures themselves come from the full run)."""

from __future__ import annotations

from benchmarks.cache import format_cache_table, run_cache_benchmark, run_hash_benchmark


def test_cache_benchmark_reports_each_size(tmp_path):
    # One size: each runs in its own process (a torch import), and the sizes only repeat the path.
    report = run_cache_benchmark(rows=(600,), dim=32, epochs=1, batch_size=64, classes=3, threads=1,
                                 workdir=tmp_path)
    assert (report["dim"], report["dtype"], report["epochs"]) == (32, "float16", 1)
    assert [r["rows"] for r in report["results"]] == [600]
    for r in report["results"]:
        assert r["peak_rss_mb"] > 0 and r["rows_per_s"] > 0 and 0.0 <= r["val_accuracy"] <= 1.0
        assert r["disk_mb"] > 0
    assert not list(tmp_path.iterdir())  # caches removed
    table = format_cache_table(report)
    assert "| 600 |" in table and "peak RSS MB" in table


def test_hash_benchmark_warm_pass_reads_nothing(tmp_path):
    report = run_hash_benchmark(files=50, size=64, workdir=tmp_path / "w")
    assert report["cold"]["hashed"] == 50 and report["cold"]["hits"] == 0
    assert report["warm"]["hashed"] == 0 and report["warm"]["hits"] == 50
