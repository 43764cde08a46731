"""Held-out scoring: the figures, the shared labels reader, and a head config's data.heldout on a real head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from heads.checks.heldout import LabelsError, heldout_metrics, read_labels_file, score
from heads.modules import LinearHead
from heads.spec import HeadConfigError, validate
from heads.store import LoadedHead
from trunk.model import Trunk
from trunk.seen import SeenImages, content_sha

COLOURS = ["red", "green", "blue"]
TONES = ["dark", "light"]


def test_score_gives_the_figures_computed_by_hand():
    truth = ["red", "red", "red", "green", "blue", "blue"]
    predicted = ["red", "red", "green", "green", "red", "blue"]
    slices = ["a", "a", "b", "b", "b", None]
    result = score("colour", COLOURS, truth, predicted, slices, errors=2)
    assert (result.images, result.errors) == (6, 2)
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.confusion == [[2, 1, 0], [0, 1, 0], [1, 0, 1]]
    # F1 = 2TP / (support + predicted): red 4/6, green 2/3, blue 2/3.
    assert result.macro_f1 == pytest.approx((4 / 6 + 2 / 3 + 2 / 3) / 3)
    assert result.slice_accuracy == {"a": 1.0, "b": pytest.approx(1 / 3)}
    assert result.slice_sizes == {"a": 2, "b": 3}
    metrics = result.metrics()
    assert metrics["heldout_accuracy"] == pytest.approx(4 / 6)
    assert metrics["heldout_images"] == 6.0 and metrics["heldout_errors"] == 2.0
    assert metrics["heldout_slice_accuracy.b"] == pytest.approx(1 / 3) and metrics["heldout_slice_size.a"] == 2.0
    assert metrics["heldout_recall.red"] == pytest.approx(2 / 3)
    assert not any(k.startswith("heldout_seen") for k in metrics)  # not checked: nothing claimed


def test_score_reports_the_images_the_trunk_trained_on_and_the_accuracy_on_the_rest():
    truth, predicted = ["red", "red", "green", "blue"], ["red", "green", "green", "red"]
    result = score("colour", COLOURS, truth, predicted, seen=[True, True, False, False])
    m = result.metrics()
    assert (m["heldout_seen_by_trunk"], m["heldout_seen_share"], m["heldout_unseen_images"]) == (2.0, 0.5, 2.0)
    assert m["heldout_accuracy_unseen"] == pytest.approx(0.5) and m["heldout_accuracy"] == pytest.approx(0.5)


def test_nothing_decoded_is_counted_not_scored():
    result = score("colour", COLOURS, [], [], errors=3)
    assert (result.images, result.errors, result.accuracy) == (0, 3, None)
    assert result.metrics() == {"heldout_images": 0.0, "heldout_errors": 3.0}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_labels_file_reads_one_column_per_head_and_names_file_row_column_on_a_bad_label(tmp_path):
    classes = {"colour": COLOURS, "tone": TONES, "shape": ["circle", "square"]}
    good = _write(tmp_path / "l" / "labels.csv", "path,colour,tone,extra,slice\na.png,red,,x,s1\n/abs/b.png,,dark,y,\n")
    labels = read_labels_file(good, classes)
    assert (labels.heads, labels.skipped, labels.ignored) == (["colour", "tone"], ["shape"], ["extra"])
    assert [(r.number, r.path, r.labels, r.slice) for r in labels.rows] == [
        (1, str(tmp_path / "l" / "a.png"), {"colour": "red"}, "s1"), (2, "/abs/b.png", {"tone": "dark"}, None)]

    bad = _write(tmp_path / "bad.csv", "path,colour\na.png,red\nb.png,purple\n")
    with pytest.raises(LabelsError) as err:
        read_labels_file(bad, classes)
    assert str(err.value) == (f"{bad}: row 2: column 'colour': 'purple' is not one of the head's classes "
                              f"(red, green, blue)")
    twice = _write(tmp_path / "twice.csv", "path,colour\na.png,red\n./a.png,green\n")
    with pytest.raises(LabelsError, match=r"twice.csv: row 2: column 'path': ./a.png is listed twice \(row 1 too\)"):
        read_labels_file(twice, classes)
    with pytest.raises(LabelsError, match=r"nohead.csv: no column names a head of the release"):
        read_labels_file(_write(tmp_path / "nohead.csv", "path,label\na.png,red\n"), classes)
    with pytest.raises(LabelsError, match=r"nopath.csv: missing column 'path'"):
        read_labels_file(_write(tmp_path / "nopath.csv", "file,colour\na.png,red\n"), classes)


# -- data.heldout on a real trunk and head ---------------------------------------------------------
@pytest.fixture(scope="module")
def trunk():
    return Trunk("test_resnet", data_config={"input_size": [3, 32, 32], "crop_pct": 1.0})


def always(trunk, label: str, classes=TONES) -> LoadedHead:
    """A head that predicts ``label`` for every image: its figures are known in advance."""
    module = LinearHead(in_features=trunk.tap("pooled").channels, num_classes=len(classes)).eval()
    with torch.no_grad():
        module.fc.weight.zero_()
        module.fc.bias.copy_(torch.tensor([5.0 if c == label else 0.0 for c in classes]))
    return LoadedHead(module, {"name": "tone", "tap": "pooled", "classes": list(classes), "trunk_id": trunk.trunk_id})


def tone_spec(tmp_path, heldout: str | None):
    data = {"manifest": str(tmp_path / "train" / "tone.csv")}
    if heldout is not None:
        data["heldout"] = heldout
    raw = {"name": "tone", "owner": "t", "data": data, "module": {"_target_": "heads.modules.LinearHead"}}
    return validate(raw, source="heads/tone.yaml", expected_name="tone")


@pytest.fixture
def heldout_set(tmp_path):
    rows = []
    for i, (level, label, cut) in enumerate([(10, "dark", "indoor"), (240, "light", "indoor"),
                                             (20, "dark", "outdoor"), (230, "light", "outdoor"),
                                             (250, "light", "outdoor")]):
        p = tmp_path / "heldout" / "img" / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), level, np.uint8)).save(p)
        rows.append(f"img/{i}.png,{label},{cut}")
    (tmp_path / "heldout" / "img" / "broken.png").write_bytes(b"not a png")
    rows.append("img/broken.png,dark,indoor")
    return _write(tmp_path / "heldout" / "tone.csv", "path,label,slice\n" + "\n".join(rows) + "\n")


def test_heldout_metrics_scores_the_set_a_head_config_names(tmp_path, trunk, heldout_set):
    spec = tone_spec(tmp_path, str(heldout_set))
    result = heldout_metrics(trunk, always(trunk, "light"), spec)
    # 3 of the 5 decoded images are light; the broken one is counted, not scored.
    assert (result.images, result.errors) == (5, 1)
    assert result.accuracy == pytest.approx(3 / 5)
    assert result.confusion == [[0, 2], [0, 3]]
    assert result.macro_f1 == pytest.approx((0 + 2 * 3 / (3 + 5)) / 2)  # dark 0, light 6/8
    assert result.slice_accuracy == {"indoor": 0.5, "outdoor": pytest.approx(2 / 3)}
    assert result.slice_sizes == {"indoor": 2, "outdoor": 3}

    seen = SeenImages([content_sha(heldout_set.parent / "img" / f"{i}.png") for i in (0, 1)])
    checked = heldout_metrics(trunk, always(trunk, "light"), spec, seen=seen).metrics()
    assert checked["heldout_seen_by_trunk"] == 2.0 and checked["heldout_accuracy_unseen"] == pytest.approx(2 / 3)

    assert heldout_metrics(trunk, always(trunk, "light"), tone_spec(tmp_path, None)) is None


def test_a_bad_heldout_row_is_one_line_naming_config_field_file_row_and_column(tmp_path, trunk, heldout_set):
    bad = _write(heldout_set.parent / "bad.csv", "path,label\nimg/0.png,dark\nimg/1.png,grey\n")
    with pytest.raises(HeadConfigError) as err:
        heldout_metrics(trunk, always(trunk, "light"), tone_spec(tmp_path, str(bad)))
    assert str(err.value) == (f"heads/tone.yaml: field 'data.heldout': {bad}: row 2: column 'label': 'grey' is not "
                              f"one of the head's classes (dark, light)")
    outside = _write(heldout_set.parent / "outside.csv", "path,label\n../../../etc/passwd,dark\n")
    with pytest.raises(HeadConfigError, match=r"outside.csv: row 1: column 'path': \.\./\.\./\.\./etc/passwd is "
                                              r"outside the data folders"):
        heldout_metrics(trunk, always(trunk, "light"), tone_spec(tmp_path, str(outside)))
    with pytest.raises(HeadConfigError, match=r"field 'data.heldout': .*absent.csv: no such file"):
        heldout_metrics(trunk, always(trunk, "light"), tone_spec(tmp_path, str(tmp_path / "absent.csv")))
