"""Streaming monitoring stats: exact merges, correct moments, a bounded seeded sample, safe files."""

from __future__ import annotations

import json

import pytest
import torch

from heads.monitor.stats import (FeatureStats, MonitorStatsError, PredictionStats, load_run_stats, row_keys,
                                 save_run_stats, summarise_tap)

CLASSES = ["cat", "dog", "fox"]


def _shas(n: int, start: int = 0) -> list[str]:
    return [f"{i:064x}" for i in range(start, start + n)]


def test_prediction_stats_counts_histogram_and_low_confidence_share():
    stats = PredictionStats(CLASSES, bins=20)
    stats.update(torch.tensor([0, 1, 1, 2, 2]), torch.tensor([0.10, 0.49, 0.50, 0.99, 1.00]))
    assert stats.label_counts.tolist() == [1, 2, 2]
    # 0.10 -> bin 2, 0.49 -> bin 9, 0.50 -> bin 10 (not "below 0.5"), 0.99 and 1.0 -> last bin.
    assert {i: c for i, c in enumerate(stats.score_counts.tolist()) if c} == {2: 1, 9: 1, 10: 1, 19: 2}
    assert stats.low_confidence_share(0.5) == pytest.approx(2 / 5)
    assert stats.low_confidence_share(0.15) == pytest.approx(1 / 5)
    with pytest.raises(MonitorStatsError, match="multiple of 1/20"):
        stats.low_confidence_share(0.33)
    with pytest.raises(MonitorStatsError, match="'wolf' is not one of"):
        stats.update_labels(["wolf"], torch.tensor([0.9]))
    with pytest.raises(MonitorStatsError, match="out of range"):
        stats.update(torch.tensor([3]), torch.tensor([0.9]))


def test_update_logits_matches_the_banks_softmax_top1():
    logits = torch.randn(64, 3, generator=torch.Generator().manual_seed(1)) * 3
    stats = PredictionStats(CLASSES)
    stats.update_logits(logits)
    score, index = torch.softmax(logits, dim=-1).max(dim=-1)
    assert stats.label_counts.tolist() == torch.bincount(index, minlength=3).tolist()
    by_labels = PredictionStats(CLASSES)
    by_labels.update_labels([CLASSES[i] for i in index.tolist()], score)
    assert by_labels.to_dict() == stats.to_dict()


def test_prediction_stats_merge_of_two_workers_equals_one_pass_and_round_trips_json():
    g = torch.Generator().manual_seed(0)
    idx, scores = torch.randint(0, 3, (1000,), generator=g), torch.rand(1000, generator=g)
    one, a, b = PredictionStats(CLASSES), PredictionStats(CLASSES), PredictionStats(CLASSES)
    for s in range(0, 1000, 64):
        one.update(idx[s:s + 64], scores[s:s + 64])
        (a if (s // 64) % 2 else b).update(idx[s:s + 64], scores[s:s + 64])
    assert a.merge(b).to_dict() == one.to_dict() == b.merge(a).to_dict()
    back = PredictionStats.from_dict(json.loads(json.dumps(one.to_dict())))
    assert back.to_dict() == one.to_dict()
    with pytest.raises(MonitorStatsError, match="_SUCCESS.json: field 'score_counts'"):
        PredictionStats.from_dict({**one.to_dict(), "score_counts": [1] * 20}, source="_SUCCESS.json")
    with pytest.raises(MonitorStatsError, match="cannot merge"):
        one.merge(PredictionStats(["cat", "dog"]))


def test_feature_moments_match_torch_mean_and_var():
    x = torch.randn(1001, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3 + 1e4
    stats = FeatureStats(sample_size=16)
    for s in range(0, 1001, 37):  # uneven batches, a large offset: the naive sum of squares would lose digits
        stats.update(x[s:s + 37])
    assert stats.count == 1001
    torch.testing.assert_close(stats.mean, x.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(stats.var, x.var(0), rtol=1e-10, atol=0)


def test_feature_merge_of_two_workers_equals_one_pass_row_for_row():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 6, generator=g)
    shas = _shas(3000)
    one, a, b = FeatureStats(sample_size=64, seed=7), FeatureStats(sample_size=64, seed=7), FeatureStats(sample_size=64, seed=7)
    for s in range(0, 3000, 100):
        keys = row_keys(shas[s:s + 100], seed=7)
        one.update(x[s:s + 100], keys=keys)
        (a if (s // 100) % 3 == 0 else b).update(x[s:s + 100], keys=keys)
    for merged in (a.merge(b), b.merge(a)):
        assert merged.count == one.count
        torch.testing.assert_close(merged.mean, one.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(merged.var, one.var, rtol=1e-12, atol=0)
        assert torch.equal(merged.sample_keys, one.sample_keys)
        assert torch.equal(merged.sample, one.sample)
    with pytest.raises(MonitorStatsError, match="sample size / seed"):
        one.merge(FeatureStats(sample_size=64, seed=8))


def test_sample_is_bounded_seeded_and_uniform():
    n = 5000
    rows = torch.arange(n, dtype=torch.float32).reshape(-1, 1)  # feature value = row index

    def sample(seed: int, keys: bool) -> torch.Tensor:
        stats = FeatureStats(sample_size=256, seed=seed)
        for s in range(0, n, 128):
            stats.update(rows[s:s + 128], keys=row_keys(_shas(min(128, n - s), s), seed) if keys else None)
        assert stats.sample.shape == (256, 1)
        return stats.sample[:, 0]

    for keys in (True, False):
        first = sample(0, keys)
        assert torch.equal(first, sample(0, keys))  # seeded: reproducible
        assert not torch.equal(first.sort().values, sample(1, keys).sort().values)  # another seed, another sample
        assert first.unique().numel() == 256  # distinct rows of the input
        # Uniform over the stream: the sampled indices' mean is n/2 within 5 standard errors.
        se = (n ** 2 / 12) ** 0.5 / 256 ** 0.5
        assert abs(float(first.mean()) - n / 2) < 5 * se


def test_four_d_tap_is_reduced_to_its_spatial_mean_per_channel():
    x = torch.randn(10, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(summarise_tap(x), x.mean(dim=(2, 3)))
    stats = FeatureStats.from_features(x, sample_size=5)
    assert stats.dim == 4
    torch.testing.assert_close(stats.mean, x.mean(dim=(2, 3)).double().mean(0))
    with pytest.raises(MonitorStatsError, match="width 5 fed to stats of width 4"):
        stats.update(torch.randn(2, 5))
    with pytest.raises(MonitorStatsError, match="shape"):
        summarise_tap(torch.randn(3))


def test_run_stats_file_round_trips_and_refuses_tampering(tmp_path):
    preds = PredictionStats(CLASSES)
    preds.update(torch.tensor([0, 2, 2]), torch.tensor([0.3, 0.9, 0.8]))
    feats = FeatureStats.from_features(torch.randn(40, 5), keys=row_keys(_shas(40)), sample_size=16)
    path = save_run_stats(tmp_path / "_MONITOR.safetensors", {"pets": preds}, {"stages.2": feats}, meta={"release": "3"})
    p, f, meta = load_run_stats(path)
    assert p["pets"].to_dict() == preds.to_dict() and meta == {"release": "3"}
    assert torch.equal(f["stages.2"].sample, feats.sample) and torch.equal(f["stages.2"].m2, feats.m2)
    assert f["stages.2"].count == 40
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor bytes: still parses, no longer matches its digest
    path.write_bytes(bytes(data))
    with pytest.raises(MonitorStatsError, match="altered"):
        load_run_stats(path)
