"""heads.classify.output: commit-once writes and the output folder's files, on a real file system."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pyarrow as pa
import pytest

import pyarrow.parquet as pq

from heads.classify.output import (
    PROVENANCE_KEY, SHARD_GLOB, TEMP_GLOB, ShardClaims, claim_files, claim_name, commit_json, commit_once, commit_table, foreign_files, job_id, job_provenance,
    job_temps, output_schema, read_json, remove_stale_temps, set_aside, shard_errors, shard_provenance,
    shard_schema, temp_prefix,
)

JOB = job_id("ab" * 32)


def test_second_commit_of_a_name_changes_nothing(tmp_path):
    assert commit_once(tmp_path, "f.bin", lambda f: f.write(b"first"), job=JOB)
    before = os.stat(tmp_path / "f.bin")
    assert not commit_once(tmp_path, "f.bin", lambda f: f.write(b"second"), job=JOB)
    assert (tmp_path / "f.bin").read_bytes() == b"first"
    assert os.stat(tmp_path / "f.bin").st_ino == before.st_ino
    assert not list(tmp_path.glob(TEMP_GLOB))


def test_a_failed_write_leaves_no_file(tmp_path):
    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        commit_once(tmp_path, "f.bin", boom, job=JOB)
    assert list(tmp_path.iterdir()) == []


def _racer(directory, start, i, results):
    while time.time() < start:
        pass
    results.put((i, commit_once(directory, "shard.bin", lambda f: f.write(f"writer {i}".encode() * 1000), job=JOB)))


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
    assert commit_json(tmp_path, "_JOB.json", {"a": 1}, job=JOB)
    assert read_json(tmp_path / "_JOB.json") == {"a": 1}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")
    schema = output_schema(["b", "a"])
    assert schema.names == ["path", "sha256", "error", "a_label", "a_score", "b_label", "b_score"]
    table = pa.Table.from_pydict({"path": ["x", "y"], "sha256": [None, "s"], "error": ["gone", None],
                                  "a_label": [None, "l"], "a_score": [None, 0.5],
                                  "b_label": [None, "m"], "b_score": [None, 0.25]}, schema=schema)
    assert commit_table(tmp_path, "part-00000.parquet", table, job=JOB)
    assert shard_errors(tmp_path / "part-00000.parquet", schema, 2) == ["gone", None]
    assert shard_errors(tmp_path / "part-00000.parquet", schema, 3) is None  # wrong row count
    assert shard_errors(tmp_path / "part-00000.parquet", output_schema(["a"]), 2) is None
    assert shard_errors(tmp_path / "missing.parquet", schema, 2) is None


def _age(path, seconds):
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_damaged_file_is_set_aside_and_stale_temps_go(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"PAR1 garbage")
    assert shard_errors(tmp_path / "part-00000.parquet", output_schema(["a"]), 1) is None
    set_aside(tmp_path, "part-00000.parquet", job=JOB)
    assert not (tmp_path / "part-00000.parquet").exists()
    assert [p.name.startswith(f".vtp-{JOB}.part-00000.parquet.damaged-") for p in tmp_path.iterdir()] == [True]
    old, new = tmp_path / f".vtp-{JOB}.x.1.0123abcd.tmp", tmp_path / f".vtp-{JOB}.y.2.4567cdef.tmp"
    old.write_bytes(b"old")
    new.write_bytes(b"new")
    _age(old, 7200)
    assert remove_stale_temps(tmp_path, JOB) == 1  # a live job's fresh temp file is spared
    assert new.exists() and not old.exists()
    assert foreign_files(tmp_path) == []  # every file here is the platform's


def test_only_the_jobs_own_temps_are_removed(tmp_path):
    # Before: every ".*.tmp" older than an hour went, whoever wrote it.
    other = job_id("cd" * 32)
    theirs = {".old-upload.tmp": 7200, ".thesis.tmp": 0, f".vtp-{other}.part-00000.parquet.7.ab.tmp": 7200,
              f".vtp-{JOB}.tmp": 7200, f".vtp-{JOB}x.part-00000.parquet.1.ab.tmp": 7200}
    for name, age in theirs.items():
        (tmp_path / name).write_bytes(b"not yours")
        _age(tmp_path / name, age)
    ours = tmp_path / f"{temp_prefix(JOB)}part-00003.parquet.12.cafe0123.tmp"
    ours.write_bytes(b"a killed run's half shard")
    _age(ours, 7200)
    assert job_temps(tmp_path, JOB) == [ours]
    assert remove_stale_temps(tmp_path, JOB) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)
    assert all((tmp_path / n).read_bytes() == b"not yours" for n in theirs)


def test_temp_files_are_named_with_the_job(tmp_path):
    seen = []

    def write(f):
        seen.append(os.path.basename(f.name))
        f.write(b"x")

    assert commit_once(tmp_path, "part-00000.parquet", write, job=JOB)
    assert seen[0].startswith(f".vtp-{JOB}.part-00000.parquet.") and seen[0].endswith(".tmp")
    with pytest.raises(ValueError, match="job id must be 16 hex digits"):
        commit_once(tmp_path, "part-00001.parquet", write, job="../x")


def test_foreign_files_are_everything_the_platform_does_not_write(tmp_path):
    platform = ["_JOB.json", "_SUCCESS.json", "part-00000.parquet", "part-123456.parquet",
                f".vtp-{JOB}.part-00000.parquet.1.ab.tmp", f".vtp-{JOB}.part-00001.parquet.damaged-0123abcd"]
    foreign = [".thesis.tmp", ".part-00000.parquet.9.ab.tmp", "part-1.parquet", "notes.txt", ".vtp-nothex.tmp",
               os.fsdecode(b"bad\xff.bin")]
    for name in platform + foreign:
        (tmp_path / name).write_bytes(b"")
    assert foreign_files(tmp_path) == sorted(foreign)
    assert foreign_files(tmp_path / "missing") == []


def _provenance(fingerprint: str = "ab" * 32) -> dict:
    release = {"name": "release", "version": 4, "trunk_version": 2, "trunk_id": "t" * 12,
               "heads": {"a": 3, "b": 1}, "note": None}
    return job_provenance(release, trunk_id="t" * 12, classes={"b": ["x", "y"], "a": ["cat", "dog", "élan"]},
                          fingerprint=fingerprint, rows_per_shard=2, images=3,
                          settings={"batch_size": 8, "draft": True, "precision": "fp32"})


def _shard(path, schema, rows: int):
    columns = {n: [None] * rows for n in schema.names}
    columns["path"] = [f"p{i}" for i in range(rows)]
    columns["error"] = ["gone"] * rows
    assert commit_table(path.parent, path.name, pa.Table.from_pydict(columns, schema=schema), job=JOB)


def test_a_shard_carries_its_provenance_wherever_it_is_copied(tmp_path):
    base = output_schema(["b", "a"]).with_metadata({"team": "vision"})
    _shard(tmp_path / "part-00001.parquet", shard_schema(base, _provenance(), 1), 1)
    copy = tmp_path / "elsewhere" / "renamed.parquet"
    copy.parent.mkdir()
    copy.write_bytes((tmp_path / "part-00001.parquet").read_bytes())

    got = shard_provenance(copy)
    assert got["release"]["version"] == 4 and got["trunk"] == {"version": 2, "trunk_id": "t" * 12}
    assert got["heads"] == {"a": {"version": 3, "classes": ["cat", "dog", "élan"]},
                            "b": {"version": 1, "classes": ["x", "y"]}}
    assert got["job"] == {"fingerprint": "ab" * 32, "id": JOB, "images": 3, "rows_per_shard": 2, "shards": 2,
                          "settings": {"batch_size": 8, "draft": True, "precision": "fp32"}}
    assert got["shard"] == {"index": 1, "first_row": 2, "rows": 1}  # the last, short shard
    metadata = pq.read_metadata(copy).metadata
    assert metadata[b"team"] == b"vision" and b"ARROW:schema" in metadata  # other keys kept
    assert pq.read_schema(copy).metadata[PROVENANCE_KEY.encode()] == metadata[PROVENANCE_KEY.encode()]
    # The same job writes the same bytes: nothing of the process, host or time goes in.
    _shard(tmp_path / "again.parquet", shard_schema(base, _provenance(), 1), 1)
    assert (tmp_path / "again.parquet").read_bytes() == copy.read_bytes()


def test_shard_errors_refuses_another_jobs_shard_and_keeps_older_ones(tmp_path):
    schema = output_schema(["a", "b"])
    ours, theirs = "ab" * 32, "cd" * 32
    _shard(tmp_path / "ours.parquet", shard_schema(schema, _provenance(ours), 0), 2)
    _shard(tmp_path / "theirs.parquet", shard_schema(schema, _provenance(theirs), 0), 2)
    _shard(tmp_path / "older.parquet", schema, 2)  # written before shards carried provenance
    assert shard_errors(tmp_path / "ours.parquet", schema, 2, ours) == ["gone", "gone"]
    assert shard_errors(tmp_path / "theirs.parquet", schema, 2, ours) is None
    assert shard_errors(tmp_path / "theirs.parquet", schema, 2) == ["gone", "gone"]  # no job given: schema only
    assert shard_errors(tmp_path / "older.parquet", schema, 2, ours) == ["gone", "gone"]
    assert shard_errors(tmp_path / "ours.parquet", output_schema(["a"]), 2, ours) is None


def test_shard_provenance_of_a_file_without_it_is_one_line(tmp_path):
    _shard(tmp_path / "older.parquet", output_schema(["a"]), 1)
    with pytest.raises(ValueError, match=r"older.parquet: has no 'vtp.provenance' metadata"):
        shard_provenance(tmp_path / "older.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"junk.parquet: not a readable Parquet file"):
        shard_provenance(tmp_path / "junk.parquet")
    bad = output_schema(["a"]).with_metadata({PROVENANCE_KEY: "{not json"})
    _shard(tmp_path / "bad.parquet", bad, 1)
    with pytest.raises(ValueError, match=r"bad.parquet: metadata 'vtp.provenance' is not valid JSON"):
        shard_provenance(tmp_path / "bad.parquet")


# -- shard claims -------------------------------------------------------------------------
def _dead_pid() -> int:
    """The pid of a process of this host that has exited and been reaped."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _fake_claim(directory, k: int, generation: int, *, host: str, pid: int, age_s: float = 0.0,
                lease_s: float = 60.0) -> None:
    path = directory / claim_name(JOB, k, generation)
    path.write_text(json.dumps({"owner": "x" * 32, "host": host, "pid": pid, "pid_start": None, "lease_s": lease_s}))
    if age_s:
        _age(path, age_s)


