"""Side-by-side trunk speed: counts checked exactly, times only for being measured."""

from __future__ import annotations

import pytest
import torch

from trunk.speed import compare_trunks
from tests.conftest import SMALL
from trunk.model import Trunk, state_dict_digest

KEYS = {"teacher_ms_per_image", "student_ms_per_image", "speedup", "teacher_gflops", "student_gflops",
        "flops_ratio", "teacher_params", "student_params"}


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
    assert trunk_size(small) == {"gflops": same["teacher_gflops"], "params": same["teacher_params"]}
    assert trunk_size(big)["gflops"] == pytest.approx(4 * trunk_size(small)["gflops"], rel=0.05)
