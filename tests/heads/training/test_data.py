"""Labelled data: class folders and CSV/Parquet manifests, splits, data_sha, every bad input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from heads.training.data import load_labelled_data
from heads.spec import HeadConfigError, load_head_spec
from tests.conftest import write_image

COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def head_spec(tmp_path: Path, data: dict, name: str = "colour"):
    path = tmp_path / "conf" / "heads" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": name, "owner": "team-a", "data": data,
        "module": {"_target_": "heads.modules.LinearHead"},
    }))
    return load_head_spec(path)


def class_folders(root: Path, per_class: int = 5) -> Path:
    for c, colour in COLOURS.items():
        for i in range(per_class):
            # Nested folders count too: images are found recursively within a class.
            sub = root / c / ("nested" if i % 2 else "") / f"{i}.png"
            write_image(sub, colour, size=8, seed=i)
    (root / "red" / "notes.txt").write_text("not an image")
    return root


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def manifest_rows(base: Path, n: int = 4) -> list[dict]:
    rows = []
    for c, colour in COLOURS.items():
        for i in range(n):
            write_image(base / "img" / f"{c}_{i}.png", colour, size=8, seed=i)
            rows.append({"path": f"img/{c}_{i}.png", "label": c,
                         "split": "val" if i == 0 else "train", "slice": "day" if i % 2 else "night"})
    return rows


def test_class_folders_sorted_classes_recursive_and_stratified_split(tmp_path):
    root = class_folders(tmp_path / "data")
    d = load_labelled_data(head_spec(tmp_path, {"root": str(root), "val_fraction": 0.2}))
    assert d.classes == ["blue", "green", "red"]
    assert len(d.train) + len(d.val) == 15  # notes.txt is not an image
    assert all(Path(s.path).is_absolute() and Path(s.path).is_file() for s in d.train + d.val)
    assert sum("nested" in s.path for s in d.train + d.val) == 6
    # 5 images per class at 20%: exactly one validation image per class.
    assert sorted(s.label for s in d.val) == [0, 1, 2]
    for s in d.train + d.val:
        assert d.classes[s.label] in s.path and s.slice is None
    assert not d.has_slices and d.source == str(root) and len(d.data_sha) == 16


def test_split_is_seeded_and_every_class_with_two_images_gets_a_val_image(tmp_path):
    root = tmp_path / "data"
    for i in range(2):
        write_image(root / "tiny" / f"{i}.png", (0, 0, 0), size=8, seed=i)
    for i in range(30):
        write_image(root / "big" / f"{i}.png", (255, 255, 255), size=8, seed=i)
    spec = head_spec(tmp_path, {"root": str(root), "val_fraction": 0.2, "split_seed": 0})
    a, b = load_labelled_data(spec), load_labelled_data(spec)
    assert a.val == b.val and a.train == b.train
    val_counts = {c: sum(1 for s in a.val if s.label == i) for i, c in enumerate(a.classes)}
    assert val_counts == {"big": 6, "tiny": 1}
    other = load_labelled_data(head_spec(tmp_path, {"root": str(root), "val_fraction": 0.2, "split_seed": 1}))
    assert {s.path for s in other.val} != {s.path for s in a.val}
    assert other.data_sha != a.data_sha  # the split is part of what was trained on


def test_csv_manifest_given_split_slices_and_relative_paths(tmp_path):
    base = tmp_path / "ds"
    manifest = write_csv(base / "labels.csv", manifest_rows(base))
    d = load_labelled_data(head_spec(tmp_path, {"manifest": str(manifest)}))
    assert d.classes == ["blue", "green", "red"]
    assert len(d.val) == 3 and len(d.train) == 9
    assert all(s.path.endswith("_0.png") for s in d.val)
    assert d.has_slices and {s.slice for s in d.train} == {"day", "night"}
    assert Path(d.train[0].path) == (base / "img" / "blue_1.png").resolve()


def test_manifest_without_split_column_is_split_by_seed(tmp_path):
    base = tmp_path / "ds"
    rows = [{k: v for k, v in r.items() if k != "split"} for r in manifest_rows(base, n=5)]
    spec = head_spec(tmp_path, {"manifest": str(write_csv(base / "m.csv", rows)), "val_fraction": 0.4})
    d = load_labelled_data(spec)
    assert sorted(s.label for s in d.val) == [0, 0, 1, 1, 2, 2]
    assert d == load_labelled_data(spec) and d.has_slices


def test_parquet_and_csv_with_the_same_rows_give_the_same_data(tmp_path):
    base = tmp_path / "ds"
    rows = manifest_rows(base)
    csv_data = load_labelled_data(head_spec(tmp_path, {"manifest": str(write_csv(base / "m.csv", rows))}))
    pq.write_table(pa.Table.from_pylist(rows), base / "m.parquet")
    pq_data = load_labelled_data(head_spec(tmp_path, {"manifest": str(base / "m.parquet")}))
    assert pq_data.train == csv_data.train and pq_data.val == csv_data.val
    assert pq_data.data_sha == csv_data.data_sha


def test_data_sha_follows_content_not_location(tmp_path):
    root = class_folders(tmp_path / "data")
    sha = load_labelled_data(head_spec(tmp_path, {"root": str(root)})).data_sha
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(root, moved)
    assert load_labelled_data(head_spec(tmp_path, {"root": str(moved)})).data_sha == sha
    # Same name, same size, different pixels: the hash must change.
    write_image(moved / "red" / "0.png", (200, 30, 30), size=8, seed=99)
    assert load_labelled_data(head_spec(tmp_path, {"root": str(moved)})).data_sha != sha


def test_data_sha_changes_with_a_label(tmp_path):
    base = tmp_path / "ds"
    rows = manifest_rows(base)
    sha = load_labelled_data(head_spec(tmp_path, {"manifest": str(write_csv(base / "m.csv", rows))})).data_sha
    rows[1]["label"] = "green"
    assert load_labelled_data(head_spec(tmp_path, {"manifest": str(write_csv(base / "m.csv", rows))})).data_sha != sha


def _error(tmp_path, data) -> HeadConfigError:
    with pytest.raises(HeadConfigError) as e:
        load_labelled_data(head_spec(tmp_path, data))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "conf" / "heads" / "colour.yaml"))
    return e.value


def test_missing_root_and_manifest(tmp_path):
    e = _error(tmp_path, {"root": str(tmp_path / "nope")})
    assert e.field == "data.root" and "nope" in str(e)
    e = _error(tmp_path, {"manifest": str(tmp_path / "nope.csv")})
    assert e.field == "data.manifest" and "nope.csv" in str(e)


def test_missing_column_is_named(tmp_path):
    base = tmp_path / "ds"
    rows = [{k: v for k, v in r.items() if k != "label"} for r in manifest_rows(base)]
    e = _error(tmp_path, {"manifest": str(write_csv(base / "m.csv", rows))})
    assert e.field == "data.manifest" and "missing column 'label'" in str(e)


@pytest.mark.parametrize("row, column, value, message", [
    (2, "split", "test", "row 3: column 'split' is 'test'"),
    (4, "path", "img/ghost.png", "row 5: column 'path': img/ghost.png does not exist"),
    (0, "label", "", "row 1: column 'label' is empty"),
], ids=["bad split", "missing image", "empty label"])
def test_a_bad_cell_names_file_row_and_column(tmp_path, row, column, value, message):
    base = tmp_path / "ds"
    rows = manifest_rows(base)
    rows[row][column] = value
    manifest = write_csv(base / "m.csv", rows)
    e = _error(tmp_path, {"manifest": str(manifest)})
    assert e.field == "data.manifest"
    assert f"{manifest}: {message}" in str(e)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    assert _error(tmp_path, {"root": str(tmp_path / "empty")}).field == "data"
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n")
    e = _error(tmp_path, {"manifest": str(manifest)})
    assert e.field == "data" and "no images" in str(e)


def test_class_without_training_images_is_named(tmp_path):
    base = tmp_path / "ds"
    rows = manifest_rows(base)
    for r in rows:
        if r["label"] == "green":
            r["split"] = "val"
    e = _error(tmp_path, {"manifest": str(write_csv(base / "m.csv", rows))})
    assert e.field == "data" and "class 'green' has no training images" in str(e)
    root = class_folders(tmp_path / "folders")
    (root / "purple").mkdir()
    e = _error(tmp_path, {"root": str(root)})
    assert e.field == "data" and "class 'purple'" in str(e)


# -- rows may not make the platform read files outside the team's data ----------------------------
def _outside_file(tmp_path: Path) -> Path:
    secret = tmp_path / "elsewhere" / "secret.png"
    write_image(secret, (1, 2, 3), size=8, seed=0)
    return secret


@pytest.mark.parametrize("row_path", [
    "../elsewhere/secret.png",                  # relative, climbing out of the manifest's folder
    "img/../../elsewhere/secret.png",
    "../../../../../../../../etc/shadow",       # refused for being outside, before any existence check
    "{secret}",                                 # absolute
])
def test_manifest_row_outside_the_data_folder_is_refused_before_it_is_read(tmp_path, monkeypatch, row_path):
    secret = _outside_file(tmp_path)
    base = tmp_path / "ds"
    rows = manifest_rows(base)
    rows[3]["path"] = row_path.format(secret=secret)
    manifest = write_csv(base / "m.csv", rows)
    hashed = []
    monkeypatch.setattr("heads.training.data._file_sha256", lambda p: hashed.append(p) or "0" * 64)
    e = _error(tmp_path, {"manifest": str(manifest)})
    assert e.field == "data.manifest"
    assert f"{manifest}: row 4: column 'path': {rows[3]['path']} is outside the data folders ({base})" in str(e)
    assert hashed == []


def test_allow_roots_lets_rows_reach_a_named_folder(tmp_path):
    secret = _outside_file(tmp_path)
    base = tmp_path / "ds"
    rows = manifest_rows(base)
    rows[3]["path"] = str(secret)
    rows[4]["path"] = "../elsewhere/secret.png"
    rows[4]["label"] = rows[3]["label"]
    manifest = write_csv(base / "m.csv", rows)
    e = _error(tmp_path, {"manifest": str(manifest), "allow_roots": [str(tmp_path / "other")]})
    assert "row 4: column 'path'" in str(e) and f"({base}, {tmp_path / 'other'})" in str(e)
    # The same path, relative or absolute, is one file: listed twice.
    e = _error(tmp_path, {"manifest": str(manifest), "allow_roots": [str(tmp_path / "elsewhere")]})
    assert "row 5: column 'path': ../elsewhere/secret.png is already listed at row 4" in str(e)
    rows[4] = manifest_rows(base)[4]
    manifest = write_csv(base / "m.csv", rows)
    d = load_labelled_data(head_spec(tmp_path, {"manifest": str(manifest), "allow_roots": [str(tmp_path / "elsewhere")]}))
    assert str(secret) in {s.path for s in d.train + d.val}


def test_a_symlink_out_of_the_data_folder_is_refused(tmp_path):
    secret = _outside_file(tmp_path)
    base = tmp_path / "ds"
    rows = manifest_rows(base)
    (base / "img" / "link.png").symlink_to(secret)
    (base / "img" / "inner.png").symlink_to(base / "img" / "red_0.png")  # inside: fine
    (base / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    rows += [{**rows[1], "path": "img/inner.png"}]
    assert load_labelled_data(head_spec(tmp_path, {"manifest": str(write_csv(base / "m.csv", rows))}))
    for link in ("img/link.png", "escape/secret.png"):
        rows[-1] = {**rows[1], "path": link}
        e = _error(tmp_path, {"manifest": str(write_csv(base / "m.csv", rows))})
        assert f"row {len(rows)}: column 'path': {link} is outside the data folders" in str(e)
    # Class folders: a file linked out of data.root is refused too.
    root = class_folders(tmp_path / "folders")
    (root / "red" / "x.png").symlink_to(secret)
    e = _error(tmp_path, {"root": str(root)})
    assert e.field == "data.root" and f"{root / 'red' / 'x.png'} links to {secret}, outside {root}" in str(e)


def test_a_manifest_in_a_manifests_folder_reads_its_data_sets_images(tmp_path):
    # The platform's own layout (demo/shapes.py): ds/manifests/x.csv lists ../images/...
    ds = tmp_path / "ds"
    rows = manifest_rows(ds)
    for r in rows:
        r["path"] = f"../{r['path']}"
    manifest = write_csv(ds / "manifests" / "x.csv", rows)
    assert len(load_labelled_data(head_spec(tmp_path, {"manifest": str(manifest)})).train) == 9
    _outside_file(tmp_path)
    rows[0]["path"] = "../../elsewhere/secret.png"
    e = _error(tmp_path, {"manifest": str(write_csv(ds / "manifests" / "x.csv", rows))})
    assert f"row 1: column 'path': ../../elsewhere/secret.png is outside the data folders ({ds})" in str(e)


def test_class_folders_use_the_platforms_one_list_of_image_extensions(tmp_path):
    # heads/training/data.py had its own, shorter list: a .ppm the bulk classifier reads was not a
    # training image. Now both use trunk.images.IMAGE_EXTENSIONS.
    root = class_folders(tmp_path / "data")
    write_image(root / "red" / "extra.ppm", COLOURS["red"], size=8)
    d = load_labelled_data(head_spec(tmp_path, {"root": str(root), "val_fraction": 0.2}))
    assert sum(s.path.endswith("extra.ppm") for s in d.train + d.val) == 1


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_numeric_looking_labels_stay_text(tmp_path, kind):
    base = tmp_path / "ds"
    rows = manifest_rows(base)
    names = {"blue": "1", "green": "01", "red": "10"}
    for r in rows:
        r["label"] = names[r["label"]]
    if kind == "csv":
        manifest = write_csv(base / "m.csv", rows)
    else:
        manifest = base / "m.parquet"
        pq.write_table(pa.Table.from_pylist(rows), manifest)
    assert load_labelled_data(head_spec(tmp_path, {"manifest": str(manifest)})).classes == ["01", "1", "10"]


def test_manifest_that_is_not_utf8_is_one_line_naming_the_byte(tmp_path):
    base = tmp_path / "ds"
    manifest_rows(base)
    manifest = base / "m.csv"
    manifest.write_bytes(b"path,label\nimg/blue_0.png,bl\xe9u\n")
    e = _error(tmp_path, {"manifest": str(manifest)})
    assert e.field == "data.manifest"
    assert str(e).endswith(f"{manifest} cannot be read: not UTF-8 text (invalid continuation byte at byte 28)")


# -- data that cannot train a classifier ------------------------------------------------------------
def test_a_single_class_is_refused_naming_the_file_and_the_field(tmp_path):
    base = tmp_path / "ds"
    rows = [r for r in manifest_rows(base) if r["label"] == "red"]
    manifest = write_csv(base / "m.csv", rows)
    e = _error(tmp_path, {"manifest": str(manifest)})
    assert e.field == "data.manifest"
    assert f"{manifest}: column 'label' has a single class ('red', 4 images)" in str(e)
    assert "needs at least 2 classes" in str(e)
    root = tmp_path / "folders"
    for i in range(4):
        write_image(root / "red" / f"{i}.png", COLOURS["red"], size=8, seed=i)
    e = _error(tmp_path, {"root": str(root)})
    assert e.field == "data.root" and f"{root} (class folders) has a single class ('red'" in str(e)


def test_data_handed_to_training_with_one_class_is_refused_too(tmp_path):
    from heads.training.data import check_trainable

    base = tmp_path / "ds"
    spec = head_spec(tmp_path, {"manifest": str(write_csv(base / "m.csv", manifest_rows(base)))})
    data = load_labelled_data(spec)
    check_trainable(spec, data)  # three classes: fine
    data.classes = data.classes[:1]
    with pytest.raises(HeadConfigError, match=r"field 'data.manifest': .*m.csv: column 'label' has 1 class\(es\) "
                                              r"\('blue'\); a classifier needs at least 2 classes"):
        check_trainable(spec, data)


def test_a_class_too_small_for_a_stratified_split_is_refused(tmp_path):
    base = tmp_path / "ds"
    rows = [{k: v for k, v in r.items() if k != "split"} for r in manifest_rows(base)]
    rows = [r for r in rows if r["label"] != "green" or r["path"].endswith("_0.png")]  # green: one image
    manifest = write_csv(base / "m.csv", rows)
    e = _error(tmp_path, {"manifest": str(manifest)})
    assert e.field == "data.manifest"
    assert (f"{manifest}: column 'label': class 'green' has 1 image(s); without a 'split' column each class needs "
            f"at least 2 (1 for training, 1 for validation)") in str(e)
    # With the team's own split the same class is fine: it trains, and is simply absent from val.
    rows = [{**r, "split": "train" if r["label"] == "green" or not r["path"].endswith("_0.png") else "val"}
            for r in rows]
    d = load_labelled_data(head_spec(tmp_path, {"manifest": str(write_csv(base / "split.csv", rows))}))
    assert d.classes == ["blue", "green", "red"] and {d.classes[s.label] for s in d.val} == {"blue", "red"}


def test_the_platform_split_keeps_images_the_trunk_trained_on_out_of_validation(tmp_path):
    from trunk.seen import SeenImages, content_sha

    spec = head_spec(tmp_path, {"root": str(class_folders(tmp_path / "data", per_class=10)), "val_fraction": 0.3})
    plain = load_labelled_data(spec)
    assert plain.kept_out_of_val == 0 and len(plain.val) == 9  # 3 per class
    seen = [s.path for s in plain.val if plain.classes[s.label] == "red"][:2]
    steered = load_labelled_data(spec, avoid=SeenImages(content_sha(p) for p in seen))
    assert steered.kept_out_of_val == 2
    assert not set(seen) & {s.path for s in steered.val} and set(seen) <= {s.path for s in steered.train}
    # Validation keeps its size where the class has unseen images, and other classes are untouched.
    assert len(steered.val) == 9
    assert [s for s in steered.val if plain.classes[s.label] != "red"] == \
        [s for s in plain.val if plain.classes[s.label] != "red"]
    assert steered.data_sha != plain.data_sha  # another split is other data
    # Nothing the trunk saw among the val images: the very same split.
    unrelated = SeenImages(content_sha(s.path) for s in plain.train[:4])
    assert load_labelled_data(spec, avoid=unrelated) == plain


def test_a_team_split_is_kept_even_where_the_trunk_saw_its_val_images(tmp_path):
    from trunk.seen import SeenImages, content_sha

    base = tmp_path / "ds"
    spec = head_spec(tmp_path, {"manifest": str(write_csv(base / "m.csv", manifest_rows(base)))})
    plain = load_labelled_data(spec)
    steered = load_labelled_data(spec, avoid=SeenImages(content_sha(s.path) for s in plain.val))
    assert steered == plain and steered.kept_out_of_val == 0  # its overlap is reported by the head job


def test_data_sha_through_the_hash_index_reads_only_changed_files(tmp_path):
    import os

    from trunk.hashindex import ContentHashes

    root = class_folders(tmp_path / "ds")
    images = sorted(p for p in root.rglob("*.png"))
    old = 1_600_000_000 * 10**9  # long ago: the index trusts entries hashed now
    for i, p in enumerate(images):
        os.utime(p, ns=(old, old + i))
    spec = head_spec(tmp_path, {"root": str(root)})
    plain = load_labelled_data(spec).data_sha
    cold = ContentHashes(tmp_path / "cache")
    assert load_labelled_data(spec, hashes=cold).data_sha == plain  # the same hash, index or not
    assert cold.hashed == len(images) and cold.unsaved == 0  # saved
    warm = ContentHashes(tmp_path / "cache")
    assert load_labelled_data(spec, hashes=warm).data_sha == plain
    assert warm.hashed == 0 and warm.hits == len(images)

    os.utime(images[0], ns=(old, old + 10**9))  # touched, same bytes
    touched = ContentHashes(tmp_path / "cache")
    assert load_labelled_data(spec, hashes=touched).data_sha == plain
    assert touched.hashed == 1

    write_image(images[1], (1, 2, 3), size=8, seed=99)  # new pixels
    os.utime(images[1], ns=(old, old + 2 * 10**9))
    edited = ContentHashes(tmp_path / "cache")
    changed = load_labelled_data(spec, hashes=edited).data_sha
    assert edited.hashed == 1 and edited.hits == len(images) - 1
    assert changed != plain and changed == load_labelled_data(spec).data_sha
