"""Finding inputs: image folders and .txt/.csv/.parquet manifests, local or as fsspec URIs."""

from __future__ import annotations

import csv
import io
import os
import random
import re
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import write_image
from trunk.images import (
    IMAGE_EXTENSIONS, list_images, path_from_text, path_text, read_path_list, resolve_inputs, utf8_text,
)


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


def test_parquet_manifest(tmp_path):
    good = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.png", "/y/b.png"], "label": ["x", "y"]}), good)
    assert read_path_list(good) == [str(tmp_path / "a.png"), "/y/b.png"]


@pytest.fixture(params=["local", "memory"])
def manifest_dir(request, tmp_path) -> str:
    """A folder for manifests: a local path, or an fsspec URI (the same reader serves both)."""
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("memfs")
    return "memory://m"


# content: bytes, a Parquet table's columns, or None (no file); message: a regular
# expression for all of the one line after the manifest's name.
@pytest.mark.parametrize("name, content, message", [
    ("nocol.csv", b"file,label\na.png,cat\n", r"field 'path': column missing; columns: file, label"),
    ("blank.csv", b"path,label\na.png,cat\n,dog\n", r"field 'path': empty in row 3"),
    ("header.csv", b"path\n", r"manifest lists no images"),
    ("nocol.parquet", {"file": ["a.png"]}, r"field 'path': column missing; columns: file"),
    ("blank.parquet", {"path": ["a.png", " "]}, r"field 'path': empty in row 1"),
    ("garbage.parquet", b"not parquet", r"not a readable Parquet file \(.+\)"),
    ("empty.txt", b"# nothing\n\n", r"manifest lists no images"),
    ("missing.txt", None, r"manifest file does not exist"),
    ("m.json", b"[]", r"unknown manifest type '\.json'.*"),
])
def test_manifest_errors_name_file_and_field(manifest_dir, name, content, message):
    manifest = f"{manifest_dir}/{name}"
    if content is not None:
        with fsspec.open(manifest, "wb") as f:
            if isinstance(content, dict):
                pq.write_table(pa.table(content), f)
            else:
                f.write(content)
    with pytest.raises(ValueError, match=f"^{re.escape(manifest)}: {message}$"):
        read_path_list(manifest)


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


# --- fsspec URIs: real filesystems (file://, memory://; the memfs fixture is in conftest.py), no mocks ---

def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_file_uri_folder_lists_like_local_folder(image_factory, tmp_path):
    made = [
        image_factory("b/z.PNG"),
        image_factory("a/x.jpg", fmt="JPEG"),
        image_factory("a-b/y.png"),  # "-" sorts before "/" as text, after it as a path component
        image_factory("b/c/y.JpEg", fmt="JPEG"),
    ]
    image_factory(".hidden/skip.png")
    image_factory("b/._resource.png")
    (tmp_path / "b" / "readme.txt").write_text("not an image")
    got = resolve_inputs(tmp_path.as_uri())
    assert got == [f"file://{p}" for p in list_images(tmp_path)]
    assert got == [f"file://{p}" for p in sorted(made)]
    with fsspec.open(got[0]) as f:
        assert Image.open(f).size == (40, 40)


def test_memory_folder_uri_recursive_hidden_skipped_sorted(memfs):
    for name in ["d/b/z.PNG", "d/a.jpg", "d/b/c/y.webp", "d/.hidden/skip.png", "d/b/._fork.png"]:
        memfs.pipe(f"memory://{name}", _png_bytes())
    memfs.pipe("memory://d/notes.txt", b"not an image")
    memfs.pipe("memory://other/e.png", _png_bytes())
    got = resolve_inputs("memory://d")
    assert got == ["memory:///d/a.jpg", "memory:///d/b/c/y.webp", "memory:///d/b/z.PNG"]
    with fsspec.open(got[0]) as f:
        assert Image.open(f).size == (8, 8)
    memfs.pipe("memory://empty/a.txt", b"x")
    with pytest.raises(ValueError, match=r"^memory://empty: no image files found \(extensions: "):
        resolve_inputs("memory://empty")
    with pytest.raises(ValueError, match=r"^memory://nothing: input does not exist \(give an image folder"):
        resolve_inputs("memory://nothing")
    with pytest.raises(ValueError, match=r"^memory://d/a\.jpg: input is neither a folder nor a manifest"):
        resolve_inputs("memory://d/a.jpg")


EXPECTED_MEMORY = [
    "memory:///data/lists/imgs/a.png",  # relative: joined to the manifest's folder URI
    "/abs/b.jpg",  # absolute local path: kept
    "s3://bucket/c.png",  # another URI: kept
    "memory:///data/d.png",  # "..": resolved, object stores do not
]


def test_memory_manifests_txt_csv_parquet(memfs):
    with fsspec.open("memory://data/lists/in.txt", "w", encoding="utf-8") as f:
        f.write("# images\nimgs/a.png\n\n  /abs/b.jpg \ns3://bucket/c.png\r\n../d.png")
    with fsspec.open("memory://data/lists/in.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "path"])
        writer.writerows([["x", "imgs/a.png"], ["y", "/abs/b.jpg"], ["z", "s3://bucket/c.png"], ["w", "../d.png"]])
    with fsspec.open("memory://data/lists/in.parquet", "wb") as f:
        pq.write_table(pa.table({"path": ["imgs/a.png", "/abs/b.jpg", "s3://bucket/c.png", "../d.png"]}), f)
    for suffix in ("txt", "csv", "parquet"):
        assert resolve_inputs(f"memory://data/lists/in.{suffix}") == EXPECTED_MEMORY, suffix
        assert read_path_list(f"memory://data/lists/in.{suffix}") == EXPECTED_MEMORY, suffix


def test_unknown_protocol_or_missing_backend_is_one_line():
    with pytest.raises(ValueError) as e:
        resolve_inputs("nosuchproto://bucket/images")
    assert str(e.value) == "nosuchproto://bucket/images: unknown fsspec protocol 'nosuchproto'"
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError) as e:
            resolve_inputs("s3://bucket/images")
        # fsspec names the package to install; we pass it on, on one line.
        assert str(e.value) == "s3://bucket/images: no fsspec backend for protocol 's3' (Install s3fs to access S3)"


