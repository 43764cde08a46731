"""Side-by-side trunk speed: counts checked exactly, times only for being measured."""

from __future__ import annotations

import pytest
import torch

from trunk.speed import compare_trunks
from tests.conftest import SMALL
from trunk.model import Trunk, state_dict_digest

KEYS = {"teacher_ms_per_image", "student_ms_per_image", "speedup", "teacher_gflops", "student_gflops",
        "flops_ratio", "teacher_params", "student_params", "teacher_ms_per_image_q1", "teacher_ms_per_image_q3",
        "student_ms_per_image_q1", "student_ms_per_image_q3", "speedup_q1", "speedup_q3", "rounds"}


@pytest.fixture(scope="module")
def pair():
    teacher = Trunk("test_resnet", data_config=SMALL)
    student = Trunk("test_resnet", data_config=teacher.data_config,
                    model_kwargs={"channels": [16, 24, 24, 48], "stem_width": 8})
    return teacher, student


def test_compare_trunks_reports_every_figure(pair, one_thread):
    teacher, student = pair
    before = state_dict_digest(student.state_dict())
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = compare_trunks(teacher, student, pixels, repeats=3, warmup=1)
    assert set(out) == KEYS
    assert all(v > 0 for v in out.values())
    assert out["teacher_params"] == sum(p.numel() for p in teacher.parameters())
    assert out["student_params"] == sum(p.numel() for p in student.parameters())
    assert out["teacher_params"] > out["student_params"]
    assert out["flops_ratio"] > 1
    assert out["flops_ratio"] == pytest.approx(out["teacher_gflops"] / out["student_gflops"])
    assert state_dict_digest(student.state_dict()) == before and not student.training


def test_flops_are_per_image_not_per_batch(pair, one_thread):
    teacher, student = pair
    one = compare_trunks(teacher, student, torch.randn(1, 3, 32, 32), repeats=1, warmup=0)
    eight = compare_trunks(teacher, student, torch.randn(8, 3, 32, 32), repeats=1, warmup=0)
    assert one["teacher_gflops"] == eight["teacher_gflops"]
    assert one["student_gflops"] == eight["student_gflops"]


def test_a_trunk_against_itself_has_ratio_one(pair, one_thread):
    teacher, _ = pair
    out = compare_trunks(teacher, teacher, torch.randn(2, 3, 32, 32), repeats=3, warmup=1)
    assert out["flops_ratio"] == 1.0 and out["teacher_params"] == out["student_params"]


def test_bad_pixels_are_refused(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        compare_trunks(teacher, student, torch.randn(3, 32, 32))


def test_trunk_size_counts_one_trunk_at_its_own_input_size():
    from trunk.speed import compare_trunks, trunk_size

    small = Trunk("test_resnet", data_config={"input_size": [3, 32, 32], "crop_pct": 1.0})
    big = Trunk("test_resnet", data_config={"input_size": [3, 64, 64], "crop_pct": 1.0})
    same = compare_trunks(small, small, torch.zeros(2, 3, 32, 32), repeats=1, warmup=0)
    # float32 weights: 4 bytes a parameter, plus the batch norms' running statistics (and counters).
    buffers = sum(b.numel() * b.element_size() for b in small.model.buffers())
    assert trunk_size(small) == {"gflops": same["teacher_gflops"], "params": same["teacher_params"],
                                 "weight_bytes": 4 * same["teacher_params"] + buffers}
    assert trunk_size(big)["gflops"] == pytest.approx(4 * trunk_size(small)["gflops"], rel=0.05)


def test_stated_speedup_is_the_ratio_of_the_medians_shown(pair, monkeypatch):
    """Noisy rounds where the median per-round ratio says "faster" but the medians say "slower".

    The cascade once printed "4.020 -> 4.577 ms/image, 1.01x the speed": two statistics of
    one measurement. The stated ratio must be the one of the milliseconds shown.
    """
    teacher, student = pair
    rounds = {"teacher": [4.0, 8.0, 12.0], "student": [12.0, 4.0, 9.0]}  # ms per batch of 2

    def controlled(contenders, *, warmup, repeats, device, **_):
        for run in contenders.values():
            run()
        return rounds

    monkeypatch.setattr("trunk.speed.interleaved", controlled)
    out = compare_trunks(teacher, student, torch.randn(2, 3, 32, 32), repeats=3, warmup=0)
    assert out["teacher_ms_per_image"] == 4.0 and out["student_ms_per_image"] == 4.5
    assert out["speedup"] == pytest.approx(8.0 / 9.0)  # < 1: the student is slower, as its ms say
    # The per-round ratios 1/3, 2 and 4/3 give the spread, not the figure.
    assert (out["speedup_q1"], out["speedup_q3"]) == pytest.approx((5 / 6, 5 / 3))
    assert (out["student_ms_per_image_q1"], out["student_ms_per_image_q3"]) == (3.25, 5.25)
    assert out["rounds"] == 3
