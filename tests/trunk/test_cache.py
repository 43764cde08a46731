"""FeatureCache: layout, round trips, appends, and what a crash can and cannot leave; the decode-error record."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from trunk.cache import DECODE_ERRORS, CacheMissError, DecodeErrors, FeatureCache
from trunk.decode import decoder_stamp
from trunk.model import Trunk, TrunkError


def shas_for(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def feats_for(n: int, d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3


def visible_files(cache: FeatureCache) -> list[str]:
    return sorted(p.name for p in cache.directory.iterdir()) if cache.directory.exists() else []


def test_layout_and_shard_contents(tmp_path):
    cache = FeatureCache(tmp_path, "trunk123", "pooled", "pre456")
    shas, x = shas_for(10), feats_for(10)
    with cache.writer(rows_per_shard=4) as w:
        assert w.add(shas, x) == 10
    assert cache.directory == tmp_path / "trunk123" / "pooled" / "pre456-float16"
    names = visible_files(cache)
    assert len(names) == 3 and all(n.startswith("shard-") and n.endswith(".safetensors") for n in names)
    rows = 0
    for name in names:
        with safe_open(str(cache.directory / name), framework="pt") as f:
            assert set(f.keys()) == {"sha256", "features"}
            sha, feats = f.get_tensor("sha256"), f.get_tensor("features")
            assert sha.dtype == torch.uint8 and sha.shape[1] == 32
            assert feats.dtype == torch.float16 and feats.shape == (sha.shape[0], 24)
            assert f.metadata()["trunk_id"] == "trunk123" and f.metadata()["tap"] == "pooled"
            rows += sha.shape[0]
    assert rows == 10


def test_fp16_roundtrip_order_and_membership(tmp_path):
    cache = FeatureCache(tmp_path, "t", "pooled", "p")
    shas, x = shas_for(9), feats_for(9)
    with cache.writer(rows_per_shard=4) as w:
        w.add(shas, x)
    fresh = FeatureCache(tmp_path, "t", "pooled", "p")
    assert len(fresh) == 9 and fresh.dim == 24 and shas[3] in fresh and "f" * 64 not in fresh
    order = [7, 0, 3, 3, 8, 1]
    got = fresh.load([shas[i] for i in order])
    assert got.dtype == torch.float32 and got.shape == (6, 24)
    torch.testing.assert_close(got, x[order], atol=1e-2, rtol=1e-3)
    assert fresh.missing(["a" * 64, shas[0], "b" * 64, "a" * 64]) == ["a" * 64, "b" * 64]


def test_int8_roundtrip_is_close_and_smaller(tmp_path):
    shas, x = shas_for(64), feats_for(64, d=256)
    x[5] = 0.0  # an all-zero row must survive quantisation too
    caches = {dt: FeatureCache(tmp_path, "t", "pooled", "p", dtype=dt) for dt in ("float16", "int8")}
    for cache in caches.values():
        with cache.writer() as w:
            w.add(shas, x)
    q = FeatureCache(tmp_path, "t", "pooled", "p", dtype="int8")
    with safe_open(str(q.shards[0]), framework="pt") as f:
        assert f.get_tensor("features").dtype == torch.int8 and f.get_tensor("scale").dtype == torch.float32
    got = q.load(shas)
    step = x.abs().amax(dim=1, keepdim=True) / 127
    assert ((got - x).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(got[5], torch.zeros(256))
    assert q.bytes_per_row() < 0.6 * caches["float16"].bytes_per_row()


def test_iter_batches_equals_load(tmp_path):
    cache = FeatureCache(tmp_path, "t", "layer3", "p")
    shas, x = shas_for(23), feats_for(23)
    with cache.writer(rows_per_shard=5) as w:
        w.add(shas[:11], x[:11])
        w.add(shas[11:], x[11:])
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1)).tolist()
    wanted = [shas[i] for i in order]
    batches = list(FeatureCache(tmp_path, "t", "layer3", "p").iter_batches(wanted, batch_size=7))
    assert [len(s) for s, _ in batches] == [7, 7, 7, 2]
    assert [s for chunk, _ in batches for s in chunk] == wanted
    assert torch.equal(torch.cat([f for _, f in batches]), cache.load(wanted))


def test_missing_rows_raise_keyerror_saying_how_many(tmp_path):
    cache = FeatureCache(tmp_path, "t", "pooled", "p")
    shas = shas_for(3)
    with cache.writer() as w:
        w.add(shas[:1], feats_for(1))
    with pytest.raises(KeyError) as e:
        cache.load(shas)
    assert isinstance(e.value, CacheMissError)
    assert str(e.value).startswith(f"2 of 3 images not in feature cache {cache.directory}: {shas[1][:12]}")
    with pytest.raises(KeyError):
        next(cache.iter_batches(shas, 1))  # checked before the first batch


def test_append_dedup_and_refresh_across_instances(tmp_path):
    a = FeatureCache(tmp_path, "t", "pooled", "p")
    b = FeatureCache(tmp_path, "t", "pooled", "p")
    shas, x = shas_for(6), feats_for(6)
    with a.writer() as w:
        assert w.add(shas[:3], x[:3]) == 3
        assert w.add(shas[:3], x[:3]) == 0  # already queued
    assert len(b) == 3  # b scans lazily, after a wrote
    with a.writer() as w:
        assert w.add(shas, x) == 3  # only the new ones
    assert len(a.shards) == 2
    assert len(b) == 3
    b.refresh()
    assert len(b) == 6 and len(b.shards) == 2
    torch.testing.assert_close(b.load(shas), x, atol=1e-2, rtol=1e-3)


def test_duplicate_rows_across_shards_first_wins(tmp_path):
    # Two processes that both found a row missing may both write it.
    a = FeatureCache(tmp_path, "t", "pooled", "p")
    b = FeatureCache(tmp_path, "t", "pooled", "p")
    assert len(a) == 0 and len(b) == 0
    shas = shas_for(2)
    with a.writer() as w:
        w.add(shas, feats_for(2, seed=1))
    with b.writer() as w:
        w.add(shas[1:], feats_for(1, seed=2))
    fresh = FeatureCache(tmp_path, "t", "pooled", "p")
    assert len(fresh.shards) == 2 and len(fresh) == 2
    first = fresh.shards[0]
    expected = feats_for(2, seed=1)[1] if first == a.shards[0] else feats_for(1, seed=2)[0]
    torch.testing.assert_close(fresh.load(shas[1:])[0], expected, atol=1e-2, rtol=1e-3)


def test_exception_inside_writer_leaves_only_whole_shards(tmp_path):
    cache = FeatureCache(tmp_path, "t", "pooled", "p")
    shas, x = shas_for(6), feats_for(6)
    with pytest.raises(RuntimeError, match="boom"):
        with cache.writer(rows_per_shard=4) as w:
            w.add(shas, x)  # 4 rows written as a shard, 2 buffered
            raise RuntimeError("boom")
    names = visible_files(cache)
    assert len(names) == 1 and not any(n.startswith(".") for n in names)
    fresh = FeatureCache(tmp_path, "t", "pooled", "p")
    assert fresh.missing(shas) == shas[4:]

    other = FeatureCache(tmp_path, "t", "pooled", "q")
    with pytest.raises(RuntimeError):
        with other.writer() as w:
            w.add(shas, x)
            raise RuntimeError("before any flush")
    assert visible_files(other) == [] and len(FeatureCache(tmp_path, "t", "pooled", "q")) == 0


def test_failed_write_removes_its_temp_file(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, "t", "pooled", "p")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trunk.cache.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        with cache.writer() as w:
            w.add(shas_for(3), feats_for(3))
    assert visible_files(cache) == []
    assert len(FeatureCache(tmp_path, "t", "pooled", "p")) == 0


WRITER_SCRIPT = """
import hashlib, sys, torch
from trunk.cache import FeatureCache
cache = FeatureCache(sys.argv[1], "t", "pooled", "p")
with cache.writer(rows_per_shard=2000) as w:
    for i in range(10_000):
        shas = [hashlib.sha256(f"{i}-{j}".encode()).hexdigest() for j in range(2000)]
        w.add(shas, torch.full((2000, 512), float(i)))
