"""The content-hash index: unchanged files are not read again, changed ones are, saves merge."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

import trunk.hashindex as hashindex
from trunk.hashindex import FOLDER, RACY_NS, ContentHashes, bucket_of

OLD = 1_600_000_000 * 10**9  # an mtime long past: entries hashed now are not "racy"


def _files(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i}.bin"
        p.write_bytes(os.urandom(100 + i))
        os.utime(p, ns=(OLD, OLD + i))
        paths.append(p)
    return paths


def _true(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def reads(monkeypatch):
    """Paths the index reads (its one reading function, wrapped; it still reads for real)."""
    seen = []
    real = hashindex.hash_file
    monkeypatch.setattr(hashindex, "hash_file", lambda p: seen.append(str(p)) or real(p))
    return seen


def test_second_pass_reads_no_file(tmp_path, reads):
    paths = _files(tmp_path / "ds")
    first = ContentHashes(tmp_path / "cache")
    assert [first.sha(p) for p in paths] == [_true(p) for p in paths]
    assert first.hashed == len(paths) and first.hits == 0
    first.save()
    reads.clear()
    again = ContentHashes(tmp_path / "cache")
    assert [again.sha(p) for p in paths] == [_true(p) for p in paths]
    assert reads == [] and again.hits == len(paths) and again.hashed == 0
    again.save()  # nothing new: nothing written
    assert again.unsaved == 0


def test_a_changed_file_alone_is_hashed_again(tmp_path, reads):
    paths = _files(tmp_path / "ds")
    index = ContentHashes(tmp_path / "cache")
    before = [index.sha(p) for p in paths]
    index.save()
    paths[2].write_bytes(b"new content of another size")
    os.utime(paths[2], ns=(OLD, OLD + 99))
    paths[3].touch()  # new mtime, same bytes
    os.utime(paths[3], ns=(OLD, OLD + 98))
    reads.clear()
    index = ContentHashes(tmp_path / "cache")
    after = [index.sha(p) for p in paths]
    assert sorted(reads) == sorted(str(p) for p in paths[2:4])
    assert after[2] == _true(paths[2]) != before[2]
    assert after[3] == before[3]
    assert [a == b for a, b in zip(after, before)] == [True, True, False, True, True, True]


def test_same_size_same_mtime_rewrite_is_seen_only_with_verify(tmp_path):
    p = _files(tmp_path / "ds", 1)[0]
    index = ContentHashes(tmp_path / "cache")
    old = index.sha(p)
    index.save()
    st = os.stat(p)
    p.write_bytes(bytes(st.st_size))  # same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the mtime put back
    assert ContentHashes(tmp_path / "cache").sha(p) == old  # the documented blind spot
    verify = ContentHashes(tmp_path / "cache", verify=True)
    assert verify.sha(p) == _true(p) != old
    assert verify.changed_in_place == 1 and verify.hashed == 1
    verify.save()
    assert ContentHashes(tmp_path / "cache").sha(p) == _true(p)


def test_a_file_hashed_right_after_its_write_is_hashed_again(tmp_path, reads):
    p = tmp_path / "ds" / "fresh.bin"
    p.parent.mkdir()
    p.write_bytes(b"just written")  # mtime: now, within RACY_NS of the hash
    index = ContentHashes(tmp_path / "cache")
    index.sha(p)
    index.save()
    reads.clear()
    assert ContentHashes(tmp_path / "cache").sha(p) == _true(p)
    assert reads == [str(p)]
    assert RACY_NS >= 10**9


def test_saves_merge_and_a_gone_folder_is_dropped(tmp_path):
    a = _files(tmp_path / "a", 2)
    b = _files(tmp_path / "b", 2)
    one, two = ContentHashes(tmp_path / "cache"), ContentHashes(tmp_path / "cache")
    for p in a:
        one.sha(p)
    for p in b:
        two.sha(p)
    one.save()
    two.save()  # re-reads what one saved before replacing
    fresh = ContentHashes(tmp_path / "cache")
    assert [fresh.lookup(p) for p in a + b] == [_true(p) for p in a + b]
    for p in b:
        p.unlink()
    (tmp_path / "b").rmdir()
    # Pruning happens in the buckets a save rewrites: add a file to a folder of b's bucket.
    same = next(f for f in (tmp_path / f"b{i}" for i in range(10_000))
                if bucket_of(str(f)) == bucket_of(str(tmp_path / "b")))
    c = same / "x.bin"
    c.parent.mkdir()
    c.write_bytes(b"x")
    fresh.sha(c)
    fresh.save()
    folders = {}
    for f in (tmp_path / "cache" / FOLDER).glob("*.json"):
        folders.update(json.loads(f.read_text())["folders"])
    assert str(tmp_path / "b") not in folders
    assert str(tmp_path / "a") in folders and str(same) in folders


def test_symlinks_share_their_target_entry_and_missing_files_raise(tmp_path, reads):
    p = _files(tmp_path / "ds", 1)[0]
    link = tmp_path / "link.bin"
    link.symlink_to(p)
    index = ContentHashes(tmp_path / "cache")
    index.sha(p)
    reads.clear()
    assert index.sha(link) == _true(p) and reads == []
    with pytest.raises(FileNotFoundError):
        index.sha(tmp_path / "ds" / "absent.bin")


def test_an_unreadable_bucket_counts_as_empty(tmp_path, caplog):
    p = _files(tmp_path / "ds", 1)[0]
    index = ContentHashes(tmp_path / "cache")
    index.sha(p)
    index.save()
    bucket = tmp_path / "cache" / FOLDER / f"{bucket_of(str(p.parent.resolve()))}.json"
    bucket.write_text("{not json")
    again = ContentHashes(tmp_path / "cache")
    assert again.sha(p) == _true(p) and again.hashed == 1
    assert "cannot be read" in caplog.text and str(bucket) in caplog.text
    again.save()
    assert json.loads(bucket.read_text())["format"] == "content-hashes/1"
