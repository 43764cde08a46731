"""The refresh cascade's model contract: pure arithmetic on MLflow-style metric dicts."""

from __future__ import annotations

import pytest

from heads.checks.contract import GoldenResult, Tolerances, check_contract, slices, worst_slice

PROD = {"val_accuracy": 0.90, "slice_accuracy.day": 0.92, "slice_size.day": 50,
        "slice_accuracy.night": 0.80, "slice_size.night": 40, "slice_accuracy.rare": 0.5, "slice_size.rare": 3}
TOL = Tolerances(tolerance=0.01, slice_tolerance=0.03, min_slice_size=20)


def cand(**changes):
    out = {"val_accuracy": 0.91, "slice_accuracy.day": 0.93, "slice_size.day": 50,
           "slice_accuracy.night": 0.80, "slice_size.night": 40, "slice_accuracy.rare": 0.0, "slice_size.rare": 3}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


def failed(report):
    return [c.name for c in report.failed]


def test_a_candidate_as_good_passes_and_small_slices_are_not_held():
    report = check_contract(PROD, cand(), tolerances=TOL)
    assert report.passed, report.format()
    rare = next(c for c in report.checks if c.name == "slice_accuracy.rare")
    assert rare.passed and "not held" in rare.note  # 0.0 on 3 images is noise, not a regression


def test_overall_drop_beyond_tolerance_fails_and_within_passes():
    assert failed(check_contract(PROD, cand(val_accuracy=0.885), tolerances=TOL)) == ["val_accuracy"]
    assert check_contract(PROD, cand(val_accuracy=0.8901), tolerances=TOL).passed


def test_one_slice_regression_fails_alone():
    report = check_contract(PROD, cand(**{"slice_accuracy.night": 0.76}), tolerances=TOL)
    assert failed(report) == ["slice_accuracy.night"]
    assert "production 0.8" in report.failed[0].note


def test_a_slice_missing_from_the_candidate_fails():
    report = check_contract(PROD, cand(**{"slice_accuracy.night": None, "slice_size.night": None}), tolerances=TOL)
    assert failed(report) == ["slice_accuracy.night"]
    assert "missing" in report.failed[0].note


def test_a_missing_head_fails_with_its_reason():
    report = check_contract(PROD, None, tolerances=TOL, missing_reason="trunk 'x' has no tap 'layer2'")
    assert not report.passed and failed(report) == ["head"]
    assert "no tap 'layer2'" in report.failed[0].note


def test_the_heads_own_gate_and_the_golden_set_are_part_of_the_contract():
    assert failed(check_contract(PROD, cand(), tolerances=TOL, own_gate_passed=False)) == ["own gate"]
    golden = GoldenResult("g.csv", 4, [("a.png", "cat", "dog")])
    report = check_contract(PROD, cand(), tolerances=TOL, golden=golden)
    assert failed(report) == ["golden"] and "a.png: want cat, got dog" in report.failed[0].note
    assert check_contract(PROD, cand(), tolerances=TOL, golden=GoldenResult("g.csv", 4)).passed


def test_tolerances_come_from_the_head_with_platform_defaults():
    defaults = Tolerances(0.01, 0.03, 20)
    own = Tolerances.for_head({"tolerance": 0.05, "slice_tolerance": None, "min_slice_size": 10}, defaults)
    assert own == Tolerances(0.05, 0.03, 10)
    assert Tolerances.for_head({}, defaults) == defaults
    assert check_contract(PROD, cand(val_accuracy=0.86), tolerances=own).passed


def test_slices_and_worst_slice_read_mlflow_names():
    assert slices(PROD)["night"] == (0.80, 40)
    assert worst_slice(PROD) == ("rare", 0.5)
    assert worst_slice(PROD, min_size=20) == ("night", 0.80)
    assert worst_slice({"val_accuracy": 1.0}) is None


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_a_tolerance_outside_0_1_is_a_config_error_naming_the_field(value, tmp_path):
    from heads.spec import HeadConfigError, validate

    (tmp_path / "a").mkdir()
    raw = {"name": "x", "owner": "o", "data": {"root": str(tmp_path)}, "module": {"_target_": "heads.modules.LinearHead"},
           "gate": {"slice_tolerance": value}}
    with pytest.raises(HeadConfigError, match=r"x.yaml: field 'gate.slice_tolerance'"):
        validate(raw, "x.yaml", expected_name="x")


def test_the_common_unseen_subset_is_held_when_it_is_big_enough():
    from heads.checks.contract import CommonUnseen

    # The full split flatters the candidate (0.91 vs 0.90); on the images neither trunk saw it regressed.
    unseen = CommonUnseen(images=25, production_accuracy=0.88, candidate_accuracy=0.84)
    report = check_contract(PROD, cand(), tolerances=TOL, unseen=unseen)
    assert failed(report) == ["val_accuracy_unseen"]
    held = next(c for c in report.checks if c.name == "val_accuracy_unseen")
    assert held.value == 0.84 and held.limit == pytest.approx(0.87) and "25 val images neither trunk" in held.note
    full = next(c for c in report.checks if c.name == "val_accuracy")
    assert full.passed and "not held" in full.note
    # ... and a full-split drop alone no longer blocks: the unseen figure is the one that counts.
    ok = check_contract(PROD, cand(val_accuracy=0.5), tolerances=TOL,
                        unseen=CommonUnseen(images=25, production_accuracy=0.88, candidate_accuracy=0.88))
    assert ok.passed, ok.format()


def test_a_small_or_unknown_unseen_subset_falls_back_to_the_full_split_and_says_so():
    from heads.checks.contract import CommonUnseen

    small = CommonUnseen(images=19, production_accuracy=0.9, candidate_accuracy=0.1)
    report = check_contract(PROD, cand(val_accuracy=0.885), tolerances=TOL, unseen=small)
    assert failed(report) == ["val_accuracy"]
    assert "only 19 val images neither trunk trained on (< min_slice_size 20): held on the full split" in \
        report.checks[1].note
    unknown = CommonUnseen(images=None, note="trunk v1 has no record of its training images")
    report = check_contract(PROD, cand(), tolerances=TOL, unseen=unknown)
    assert report.passed and "unseen subset unknown (trunk v1 has no record" in report.checks[1].note
    assert unknown.describe().startswith("unseen subset unknown") and "full split" in unknown.describe()
    assert CommonUnseen(7, 0.5, 0.5).describe() == "compared on 7 val images neither trunk trained on"


def test_a_named_heldout_set_is_held_against_production_on_the_same_images():
    from heads.checks.contract import HeldoutPair

    def verdict(prod, got):
        report = check_contract(PROD, cand(), tolerances=TOL, heldout=HeldoutPair("h.csv", 40, prod, got))
        return next(c for c in report.checks if c.name == "heldout_accuracy"), report.passed

    check, passed = verdict(0.90, 0.895)
    assert passed and check.limit == pytest.approx(0.89) and "on 40 images of h.csv" in check.note
    check, passed = verdict(0.90, 0.88)
    assert not passed and not check.passed
    check, passed = verdict(None, None)
    assert not passed and "no held-out image could be scored" in check.note
    assert "heldout_accuracy" not in [c.name for c in check_contract(PROD, cand(), tolerances=TOL).checks]