def test_local_manifest_keeps_uri_entries(tmp_path):
    manifest = tmp_path / "in.txt"
    manifest.write_text("a.png\ns3://bucket/b.png\nmemory://c/d.png\n")
    assert read_path_list(manifest) == [str(tmp_path / "a.png"), "s3://bucket/b.png", "memory://c/d.png"]
    csv_manifest = tmp_path / "in.csv"
    csv_manifest.write_text("path\ngs://bucket/e.png\n")
    assert resolve_inputs(csv_manifest) == ["gs://bucket/e.png"]


def test_txt_manifest_bom_and_nul_byte_offset(tmp_path):
    manifest = tmp_path / "bom.txt"
    manifest.write_bytes(b"\xef\xbb\xbfa.png\r\nb.png\n")
    assert read_path_list(manifest) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("a.png\n".encode("utf-16-le"))
    nul = f"^{utf16}: not a text list of paths \\(NUL byte at byte 1; save it as UTF-8\\)$"
    with pytest.raises(ValueError, match=nul):
        read_path_list(utf16)


def test_txt_manifest_line_that_is_not_utf8_is_that_file(tmp_path):
    # A line is a file name's bytes, as `find` prints them: before, one such line refused the list.
    name = os.fsdecode(b"b\xff\xfe.png")
    write_image(tmp_path / name, (10, 200, 10))
    manifest = tmp_path / "list.txt"
    manifest.write_bytes(b"a.png\nb\xff\xfe.png\n")
    paths = read_path_list(manifest)
    assert paths == [str(tmp_path / "a.png"), str(tmp_path / name)]
    assert os.fsencode(paths[1]).endswith(b"/b\xff\xfe.png") and Path(paths[1]).is_file()


def test_path_text_is_lossless_and_leaves_ordinary_paths_alone():
    assert path_text("/data/a b/é.png") == "/data/a b/é.png"
    assert path_text(os.fsdecode(b"/d/bad\xff\xfe.png")) == "/d/bad\\xff\\xfe.png"
    # A literal backslash is doubled, so a real "\\xff" in a name cannot pass for a byte.
    assert path_text("/d/bad\\xff.png") == "/d/bad\\\\xff.png"
    assert path_text(os.fsdecode(b"/d/bad\\\xff.png")) == "/d/bad\\\\\\xff.png"
    rng = random.Random(0)
    alphabet = [b"\\", b"x", b"f", b"0", b"/", b"\xff", b"\xc3", b"\xa9", b"\xe2\x82\xac", b"a"]
    for _ in range(2000):
        raw = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        path = os.fsdecode(raw)
        text = path_text(path)
        text.encode("utf-8")  # always writable as UTF-8
        assert path_from_text(text) == path
    assert utf8_text("file not found: /d/a.png") == "file not found: /d/a.png"
    odd = os.fsdecode(b"/d/x\xff")
    assert utf8_text(f"file not found: {odd}") == "file not found: /d/x\\xff"


def test_pq_manifest_is_parquet_and_a_short_csv_row_is_named(tmp_path):
    # One list of Parquet suffixes (trunk.manifest): head manifests took .pq, input lists did not.
    manifest = tmp_path / "m.pq"
    pq.write_table(pa.table({"path": ["a.png", "/y/b.png"]}), manifest)
    assert resolve_inputs(manifest) == [str(tmp_path / "a.png"), "/y/b.png"]
    short = tmp_path / "short.csv"
    short.write_text("label,path\ncat,a.png\ndog\n")
    with pytest.raises(ValueError) as e:
        read_path_list(short)
    assert str(e.value) == f"{short}: not valid CSV (row 3: Expected 2 columns, got 1: dog)"


def test_iter_images_streams_in_the_sorted_path_order(tmp_path):
    from trunk.images import iter_images

    root = tmp_path / "tree"
    names = ["a/b/c.png", "a/b-x.png", "a-b.png", "a/.hidden/x.png", "a/._y.jpg", "z.JPG", "a/b/d.txt", "m/n/o/p.gif"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "real").mkdir()
    (root / "real" / "r.png").write_bytes(b"x")
    (root / "linked").symlink_to(root / "real")  # a symlinked folder is not entered, as rglob
    (root / "alias.png").symlink_to(root / "z.JPG")  # a symlinked file counts
    stream = iter_images(root)
    assert not isinstance(stream, list)
    got = list(stream)
    assert got == [str(p) for p in list_images(root)]
    assert got == [str(p) for p in sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts))]
    assert got[:3] == [str(root / "a" / "b" / "c.png"), str(root / "a" / "b-x.png"), str(root / "a-b.png")]


def test_manifest_is_read_as_a_stream(tmp_path):
    from trunk.images import InputStream, iter_path_list

    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "".join(f"img{i}.png\n" for i in range(50000)) + '""\n')
    stream = iter_path_list(manifest)
    assert next(stream) == str(tmp_path / "img0.png")  # before the bad last row is read
    with pytest.raises(ValueError, match=r"m.csv: field 'path': empty in row 50002"):
        list(stream)
    again = InputStream(tmp_path / "m.csv")
    with pytest.raises(ValueError, match="empty in row 50002"):
        sum(1 for _ in again)