def test_a_live_claim_is_respected_and_released_after_commit(tmp_path):
    with ShardClaims(tmp_path, JOB) as a, ShardClaims(tmp_path, JOB) as b:
        assert a.take(0) and a.take(0)  # taking what it holds again is a no-op
        assert not b.take(0)  # a live run (this very process) holds it
        assert b.take(1) and not a.take(1)
        assert sorted(p.name for p in claim_files(tmp_path, JOB)) == [claim_name(JOB, 0, 0), claim_name(JOB, 1, 0)]
        a.release(0)
        assert b.take(0) and not a.taken_over and not b.taken_over
    assert claim_files(tmp_path, JOB) == []  # leaving releases what is still held
    # Readers and the folder check never see claims: dot files named with the job, no temp, no shard.
    _fake_claim(tmp_path, 3, 0, host="h", pid=1)
    assert foreign_files(tmp_path) == [] and not list(tmp_path.glob(SHARD_GLOB)) and not list(tmp_path.glob(TEMP_GLOB))
    assert job_temps(tmp_path, JOB) == []


def test_a_dead_owners_claim_is_taken_over_once(tmp_path):
    with ShardClaims(tmp_path, JOB) as a, ShardClaims(tmp_path, JOB) as b:
        _fake_claim(tmp_path, 0, 0, host=a.record["host"], pid=_dead_pid())  # this host, pid gone: at once
        assert a.take(0) and a.taken_over == {0}
        assert (tmp_path / claim_name(JOB, 0, 1)).is_file()  # the next generation, created exclusively
        assert not b.take(0)  # the taker is alive: nobody takes it again
        a.release(0)
        assert claim_files(tmp_path, JOB) == []  # every generation goes once the shard is committed


