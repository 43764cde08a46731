"""Finding inputs: image folders and .txt/.csv/.parquet manifests."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trunk.images import IMAGE_EXTENSIONS, list_images, read_path_list, resolve_inputs


def test_list_images_recursive_sorted_case_insensitive(image_factory, tmp_path):
    made = [
        image_factory("b/z.PNG"),
        image_factory("a.jpg", fmt="JPEG"),
        image_factory("b/c/y.JpEg", fmt="JPEG"),
        image_factory("b/x.webp"),
    ]
    (tmp_path / "b" / "readme.txt").write_text("not an image")
    image_factory(".hidden/skip.png")
    image_factory("b/._resource.png")
    assert list_images(tmp_path) == sorted(made)
    assert {".jpg", ".jpeg", ".png", ".webp"} <= IMAGE_EXTENSIONS


def test_list_images_missing_or_empty_folder(tmp_path):
    with pytest.raises(ValueError, match=f"^{tmp_path / 'nope'}: image folder does not exist$"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'empty'}: no image files found"):
        list_images(tmp_path / "empty")


def test_txt_manifest_skips_blanks_and_comments_and_resolves_relative(tmp_path):
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "in.txt"
    manifest.write_text("# my images\nimgs/a.png\n\n   \n/abs/b.jpg\n  ../c.png  \n")
    assert read_path_list(manifest) == [
        str(tmp_path / "lists" / "imgs" / "a.png"),
        "/abs/b.jpg",
        str(tmp_path / "lists" / ".." / "c.png"),
    ]


def test_csv_manifest(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("label,path\ncat,a.png\ndog,/x/b.png\n")
    assert read_path_list(manifest) == [str(tmp_path / "a.png"), "/x/b.png"]


def test_csv_manifest_errors_name_file_and_field(tmp_path):
    no_col = tmp_path / "m.csv"
    no_col.write_text("file,label\na.png,cat\n")
    with pytest.raises(ValueError) as e:
        read_path_list(no_col)
    assert str(e.value) == f"{no_col}: field 'path': column missing; columns: file, label"
    blank = tmp_path / "blank.csv"
    blank.write_text("path,label\na.png,cat\n,dog\n")
    with pytest.raises(ValueError, match=f"^{blank}: field 'path': empty in row 3$"):
        read_path_list(blank)
    header_only = tmp_path / "h.csv"
    header_only.write_text("path\n")
    with pytest.raises(ValueError, match="manifest lists no images"):
        read_path_list(header_only)


def test_parquet_manifest_and_missing_column(tmp_path):
    good = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.png", "/y/b.png"], "label": ["x", "y"]}), good)
    assert read_path_list(good) == [str(tmp_path / "a.png"), "/y/b.png"]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"file": ["a.png"]}), bad)
    with pytest.raises(ValueError) as e:
        read_path_list(bad)
    assert str(e.value) == f"{bad}: field 'path': column missing; columns: file"
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(ValueError, match=f"^{garbage}: not a readable Parquet file"):
        read_path_list(garbage)


def test_unknown_or_missing_manifest(tmp_path):
    with pytest.raises(ValueError, match=r"unknown manifest type '\.json'"):
        read_path_list(tmp_path / "m.json")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'm.txt'}: manifest file does not exist$"):
        read_path_list(tmp_path / "m.txt")


def test_resolve_inputs_folder_or_manifest(image_factory, tmp_path):
    a = image_factory("imgs/a.png")
    b = image_factory("imgs/b.png", seed=1)
    assert resolve_inputs(tmp_path / "imgs") == [str(a), str(b)]
    manifest = tmp_path / "list.txt"
    manifest.write_text("imgs/b.png\n")
    assert resolve_inputs(manifest) == [str(b)]
    with pytest.raises(ValueError, match="input does not exist"):
        resolve_inputs(tmp_path / "nothing")
    with pytest.raises(ValueError, match="neither a folder nor a manifest"):
        resolve_inputs(a)
