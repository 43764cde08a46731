"""Drift verdicts: known shifts are flagged, no shift keeps false alarms within what the thresholds promise."""

from __future__ import annotations

import json
import math

import pytest
import torch

from heads.monitor.drift import (DriftConfigError, DriftThresholds, HeadDrift, assess, attention_lines,
                                 label_divergence, permutations_for)
from heads.monitor.reference import HeadReference
from heads.monitor.stats import FeatureStats, PredictionStats

CLASSES = [f"c{i}" for i in range(10)]
MIX = torch.tensor([0.25, 0.15, 0.12, 0.1, 0.1, 0.08, 0.07, 0.06, 0.04, 0.03])
D = 16


@pytest.fixture(autouse=True)
def _one_thread():
    # The permutation matmuls are tiny; on a shared 2-core box extra threads only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def max_false_alarms(trials: int, alpha: float, confidence: float = 0.999) -> int:
    """The smallest k with P(Binomial(trials, alpha) > k) <= 1 - confidence: alarms a correct alpha-level test stays within."""
    tail = 1.0
    for k in range(trials + 1):
        tail -= math.comb(trials, k) * alpha ** k * (1 - alpha) ** (trials - k)
        if tail <= 1 - confidence:
            return k
    return trials


def _mixing(seed: int = 99) -> torch.Tensor:
    # Correlated, unequal-scale features, like a trunk's channels; fixed across seeds (one "distribution").
    return torch.randn(D, D, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.2, 3.0, D)


def _features(g: torch.Generator, n: int, shift: float = 0.0, dims: int = 0) -> torch.Tensor:
    z = torch.randn(n, D, generator=g)
    z[:, :dims] += shift  # in units of the latent std, before mixing
    return z @ _mixing() + 5.0


def _predictions(g: torch.Generator, n: int, mix: torch.Tensor = MIX, low_share: float = 0.2) -> PredictionStats:
    stats = PredictionStats(CLASSES)
    labels = torch.multinomial(mix, n, replacement=True, generator=g)
    low = torch.rand(n, generator=g) < low_share
    scores = torch.where(low, 0.1 + 0.39 * torch.rand(n, generator=g), 0.5 + 0.5 * torch.rand(n, generator=g))
    stats.update(labels, scores)
    return stats


def _reference(g: torch.Generator, n_val: int = 400, n_train: int = 1000, **kw) -> HeadReference:
    features = FeatureStats.from_features(_features(g, n_train), seed=int(torch.randint(0, 1000, (1,), generator=g)))
    return HeadReference(_predictions(g, n_val, **kw), features, "pooled", {"head": "shapes"})


def _run_features(g: torch.Generator, n: int = 600, **shift) -> FeatureStats:
    return FeatureStats.from_features(_features(g, n, **shift), seed=int(torch.randint(1000, 2000, (1,), generator=g)))


def test_a_one_std_mean_shift_in_a_few_dims_is_drift_for_the_head_on_that_tap_only():
    g = torch.Generator().manual_seed(0)
    shifted_ref, steady_ref = _reference(g), _reference(g)
    preds = _predictions(g, 600)
    shifted = assess(shifted_ref, preds, _run_features(g, shift=1.0, dims=3), family_size=2, head="on_layer3")
    steady = assess(steady_ref, preds, _run_features(g), family_size=2, head="on_pooled")
    assert shifted.feature_verdict == "drift" and shifted.verdict == "drift"
    assert shifted.feature_p <= shifted.alpha_drift == 0.0005
    assert "input drift at tap 'pooled'" in shifted.reason
    assert shifted.mean_shift_max > 0.3 and shifted.mean_shift_max > 3 * steady.mean_shift_max
    assert steady.verdict == "ok" and steady.feature_p > 0.01, steady.reason
    assert shifted.label_verdict == "ok"  # the same label mix: only the input moved


def test_a_changed_label_mix_is_drift_and_a_rise_in_low_confidence_is_flagged():
    g = torch.Generator().manual_seed(1)
    ref = _reference(g)
    changed = torch.tensor([0.6, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.04, 0.03, 0.03])
    d = assess(ref, _predictions(g, 800, mix=changed), _run_features(g))
    assert d.label_verdict == "drift" and d.label_psi >= 0.25 and d.label_p == 1 / (1 + d.permutations)
    assert d.verdict == "drift" and "label mix changed" in d.reason
    unsure = assess(ref, _predictions(g, 800, low_share=0.5), _run_features(g))
    assert unsure.confidence_verdict == "drift" and unsure.label_verdict == "ok"
    assert unsure.low_confidence_run - unsure.low_confidence_reference > 0.2
    assert "low-confidence share" in unsure.reason


def test_no_shift_feature_false_alarms_stay_within_alpha_over_40_seeds():
    t = DriftThresholds()
    results = []
    for seed in range(40):
        g = torch.Generator().manual_seed(1000 + seed)
        results.append(assess(_reference(g), _predictions(g, 600), _run_features(g), t, seed=seed))
    p = [r.feature_p for r in results]
    watch_or_worse = sum(r.feature_verdict in ("watch", "drift") for r in results)
    drift = sum(r.feature_verdict == "drift" for r in results)
    assert watch_or_worse <= max_false_alarms(40, t.alpha_watch)  # 3 of 40 at alpha 0.01
    assert drift <= max_false_alarms(40, t.alpha_drift)  # 1 of 40 at alpha 0.001
    # Calibration beyond the thresholds: p-values are uniform under no shift, so p <= 0.1 about 10% of the time.
    assert sum(x <= 0.1 for x in p) <= max_false_alarms(40, 0.1)
    assert sum(x >= 0.5 for x in p) >= 40 - max_false_alarms(40, 0.5)  # not stuck near 0 either


