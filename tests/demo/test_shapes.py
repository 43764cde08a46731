import csv
import hashlib
import json

import pytest
from PIL import Image

from demo.shapes import ATTRIBUTES, DONE_FILE, generate_shapes


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_images=40, n_holdout=8, size=32, seed=3)


def test_layout_and_manifests(small_set):
    ds = small_set
    assert sorted(ds.manifests) == sorted(ATTRIBUTES)
    images = sorted((ds.root / "images").glob("*.png"))
    assert len(images) == 40 and len(list(ds.holdout_dir.glob("*.png"))) == 8
    with Image.open(images[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    per_attr = {}
    for attr, manifest in ds.manifests.items():
        rows = list(csv.DictReader(manifest.open()))
        assert list(rows[0]) == ["path", "label", "split", "slice"]
        assert len(rows) == 40
        for r in rows:
            assert (manifest.parent / r["path"]).is_file()
            assert r["label"] in ATTRIBUTES[attr]
            assert r["slice"] in ("small", "large")
        per_attr[attr] = rows
    # One split and one slice per image, the same in every manifest; exactly 20% in val.
    splits = {a: [r["split"] for r in rows] for a, rows in per_attr.items()}
    assert all(s == splits["shape"] for s in splits.values())
    assert splits["shape"].count("val") == 8


def test_holdout_labels_name_no_labels(small_set):
    rows = list(csv.DictReader(small_set.holdout_labels.open()))
    assert list(rows[0]) == ["path", *ATTRIBUTES]
    assert len(rows) == 8
    for r in rows:
        assert (small_set.root / r["path"]).is_file()
        stem = r["path"].split("/")[-1][:-4]
        assert stem.isdigit()  # the file name gives nothing away


def test_attributes_are_varied(tmp_path):
    ds = generate_shapes(tmp_path, n_images=200, n_holdout=0, size=32, seed=0)
    for attr, manifest in ds.manifests.items():
        labels = [r["label"] for r in csv.DictReader(manifest.open())]
        counts = [labels.count(v) for v in ATTRIBUTES[attr]]
        assert min(counts) >= 25, (attr, counts)  # uniform: 50 expected per value


def test_same_seed_gives_identical_bytes(tmp_path, small_set):
    again = generate_shapes(tmp_path / "again", n_images=40, n_holdout=8, size=32, seed=3)
    assert _digests(again.root / "images") == _digests(small_set.root / "images")
    assert _digests(again.holdout_dir) == _digests(small_set.holdout_dir)
    for attr in ATTRIBUTES:
        assert again.manifests[attr].read_bytes() == small_set.manifests[attr].read_bytes()
    other = generate_shapes(tmp_path / "other", n_images=40, n_holdout=8, size=32, seed=4)
    assert _digests(other.root / "images") != _digests(small_set.root / "images")


def test_rerun_same_parameters_does_nothing(tmp_path):
    ds = generate_shapes(tmp_path, n_images=10, n_holdout=2, size=32)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = generate_shapes(tmp_path, n_images=10, n_holdout=2, size=32)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert again == ds
    assert after == before
    assert json.loads((tmp_path / DONE_FILE).read_text())["n_images"] == 10


def test_other_parameters_into_same_folder_is_an_error(tmp_path):
    generate_shapes(tmp_path, n_images=10, n_holdout=2, size=32, seed=0)
    with pytest.raises(ValueError, match=r"other parameters: n_images=10 \(asked 12\)"):
        generate_shapes(tmp_path, n_images=12, n_holdout=2, size=32, seed=0)
    with pytest.raises(ValueError, match=r"seed=0 \(asked 1\)"):
        generate_shapes(tmp_path, n_images=10, n_holdout=2, size=32, seed=1)


def test_interrupted_run_is_redone(tmp_path):
    ds = generate_shapes(tmp_path, n_images=10, n_holdout=2, size=32)
    reference = _digests(tmp_path / "images")
    (tmp_path / DONE_FILE).unlink()
    (tmp_path / "images" / "00003.png").write_bytes(b"half")
    (tmp_path / "images" / "00042.png").write_bytes(b"left over from another run")
    generate_shapes(tmp_path, n_images=10, n_holdout=2, size=32)
    assert _digests(tmp_path / "images") == reference
    assert (tmp_path / DONE_FILE).is_file() and ds.n_images == 10


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="size must be at least 32"):
        generate_shapes(tmp_path, n_images=10, size=16)
    with pytest.raises(ValueError, match="n_images"):
        generate_shapes(tmp_path, n_images=0)


def test_a_shifted_copy_rotates_colours_and_keeps_everything_else(small_set, tmp_path):
    import numpy as np

    from demo.shapes import shifted_copy

    out = shifted_copy(small_set.holdout_dir, tmp_path / "shifted")
    originals = sorted(p for p in small_set.holdout_dir.iterdir() if p.suffix == ".png")
    assert sorted(p.name for p in out.glob("*.png")) == [p.name for p in originals]
    for path in originals:
        a = np.asarray(Image.open(path).convert("RGB"))
        b = np.asarray(Image.open(out / path.name))
        assert (b == a[..., [2, 0, 1]]).all()  # (R, G, B) -> (B, R, G), pixel for pixel
    before = (out / originals[0].name).stat().st_mtime_ns
    assert shifted_copy(small_set.holdout_dir, out) == out  # reused, not rewritten
    assert (out / originals[0].name).stat().st_mtime_ns == before
