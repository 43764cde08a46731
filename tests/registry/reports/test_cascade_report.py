"""The cascade report's wording and figure on controlled inputs: speed in one direction, spreads, no empty panels."""

from __future__ import annotations

from types import SimpleNamespace

from registry.reports.cascade import figure, head_rows, panels, plot, trunk_line

SIZES = {"same_input": True, "teacher_gflops": 0.5, "student_gflops": 0.25, "flops_ratio": 2.0,
         "teacher_params": 1000, "student_params": 500}


def outcome(prod: dict, cand: dict, passed: bool = True):
    return SimpleNamespace(production_metrics=prod, candidate_metrics=cand, production_version=1,
                           candidate_version=2, status="READY", passed=passed, blocking=lambda: "")


def cascade(outcomes: dict):
    return SimpleNamespace(outcomes=outcomes, production=SimpleNamespace(trunk_version=1, version=3),
                           candidate_version=2, candidate=SimpleNamespace(model_name="test_resnet"),
                           cascade_id="abc123", verdict="PASS", promoted=None, refused=None)


def test_a_slower_candidate_is_called_slower_from_the_ms_shown():
    # The figures of the report that said "4.020 -> 4.577 ms/image, 1.01x the speed".
    cost = {**SIZES, "teacher_ms_per_image": 4.020, "student_ms_per_image": 4.577, "speedup": 1.01}
    line = trunk_line(cascade({}), cost)
    assert "4.020 ms -> 4.577 ms per image: candidate trunk is 1.14x slower" in line
    assert "the speed" not in line and "2.00x fewer" in line


def test_a_faster_candidate_is_called_faster_with_the_spread():
    cost = {**SIZES, "teacher_ms_per_image": 4.48, "student_ms_per_image": 4.0, "speedup": 1.12,
            "teacher_ms_per_image_q1": 4.4, "teacher_ms_per_image_q3": 4.6, "student_ms_per_image_q1": 3.9,
            "student_ms_per_image_q3": 4.1, "speedup_q1": 1.08, "speedup_q3": 1.16, "rounds": 20}
    line = trunk_line(cascade({}), cost)
    assert ("4.480 ms (IQR 4.400-4.600) -> 4.000 ms (IQR 3.900-4.100) per image: candidate trunk is 1.12x faster "
            "(per-round ratios IQR 1.08x-1.16x faster, 20 rounds") in line
    slower = {**cost, "teacher_ms_per_image": 4.0, "student_ms_per_image": 4.48, "speedup_q1": 1 / 1.16,
              "speedup_q3": 1 / 1.08}
    assert "1.12x slower (per-round ratios IQR 1.08x-1.16x slower" in trunk_line(cascade({}), slower)


def test_added_ms_below_the_noise_is_shown_as_such():
    prod = {"val_accuracy": 0.9, "added_ms_per_image": 12.85, "added_ms_per_image_spread": 0.5}
    cand = {"val_accuracy": 0.91, "added_ms_per_image": 0.01, "added_ms_per_image_spread": 0.05}
    row, = head_rows(cascade({"digit": outcome(prod, cand)}))
    assert row["added ms/img"] == "12.8500 (IQR 0.5000) -> < 0.05 (below timing noise)"


def test_without_slices_the_figure_has_no_worst_slice_panel(tmp_path):
    import matplotlib.pyplot as plt

    plain = cascade({"digit": outcome({"val_accuracy": 0.9}, {"val_accuracy": 0.92}),
                     "parity": outcome({"val_accuracy": 0.95}, {"val_accuracy": 0.94}, passed=False)})
    rows = head_rows(plain)
    fig = figure(plain, rows)
    assert [ax.get_title() for ax in fig.axes] == ["val accuracy"]
    plt.close(fig)
    assert plot(plain, rows, tmp_path / "r.png").stat().st_size > 0

    sliced = cascade({"digit": outcome({"val_accuracy": 0.9, "slice_accuracy.scan": 0.8},
                                       {"val_accuracy": 0.92, "slice_accuracy.scan": 0.85})})
    rows = head_rows(sliced)
    assert [p[0] for p in panels(rows)] == ["val accuracy", "worst slice accuracy"]
    fig = figure(sliced, rows)
    assert [ax.get_title() for ax in fig.axes] == ["val accuracy", "worst slice accuracy"]
    plt.close(fig)


def test_flops_change_is_worded_one_way():
    for ratio, words in ((2.0, "2.00x fewer"), (0.5, "2.00x more"), (1.0, "the same FLOPs")):
        cost = {**SIZES, "same_input": False, "flops_ratio": ratio}
        assert f"({words})" in trunk_line(cascade({}), cost)