def test_no_shift_label_false_alarms_stay_within_alpha_at_small_samples():
    # 10 classes, 100 predictions a side: PSI's own noise is about 9 * (2/100) = 0.18, so the
    # bands alone would cry wolf; the significance gate must keep false alarms at alpha.
    t = DriftThresholds()
    trials, raw_over_watch, label_alarms, confidence_alarms = 400, 0, 0, 0
    for seed in range(trials):
        g = torch.Generator().manual_seed(5000 + seed)
        ref = HeadReference(_predictions(g, 100), None, "pooled")
        d = assess(ref, _predictions(g, 100), None, t)
        raw_over_watch += d.label_psi >= t.label_psi_watch
        label_alarms += d.label_verdict != "ok"
        confidence_alarms += d.confidence_verdict != "ok"
    assert raw_over_watch > trials / 2  # the finite-sample bias the gate exists for
    assert label_alarms <= max_false_alarms(trials, t.alpha_watch)  # 10 of 400 at alpha 0.01
    assert confidence_alarms <= max_false_alarms(trials, t.alpha_watch)


def test_label_divergence_figures():
    psi, js, p = label_divergence(torch.tensor([50, 50, 0]), torch.tensor([50, 50, 0]))
    assert psi == 0.0 and js == 0.0 and p == 1.0
    psi, js, p = label_divergence(torch.tensor([90, 10]), torch.tensor([10, 90]))
    assert psi > 2.0 and 0.4 < js < 1.0 and p == 1 / 2001
    # An empty class on one side stays finite (smoothing).
    assert math.isfinite(label_divergence(torch.tensor([100, 0]), torch.tensor([50, 50]))[0])


def test_too_few_predictions_or_no_feature_stats_are_not_judged():
    g = torch.Generator().manual_seed(2)
    ref = _reference(g)
    d = assess(ref, _predictions(g, 30, mix=torch.tensor([1.0] + [0.0] * 9)), None)
    assert d.label_verdict is None and d.feature_verdict is None and d.verdict == "ok"
    assert "labels not judged (30 < 100 predictions)" in d.reason and "no feature stats" in d.reason
    with pytest.raises(ValueError, match="differ from its reference"):
        assess(ref, PredictionStats(["x", "y"]), None)
    with pytest.raises(ValueError, match="width 3"):
        assess(ref, None, FeatureStats.from_features(torch.randn(50, 3)))


def test_family_size_divides_alpha_and_sizes_the_permutations():
    t = DriftThresholds()
    assert permutations_for(t, 1) == 2000 and permutations_for(t, 10) == 20000
    # The smallest p-value a permutation test can give must be below the threshold it is held to.
    for family in (1, 3, 10):
        assert 1 / (1 + permutations_for(t, family)) <= t.alpha_drift / family
    g = torch.Generator().manual_seed(3)
    d = assess(_reference(g), _predictions(g, 200), _run_features(g, n=100), t, family_size=4)
    assert d.alpha_drift == pytest.approx(0.00025) and d.alpha_watch == pytest.approx(0.0025)
    assert d.permutations == 8000


def test_thresholds_from_a_monitor_block_and_bad_blocks_name_file_and_field():
    t = DriftThresholds.from_config({"label_psi_drift": 0.3, "min_predictions": 50}, source="conf/heads/shapes.yaml")
    assert t.label_psi_drift == 0.3 and t.min_predictions == 50 and t.alpha_drift == 0.001
    assert DriftThresholds.from_config(None) == DriftThresholds()
    cases = [({"psi": 0.1}, "conf/heads/shapes.yaml: monitor.psi is not a monitor setting"),
             ({"alpha_drift": "low"}, "monitor.alpha_drift = 'low' must be a number"),
             ({"min_predictions": 2.5}, "monitor.min_predictions = 2.5 must be an integer"),
             ({"alpha_drift": 0.05}, "monitor.alpha_drift = 0.05 must be > 0 and <= alpha_watch"),
             ({"label_psi_watch": 0.5}, "monitor.label_psi_watch = 0.5 must be >= 0 and <= label_psi_drift")]
    for block, message in cases:
        with pytest.raises(DriftConfigError, match=message.replace(".", r"\.")):
            DriftThresholds.from_config(block, source="conf/heads/shapes.yaml")


def test_attention_lines_list_only_flagged_heads_drift_first_and_drift_round_trips_json():
    ok = HeadDrift("alpha", "pooled", "ok", "no shift detected")
    watch = HeadDrift("beta", "pooled", "watch", "label mix changed")
    drift = HeadDrift("gamma", "layer3", "drift", "input drift")
    assert attention_lines([ok, watch, drift]) == ["gamma: DRIFT: input drift", "beta: WATCH: label mix changed"]
    assert attention_lines([ok]) == []
    g = torch.Generator().manual_seed(4)
    d = assess(_reference(g), _predictions(g, 300), _run_features(g))
    assert HeadDrift.from_dict(json.loads(json.dumps(d.to_dict()))) == d