"""


def test_killed_writer_leaves_no_half_written_shard(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)])
    directory = tmp_path / "t" / "pooled" / "p-float16"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(directory.glob("shard-*"))) < 3:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cache = FeatureCache(tmp_path, "t", "pooled", "p")
    assert len(cache.shards) >= 3
    # Every visible shard is complete and readable; leftover temp files are ignored.
    for shard in cache.shards:
        with safe_open(str(shard), framework="pt") as f:
            assert f.get_tensor("features").shape == (2000, 512)
    assert len(cache) == 2000 * len(cache.shards)
    some = cache.load([hashlib.sha256(b"0-7").hexdigest()])
    assert torch.equal(some, torch.zeros(1, 512))


def test_temp_files_are_invisible(tmp_path):
    cache = FeatureCache(tmp_path, "t", "pooled", "p")
    cache.directory.mkdir(parents=True)
    (cache.directory / ".shard-0123.safetensors.999.tmp").write_bytes(b"half a shard")
    assert len(cache) == 0 and cache.dim is None and cache.bytes_per_row() == 0.0


def test_key_separates_trunks_taps_preprocessing_and_dtypes(tmp_path):
    t0 = Trunk("test_resnet", seed=0, data_config={"input_size": [3, 32, 32]})
    t1 = Trunk("test_resnet", seed=1, data_config={"input_size": [3, 32, 32]})
    t0b = Trunk("test_resnet", seed=0, data_config={"input_size": [3, 40, 40]})
    dirs = {
        FeatureCache.for_trunk(tmp_path, t0, "pooled").directory,
        FeatureCache.for_trunk(tmp_path, t1, "pooled").directory,
        FeatureCache.for_trunk(tmp_path, t0b, "pooled").directory,
        FeatureCache.for_trunk(tmp_path, t0, "layer2").directory,
        FeatureCache.for_trunk(tmp_path, t0, "pooled", dtype="int8").directory,
    }
    assert len(dirs) == 5
    c0 = FeatureCache.for_trunk(tmp_path, t0, "pooled")
    with c0.writer() as w:
        w.add(shas_for(1), feats_for(1))
    assert shas_for(1)[0] not in FeatureCache.for_trunk(tmp_path, t1, "pooled")
    with pytest.raises(TrunkError, match="no tap 'layer9'"):
        FeatureCache.for_trunk(tmp_path, t0, "layer9")


def test_shard_in_the_wrong_folder_is_refused(tmp_path):
    src = FeatureCache(tmp_path, "t", "pooled", "p")
    with src.writer() as w:
        w.add(shas_for(2), feats_for(2))
    wrong = FeatureCache(tmp_path, "t", "layer2", "p")
    wrong.directory.mkdir(parents=True)
    target = wrong.directory / src.shards[0].name
    shutil.copy(src.shards[0], target)
    with pytest.raises(ValueError, match=f"^{target}: field 'tap' is 'pooled', expected 'layer2'"):
        len(wrong)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="field 'dtype'"):
        FeatureCache(tmp_path, "t", "pooled", "p", dtype="bfloat16")
    with pytest.raises(ValueError, match="field 'tap'"):
        FeatureCache(tmp_path, "t", "../x", "p")
    cache = FeatureCache(tmp_path, "t", "pooled", "p")
    with cache.writer() as w:
        w.add(shas_for(2), feats_for(2, d=8))
    with pytest.raises(ValueError, match="width 9, the cache holds width 8"):
        with cache.writer() as w:
            w.add(shas_for(1, "x"), feats_for(1, d=9))
    with pytest.raises(ValueError, match="expected \\[2, D\\]"):
        with cache.writer() as w:
            w.add(shas_for(2, "y"), feats_for(3, d=8))
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        with cache.writer() as w:
            w.add(["abc"], feats_for(1, d=8))


def test_decode_errors_of_two_runs_at_once_are_merged_on_write(tmp_path):
    a_sha, b_sha, old_sha = shas_for(3, "decode")
    DecodeErrors.load(tmp_path).save()  # nothing new: writes nothing
    assert not (tmp_path / DECODE_ERRORS).exists()
    earlier = DecodeErrors.load(tmp_path)
    earlier.add(old_sha, "not an image: old.jpg", "old.jpg")
    earlier.save()

    # Two extractions load the record, then each finds its own bad file and saves.
    first, second = DecodeErrors.load(tmp_path), DecodeErrors.load(tmp_path)
    first.add(a_sha, "not an image: a.jpg", "a.jpg")
    second.add(b_sha, "truncated image: b.png: image file is truncated", "b.png")
    first.save()
    second.save()  # re-reads the file first: keeps first's entry instead of overwriting it

    after = DecodeErrors.load(tmp_path)
    assert after.get(a_sha) == ("not an image: a.jpg", "a.jpg")
    assert after.get(b_sha) == ("truncated image: b.png: image file is truncated", "b.png")
    assert old_sha in after and len(after) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [DECODE_ERRORS]  # no temp file left


def test_a_damaged_decode_errors_file_counts_as_empty_and_is_replaced(tmp_path, caplog):
    good, bad_key = shas_for(2, "garbled")
    (tmp_path / DECODE_ERRORS).write_text('{"format": "decode-errors/1", "errors": {"x"')
    with caplog.at_level("WARNING", logger="trunk.cache"):
        record = DecodeErrors.load(tmp_path)
    assert len(record) == 0 and "cannot be read" in caplog.text
    record.add(good, "empty file", "e.jpg")
    record.save()
    doc = json.loads((tmp_path / DECODE_ERRORS).read_text())
    doc["errors"]["not-a-sha"] = doc["errors"][good]  # entries that fail their checks are dropped one by one
    doc["errors"][bad_key] = {"error": 3, "path": "p", "decoder": decoder_stamp()}
    (tmp_path / DECODE_ERRORS).write_text(json.dumps(doc))
    again = DecodeErrors.load(tmp_path)
    assert again.get(good) == ("empty file", "e.jpg") and len(again) == 1
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        again.add("abc", "empty file", "e.jpg")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_rows_view_reads_exactly_what_load_gives(tmp_path, dtype):
    from trunk.cache import CachedRows

    cache = FeatureCache(tmp_path, "t", "pooled", "p", dtype=dtype)
    shas = shas_for(700)
    with cache.writer(rows_per_shard=300) as w:  # 3 shards, blocks of 256 rows: runs cross both
        w.add(shas, feats_for(700, d=16))
    wanted = shas[::-1][:650] + shas[:3]  # another order, with repeats
    fresh = FeatureCache(tmp_path, "t", "pooled", "p", dtype=dtype)
    view = fresh.rows(wanted)
    assert isinstance(view, CachedRows) and len(view) == 653 and view.shape == (653, 16)
    whole = FeatureCache(tmp_path, "t", "pooled", "p", dtype=dtype).load(wanted)
    idx = torch.randperm(653, generator=torch.Generator().manual_seed(1))
    assert torch.equal(view[idx], whole[idx]) and view[idx].dtype == torch.float32
    assert torch.equal(view[10:300], whole[10:300]) and torch.equal(view[5], whole[5])
    assert torch.equal(view[torch.tensor([7, 7, 0])], whole[[7, 7, 0]])
    with pytest.raises(IndexError):
        view[torch.tensor([653])]
    with pytest.raises(CacheMissError, match="1 of 2 images not in feature cache"):
        fresh.rows([shas[0], shas_for(1, "other")[0]])


def test_rows_view_after_a_quarantine_refuses_to_read(tmp_path):
    from trunk.cache import CorruptShardError, _shard_layout

    cache = FeatureCache(tmp_path, "t", "pooled", "p")
    shas = shas_for(20)
    with cache.writer(rows_per_shard=10) as w:
        w.add(shas, feats_for(20))
    view = FeatureCache(tmp_path, "t", "pooled", "p").rows(shas)
    target = view.cache.shards[view.cache._index[shas[15]][0]]  # the shard of rows 10-19
    blob = bytearray(target.read_bytes())
    offset, _, _ = _shard_layout(target, 10, 24, "float16")
    blob[offset + 5] ^= 0xFF  # a flipped byte inside the features of the second shard
    target.write_bytes(bytes(blob))
    assert view[torch.arange(10)].shape == (10, 24)  # the first shard is intact
    with pytest.raises(CorruptShardError, match="fails its checksum"):
        view[torch.arange(20)]
    with pytest.raises(CorruptShardError, match="extract again"):
        view[torch.arange(10)]  # shard numbers changed: the view is stale
