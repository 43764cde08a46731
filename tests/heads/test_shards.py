"""heads.shards: commit-once writes and the output folder's files, on a real file system."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pyarrow as pa
import pytest

from heads.shards import (
    TEMP_GLOB, commit_json, commit_once, commit_table, output_schema, read_json, remove_stale_temps, set_aside,
    shard_errors,
)


def test_second_commit_of_a_name_changes_nothing(tmp_path):
    assert commit_once(tmp_path, "f.bin", lambda f: f.write(b"first"))
    before = os.stat(tmp_path / "f.bin")
    assert not commit_once(tmp_path, "f.bin", lambda f: f.write(b"second"))
    assert (tmp_path / "f.bin").read_bytes() == b"first"
    assert os.stat(tmp_path / "f.bin").st_ino == before.st_ino
    assert not list(tmp_path.glob(TEMP_GLOB))


def test_a_failed_write_leaves_no_file(tmp_path):
    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        commit_once(tmp_path, "f.bin", boom)
    assert list(tmp_path.iterdir()) == []


def _racer(directory, start, i, results):
    while time.time() < start:
        pass
    results.put((i, commit_once(directory, "shard.bin", lambda f: f.write(f"writer {i}".encode() * 1000))))


def test_racing_processes_commit_exactly_once(tmp_path):
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_racer, args=(tmp_path, start, i, results)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = dict(results.get(timeout=5) for _ in procs)
    winners = [i for i, won in outcomes.items() if won]
    assert len(winners) == 1
    assert (tmp_path / "shard.bin").read_bytes() == f"writer {winners[0]}".encode() * 1000
    assert not list(tmp_path.glob(TEMP_GLOB))


def test_json_and_tables_round_trip(tmp_path):
    assert commit_json(tmp_path, "_JOB.json", {"a": 1})
    assert read_json(tmp_path / "_JOB.json") == {"a": 1}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")
    schema = output_schema(["b", "a"])
    assert schema.names == ["path", "sha256", "error", "a_label", "a_score", "b_label", "b_score"]
    table = pa.Table.from_pydict({"path": ["x", "y"], "sha256": [None, "s"], "error": ["gone", None],
                                  "a_label": [None, "l"], "a_score": [None, 0.5],
                                  "b_label": [None, "m"], "b_score": [None, 0.25]}, schema=schema)
    assert commit_table(tmp_path, "part-00000.parquet", table)
    assert shard_errors(tmp_path / "part-00000.parquet", schema, 2) == ["gone", None]
    assert shard_errors(tmp_path / "part-00000.parquet", schema, 3) is None  # wrong row count
    assert shard_errors(tmp_path / "part-00000.parquet", output_schema(["a"]), 2) is None
    assert shard_errors(tmp_path / "missing.parquet", schema, 2) is None


def test_damaged_file_is_set_aside_and_stale_temps_go(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"PAR1 garbage")
    assert shard_errors(tmp_path / "part-00000.parquet", output_schema(["a"]), 1) is None
    set_aside(tmp_path, "part-00000.parquet")
    assert not (tmp_path / "part-00000.parquet").exists()
    assert [p.name.startswith(".part-00000.parquet.damaged-") for p in tmp_path.iterdir()] == [True]
    old, new = tmp_path / ".x.1.a.tmp", tmp_path / ".y.2.b.tmp"
    old.write_bytes(b"old")
    new.write_bytes(b"new")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_temps(tmp_path) == 1  # a live job's fresh temp file is spared
    assert new.exists() and not old.exists()
