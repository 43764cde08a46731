"""Evaluation: metrics checked against hand-computed values; the confusion PNG is a real image."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from heads.training.evaluate import evaluate, plot_confusion

CLASSES = ["cat", "dog", "fox"]
Y = [0, 0, 0, 1, 1, 2]
PREDS = [0, 0, 1, 1, 1, 0]


def test_metrics_match_hand_computation():
    ev = evaluate(torch.tensor(PREDS), torch.tensor(Y), CLASSES)
    assert ev.accuracy == pytest.approx(4 / 6)
    assert ev.confusion == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert ev.per_class_recall == pytest.approx({"cat": 2 / 3, "dog": 1.0, "fox": 0.0})
    # F1: cat 2*2/(3+3)=2/3, dog 2*2/(2+3)=4/5, fox 0.
    assert ev.macro_f1 == pytest.approx((2 / 3 + 4 / 5 + 0.0) / 3)
    assert ev.slice_accuracy == {} and ev.slice_sizes == {}


def test_logits_and_predictions_agree():
    logits = torch.full((6, 3), -1.0)
    logits[torch.arange(6), torch.tensor(PREDS)] = 2.0
    assert evaluate(logits, Y, CLASSES) == evaluate(PREDS, Y, CLASSES)


def test_class_absent_from_labels_and_predictions_does_not_count():
    ev = evaluate([0, 1, 1], [0, 1, 0], CLASSES)
    assert set(ev.per_class_recall) == {"cat", "dog"}  # fox has no validation examples
    assert ev.macro_f1 == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert ev.confusion[2] == [0, 0, 0]


def test_slices_with_minimum_size():
    slices = ["day", "day", "night", "night", "day", None]
    ev = evaluate(PREDS, Y, CLASSES, slices=slices)
    # day: rows 0,1,4 all right; night: rows 2 (wrong), 3 (right); row 5 has no slice.
    assert ev.slice_accuracy == {"day": 1.0, "night": 0.5}
    assert ev.slice_sizes == {"day": 3, "night": 2}
    ev = evaluate(PREDS, Y, CLASSES, slices=slices, min_slice_size=3)
    assert ev.slice_accuracy == {"day": 1.0} and ev.slice_sizes == {"day": 3}


def test_bad_inputs():
    with pytest.raises(ValueError, match="no labels"):
        evaluate([], [], CLASSES)
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate([0, 1], [0], CLASSES)
    with pytest.raises(ValueError, match="class indices"):
        evaluate([0, 3], [0, 1], CLASSES)
    with pytest.raises(ValueError, match="slice values"):
        evaluate(PREDS, Y, CLASSES, slices=["a"])


def test_plot_confusion_writes_a_png(tmp_path):
    path = plot_confusion([[2, 1, 0], [0, 2, 0], [1, 0, 0]], CLASSES, tmp_path / "sub" / "cm.png", "colour head")
    assert path == tmp_path / "sub" / "cm.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 300
        # Not a blank canvas: the matrix is drawn in several colours.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 10
