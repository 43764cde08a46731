"""Bulk classification over a streamed input (a folder walk or manifest never held as a list)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from heads.classify.engine import SUCCESS_FILE, classify, plan_batches, plan_stream, shard_chunks
from heads.classify.output import JobFingerprint, job_fingerprint, shard_digest, shard_name
from trunk.images import InputStream
from tests.heads.classify import test_engine

# The engine tests' fixtures, shared.
bank = test_engine.bank
release = test_engine.release

ROWS = 3


@pytest.fixture
def folder(tmp_path, image_factory):
    """Eight inputs in three sub-folders, one of them not an image."""
    for i, name in enumerate(["b/x1.png", "a/y0.png", "a/y1.png", "b/x0.png", "c/z.png", "a-b.png", "c/w.png"]):
        image_factory(f"imgs/{name}", color=(30 * i, 200 - 20 * i, 90), size=32 + 2 * i, seed=i)
    (tmp_path / "imgs" / "c" / "bad.jpg").write_text("not an image")
    return tmp_path / "imgs"


def run(trunk, bank, inputs, out, release, **kw):
    return classify(trunk, bank, inputs, out, release=release, batch_size=2, rows_per_shard=ROWS,
                    progress=False, **kw)


def rows(out):
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


def test_stream_gives_the_rows_and_fingerprint_of_the_list(tmp_path, tiny_trunk, bank, release, folder):
    listed = list(InputStream(folder))
    by_list = run(tiny_trunk, bank, listed, tmp_path / "list", release)
    by_stream = run(tiny_trunk, bank, InputStream(folder), tmp_path / "stream", release)

    assert by_stream["fingerprint"] == by_list["fingerprint"]
    assert by_stream["counts"] == by_list["counts"] == {"images": 8, "ok": 7, "errors": 1, "shards": 3}
    assert by_stream["errors_by_reason"] == {"not an image": 1}
    assert rows(tmp_path / "stream") == rows(tmp_path / "list")
    assert [r["path"] for r in rows(tmp_path / "stream")] == listed


def test_streamed_job_resumes_exactly(tmp_path, tiny_trunk, bank, release, folder):
    out = tmp_path / "out"
    clean = run(tiny_trunk, bank, InputStream(folder), out, release)
    before = rows(out)
    (out / SUCCESS_FILE).unlink()
    (out / shard_name(1)).unlink()

    resumed = run(tiny_trunk, bank, InputStream(folder), out, release)
    assert resumed["shards_reused"] == 2 and resumed["shards_written"] == 1
    assert resumed["fingerprint"] == clean["fingerprint"]
    assert rows(out) == before


def test_a_changed_folder_is_another_job(tmp_path, tiny_trunk, bank, release, folder, image_factory):
    out = tmp_path / "out"
    run(tiny_trunk, bank, InputStream(folder), out, release)
    (out / SUCCESS_FILE).unlink()
    image_factory("imgs/a/y00.png", color=(1, 2, 3), size=32)
    with pytest.raises(ValueError, match="holds another job's output"):
        run(tiny_trunk, bank, InputStream(folder), out, release)


class Shifting:
    """A stream that is not the same on every pass: its third pass inserts a path at the front of shard 1."""

    def __init__(self, paths):
        self.paths, self.passes = list(paths), 0

    def __iter__(self):
        self.passes += 1
        if self.passes < 3:
            return iter(self.paths)
        return iter(self.paths[:ROWS] + ["/inserted.png"] + self.paths[ROWS:])


def test_a_stream_that_changes_mid_job_writes_no_row_of_the_changed_shard(tmp_path, tiny_trunk, bank, release,
                                                                         folder):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="inputs of shard 1 changed"):
        run(tiny_trunk, bank, Shifting(InputStream(folder)), out, release)
    assert not (out / SUCCESS_FILE).exists()
    assert not (out / shard_name(1)).exists() and not (out / shard_name(2)).exists()


def test_one_shot_iterator_is_refused(tmp_path, tiny_trunk, bank, release, folder):
    with pytest.raises(ValueError, match="one-shot iterator"):
        run(tiny_trunk, bank, iter(InputStream(folder)), tmp_path / "out", release)
    assert not (tmp_path / "out").exists()


def test_incremental_fingerprint_equals_the_list_one():
    paths = [f"/d/{i}.png" for i in range(7)] + ["/d/bad\udcff.png"]
    args = ({"name": "r", "version": "1"}, 3, ["b", "a"], {"batch_size": 2})
    h = JobFingerprint(*args, images=len(paths))
    for p in paths:
        h.update(p)
    assert h.hexdigest() == job_fingerprint(paths, *args) == job_fingerprint(iter(paths), *args, images=8)
    short = JobFingerprint(*args, images=9)
    for p in paths:
        short.update(p)
    with pytest.raises(ValueError, match="held 8 paths, not the 9 counted"):
        short.hexdigest()


def test_plan_stream_matches_plan_batches():
    paths = [f"p{i}" for i in range(23)]
    digests = [shard_digest(c) for c in shard_chunks(paths, 10)]
    streamed = list(plan_stream(iter(paths), 10, 4, [0, 2], digests))
    planned = plan_batches(23, 10, 4, [0, 2])
    assert [(j.shard, j.batch, j.indices) for j in streamed] == [(j.shard, j.batch, j.indices) for j in planned]
    assert all(j.paths == [paths[i] for i in j.indices] for j in streamed)
    with pytest.raises(RuntimeError, match="shard 2 changed"):
        list(plan_stream(iter(paths[:-1]), 10, 4, [0], digests))
