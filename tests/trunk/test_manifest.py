"""The one manifest reader: CSV and Parquet, local or fsspec URIs, text cells, streamed."""

from __future__ import annotations

import itertools

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trunk.manifest import ManifestError, open_table


def read(path, columns=("path", "label")):
    with open_table(path) as table:
        return table.columns, list(table.rows(columns))


def test_csv_with_a_bom_numeric_looking_labels_and_empty_cells_are_text(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("\ufeffpath,label,score\na.png,1,0.5\nb.png,01,x\n,NA,\nc.png,1.0,2\n".encode())
    columns, rows = read(manifest, ("path", "label", "split"))
    assert columns == ["path", "label", "score"]  # the BOM is not part of the first name
    assert rows == [
        {"path": "a.png", "label": "1", "split": None},  # a column the file lacks is None
        {"path": "b.png", "label": "01", "split": None},  # not 1
        {"path": "", "label": "NA", "split": None},  # empty is "", "NA" is not a null
        {"path": "c.png", "label": "1.0", "split": None},
    ]


def test_a_column_of_other_types_later_on_does_not_matter(tmp_path):
    # Only the asked-for columns are converted: an unread column whose type changes after
    # the first block (numbers, then text) cannot break the read.
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,n\n" + "a.png,1\n" * 100_000 + "b.png,not a number\n")
    _, rows = read(manifest, ("path",))
    assert len(rows) == 100_001 and rows[-1] == {"path": "b.png"}


def test_parquet_columns_of_any_type_are_text(tmp_path):
    manifest = tmp_path / "m.pq"
    pq.write_table(pa.table({"label": pa.array([1, 22, None]), "path": ["a.png", "b.png", "c.png"],
                             "flag": [True, False, True]}), manifest, row_group_size=2)
    columns, rows = read(manifest, ("path", "label", "slice"))
    assert columns == ["label", "path", "flag"]
    assert rows == [{"path": "a.png", "label": "1", "slice": None}, {"path": "b.png", "label": "22", "slice": None},
                    {"path": "c.png", "label": None, "slice": None}]


def test_memory_uris_csv_and_parquet(memfs):
    memfs.pipe("memory://data/m.csv", b"path,label\nimgs/a.png,7\n")
    with fsspec.open("memory://data/m.parquet", "wb") as f:
        pq.write_table(pa.table({"path": ["imgs/a.png"], "label": ["7"]}), f)
    for uri in ("memory://data/m.csv", "memory://data/m.parquet"):
        assert read(uri) == (["path", "label"], [{"path": "imgs/a.png", "label": "7"}]), uri


def test_rows_are_streamed_not_read_whole(tmp_path):
    # The last of 300,000 rows is malformed: reading the first rows never reaches it, so it
    # raises only when the reader gets that far (a reader that loaded the file would fail at once).
    manifest = tmp_path / "big.csv"
    manifest.write_text("path,label\n" + "".join(f"img/{i}.png,{i % 3}\n" for i in range(300_000)) + "x.png\n")
    with open_table(manifest) as table:
        first = list(itertools.islice(table.rows(["path", "label"]), 3))
    assert first == [{"path": "img/0.png", "label": "0"}, {"path": "img/1.png", "label": "1"},
                     {"path": "img/2.png", "label": "2"}]
    with pytest.raises(ManifestError) as e:
        read(manifest)
    # Rows as a spreadsheet numbers them: the header is row 1.
    assert str(e.value) == f"{manifest}: not valid CSV (row 300002: Expected 2 columns, got 1: x.png)"


def test_not_utf8_names_the_byte(tmp_path):
    cell = tmp_path / "cell.csv"
    cell.write_bytes(b"path,label\na.png,\xff\n")
    with pytest.raises(ManifestError) as e:
        read(cell)
    assert str(e.value) == f"{cell}: not UTF-8 text (invalid start byte at byte 17)"
    header = tmp_path / "header.csv"
    header.write_bytes(b"pa\xe9th,label\na.png,x\n")
    with pytest.raises(ManifestError) as e:
        read(header)
    assert e.value.reason == "not UTF-8 text (invalid continuation byte at byte 2)"


def test_empty_csv_has_no_columns_and_garbage_parquet_is_one_line(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert read(empty) == ([], [])
    garbage = tmp_path / "g.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(ManifestError) as e:
        read(garbage)
    assert e.value.reason.startswith("not a readable Parquet file (") and "\n" not in str(e.value)
    with pytest.raises(ManifestError) as e:
        read(tmp_path / "absent.csv")
    assert e.value.reason.startswith("cannot read (")


def test_rows_of_columns_the_file_lacks_are_counted(tmp_path):
    csv_file, parquet_file = tmp_path / "m.csv", tmp_path / "m.parquet"
    csv_file.write_text("path\na.png\nb.png\n")
    pq.write_table(pa.table({"path": ["a.png", "b.png"]}), parquet_file)
    for manifest in (csv_file, parquet_file):
        assert read(manifest, ("split",)) == (["path"], [{"split": None}, {"split": None}]), manifest