def test_another_hosts_claim_is_taken_over_only_after_its_lease(tmp_path):
    with ShardClaims(tmp_path, JOB) as claims:
        _fake_claim(tmp_path, 0, 0, host="elsewhere", pid=os.getpid(), age_s=30, lease_s=60)
        _fake_claim(tmp_path, 1, 0, host="elsewhere", pid=os.getpid(), age_s=90, lease_s=60)
        _fake_claim(tmp_path, 2, 0, host="elsewhere", pid=os.getpid(), age_s=0, lease_s=60)
        _fake_claim(tmp_path, 2, 1, host="elsewhere", pid=os.getpid(), age_s=90, lease_s=60)  # the newest counts
        (tmp_path / claim_name(JOB, 3, 0)).write_text("{not json")  # judged by its age and our lease
        _age(tmp_path / claim_name(JOB, 3, 0), 120)
        assert [claims.take(k) for k in range(4)] == [False, True, True, True]
        assert claims.taken_over == {1, 2, 3} and claims.held == {1: 1, 2: 2, 3: 1}


def test_held_claims_are_renewed_while_the_run_lives(tmp_path):
    with ShardClaims(tmp_path, JOB, lease_s=2.0) as claims:
        assert claims.take(0)
        path = tmp_path / claim_name(JOB, 0, 0)
        old = time.time() - 1.9
        os.utime(path, (old, old))
        deadline = time.monotonic() + 30
        while path.stat().st_mtime <= old and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mtime > old + 1  # renewed every quarter lease
    with pytest.raises(ValueError, match="claim lease must be positive"):
        ShardClaims(tmp_path, JOB, lease_s=0)
