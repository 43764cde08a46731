"""Golden sets: reading the file (errors name file, row and field) and running a real head on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from heads.checks.golden import check_golden, read_golden
from heads.modules import LinearHead
from heads.spec import HeadConfigError
from heads.store import LoadedHead
from trunk.model import Trunk

CLASSES = ["dark", "light"]


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, level in enumerate((10, 240, 30, 220)):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), level, np.uint8)).save(p)
        paths.append(p)
    return paths


def head(trunk):
    torch.manual_seed(0)
    module = LinearHead(in_features=trunk.tap("pooled").channels, num_classes=2).eval()
    return LoadedHead(module, {"name": "tone", "tap": "pooled", "classes": CLASSES, "trunk_id": trunk.trunk_id})


def test_read_golden_resolves_relative_paths_and_refuses_bad_rows(tmp_path, images):
    good = tmp_path / "golden.csv"
    good.write_text("path,label\nimg/0.png,dark\nimg/1.png,light\n")
    assert read_golden(good, CLASSES, "tone.yaml") == [(str(images[0]), "dark"), (str(images[1]), "light")]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nimg/0.png,dark\nimg/1.png,purple\n")
    with pytest.raises(HeadConfigError, match=r"tone.yaml: field 'gate.golden': .*bad.csv: row 2: column 'label': "
                                              r"'purple' is not one of"):
        read_golden(bad, CLASSES, "tone.yaml")
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("path\nimg/0.png\n")
    with pytest.raises(HeadConfigError, match="missing column 'label'"):
        read_golden(nolabel, CLASSES, "tone.yaml")
    with pytest.raises(HeadConfigError, match="no such file"):
        read_golden(tmp_path / "absent.csv", CLASSES, "tone.yaml")


def test_check_golden_lists_every_wrong_label_and_undecodable_image(tmp_path, images):
    from heads.bank import HeadBank
    from heads.predict import BatchPredictor
    from trunk.loader import iter_decoded
    from trunk.preprocess import eval_transform

    trunk = Trunk("test_resnet", data_config={"input_size": [3, 32, 32], "crop_pct": 1.0})
    tone = head(trunk)
    batch = next(iter_decoded([str(p) for p in images], eval_transform(trunk.data_config), batch_size=8))
    predicted = BatchPredictor(trunk, HeadBank({"tone": tone}), torch.device("cpu"))(batch.pixels)["tone"][0]
    items = [(str(p), label) for p, label in zip(images, predicted)]
    assert check_golden(trunk, "tone", tone, items, source="g.csv").wrong == []

    flipped = {"dark": "light", "light": "dark"}
    empty = tmp_path / "img" / "empty.png"
    empty.write_bytes(b"")
    items = [(items[0][0], flipped[items[0][1]]), *items[1:], (str(empty), "dark")]
    result = check_golden(trunk, "tone", tone, items, source="g.csv")
    assert result.total == 5 and result.correct == 3
    assert result.wrong[0] == (items[0][0], items[0][1], predicted[0])
    assert result.wrong[1][0] == str(empty) and result.wrong[1][2].startswith("error: empty file")


def test_golden_rows_outside_the_allowed_folders_are_refused(tmp_path, images):
    secret = tmp_path / "elsewhere" / "s.png"
    secret.parent.mkdir()
    secret.write_bytes(images[0].read_bytes())
    golden = tmp_path / "g" / "golden.csv"
    golden.parent.mkdir()
    golden.write_text("path,label\n../img/0.png,dark\n")
    with pytest.raises(HeadConfigError, match=r"^tone.yaml: field 'gate.golden': .*golden.csv: row 1: column 'path': "
                                              r"\.\./img/0\.png is outside the data folders"):
        read_golden(golden, CLASSES, "tone.yaml")
    # The head's own data folders (heads.training.data.data_roots) are allowed, real paths compared.
    assert read_golden(golden, CLASSES, "tone.yaml", allow_roots=[tmp_path / "img"]) == [(str(images[0]), "dark")]
    golden.write_text(f"path,label\n{secret},dark\n")
    with pytest.raises(HeadConfigError, match=r"row 1: column 'path': .*s\.png is outside"):
        read_golden(golden, CLASSES, "tone.yaml", allow_roots=[tmp_path / "img"])
    (tmp_path / "img" / "link.png").symlink_to(secret)
    golden.write_text("path,label\n../img/link.png,dark\n")
    with pytest.raises(HeadConfigError, match=r"row 1: column 'path': \.\./img/link\.png is outside"):
        read_golden(golden, CLASSES, "tone.yaml", allow_roots=[tmp_path / "img"])


def test_golden_labels_that_look_like_numbers_stay_text(tmp_path, images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    golden = tmp_path / "golden.parquet"
    pq.write_table(pa.table({"path": ["img/0.png", "img/1.png"], "label": [0, 1]}), golden)
    assert read_golden(golden, ["0", "1"], "tone.yaml") == [(str(images[0]), "0"), (str(images[1]), "1")]
