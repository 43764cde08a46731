"""Feature cache integrity: checksums per row block, quarantine of damaged shards, recompute."""

from __future__ import annotations

import hashlib
import json
import logging
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from trunk.cache import BLOCK_ROWS, QUARANTINE, CacheMissError, CorruptShardError, FeatureCache
from trunk.decode import sha256_bytes
from trunk.extract import extract


def shas_for(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def feats_for(n: int, d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3


def tensor_span(path, name: str) -> tuple[int, int]:
    """Absolute byte range ``[start, end)`` of one tensor's data inside a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    lo, hi = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + lo, 8 + n + hi


def flip(path, offset: int, count: int = 4) -> None:
    """Invert ``count`` bytes in place: same size, same header, different data."""
    raw = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def write(tmp_path, n: int, *, dtype: str = "float16", rows_per_shard: int = 4096, salt: str = "",
          seed: int = 0) -> tuple[FeatureCache, list[str], torch.Tensor]:
    cache = FeatureCache(tmp_path, "t", "pooled", "p", dtype=dtype)
    shas, x = shas_for(n, salt), feats_for(n, seed=seed)
    with cache.writer(rows_per_shard=rows_per_shard) as w:
        w.add(shas, x)
    return cache, shas, x


def fresh(tmp_path, dtype: str = "float16") -> FeatureCache:
    return FeatureCache(tmp_path, "t", "pooled", "p", dtype=dtype)


def test_shards_carry_one_checksum_per_block(tmp_path):
    cache, _, _ = write(tmp_path, 600)
    with safe_open(str(cache.shards[0]), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "feature-cache/2" and meta["block_rows"] == str(BLOCK_ROWS)
    assert len(meta["block_crc32"]) == 8 * 3 and len(meta["sha256_crc32"]) == 8  # 600 rows: 3 blocks


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_same_size_corruption_is_detected_on_read_and_quarantined(tmp_path, dtype, caplog):
    cache, shas, x = write(tmp_path, 600, dtype=dtype)
    shard = cache.shards[0]
    size = shard.stat().st_size
    start, _ = tensor_span(shard, "features")
    row_bytes = 24 * (2 if dtype == "float16" else 1)
    flip(shard, start + 300 * row_bytes + 5)  # row 300: block 1
    assert shard.stat().st_size == size

    reader = fresh(tmp_path, dtype)
    ok = reader.load(shas[:BLOCK_ROWS])  # block 0 is intact and still readable
    torch.testing.assert_close(ok, x[:BLOCK_ROWS], atol=0.2, rtol=0.02)
    with caplog.at_level(logging.WARNING, logger="trunk.cache"), pytest.raises(CorruptShardError) as e:
        reader.load(shas[290:310])
    assert isinstance(e.value, CacheMissError)
    assert str(e.value).startswith(f"{shard}: block 1 (rows 256-511) fails its checksum; quarantined to "
                                   f"{reader.directory / QUARANTINE / shard.name}, its 600 rows are missing")
    assert not shard.exists() and (reader.directory / QUARANTINE / shard.name).stat().st_size == size
    assert "fails its checksum" in (reader.directory / QUARANTINE / f"{shard.name}.reason.txt").read_text()
    assert "quarantined" in caplog.text
    # Its rows are now missing, for this instance and for every later one.
    assert reader.missing(shas) == shas and len(fresh(tmp_path, dtype)) == 0


def test_corrupt_scale_of_an_int8_shard_is_detected(tmp_path):
    cache, shas, _ = write(tmp_path, 10, dtype="int8")
    start, _ = tensor_span(cache.shards[0], "scale")
    flip(cache.shards[0], start + 4 * 7)  # row 7's scale
    with pytest.raises(CorruptShardError, match="block 0 \\(rows 0-9\\) fails its checksum"):
        fresh(tmp_path, "int8").load(shas[7:8])


def test_corrupt_row_hashes_quarantine_the_shard_when_indexed(tmp_path):
    cache, shas, x = write(tmp_path, 8, rows_per_shard=4)
    bad, good = cache.shards
    start, _ = tensor_span(bad, "sha256")
    flip(bad, start + 40)  # row 1's hash: that row would answer to a hash no image has
    reader = fresh(tmp_path)
    assert reader.shards == [good] and len(reader) == 4
    assert reader.missing(shas) == shas[:4]
    assert (reader.directory / QUARANTINE / bad.name).exists()
    torch.testing.assert_close(reader.load(shas[4:]), x[4:], atol=1e-2, rtol=1e-3)


def test_truncated_shard_is_quarantined_instead_of_blocking_the_cache(tmp_path):
    cache, shas, x = write(tmp_path, 8, rows_per_shard=4)
    bad, good = cache.shards
    bad.write_bytes(bad.read_bytes()[:-100])
    reader = fresh(tmp_path)
    assert len(reader) == 4 and reader.shards == [good]  # before: ValueError on every use
    assert reader.missing(shas) == shas[:4]
    assert "not a whole feature-cache shard" in (reader.directory / QUARANTINE / f"{bad.name}.reason.txt").read_text()
    torch.testing.assert_close(reader.load(shas[4:]), x[4:], atol=1e-2, rtol=1e-3)


def test_verify_quarantines_and_keeps_copies_held_by_other_shards(tmp_path):
    # Two processes that both found rows missing may both write them: rows 1, 2 live twice.
    a, b = fresh(tmp_path), fresh(tmp_path)
    assert len(a) == 0 and len(b) == 0
    shas, x = shas_for(3), feats_for(3)
    with a.writer() as w:
        w.add(shas, x)
    with b.writer() as w:
        w.add(shas[1:], x[1:])
    # Name them so that the damaged one sorts first and is the copy the index picks.
    damaged = a.shards[0].rename(a.directory / "shard-0.safetensors")
    b.shards[0].rename(b.directory / "shard-1.safetensors")
    start, _ = tensor_span(damaged, "features")
    flip(damaged, start)
    reader = fresh(tmp_path)
    assert reader.verify(shas) == 3
    assert reader.missing(shas) == shas[:1]  # rows 1 and 2 are still there, from the copy
    torch.testing.assert_close(reader.load(shas[1:]), x[1:], atol=1e-2, rtol=1e-3)


def test_checks_happen_once_per_block_per_instance(tmp_path):
    cache, shas, _ = write(tmp_path, 600)
    reader = fresh(tmp_path)
    reader.load(shas[:10])
    assert reader._verified == {(cache.shards[0], 0)}
    reader.load(shas[500:510])
    assert reader._verified == {(cache.shards[0], 0), (cache.shards[0], 1)}


def raw_shard(cache, name: str, n: int, fmt: str):
    """A shard of ``n`` rows written by hand, with no checksums, in format ``fmt``: (shas, features, path)."""
    cache.directory.mkdir(parents=True)
    shas, x = shas_for(n), feats_for(n)
    sha_t = torch.frombuffer(bytearray(b"".join(bytes.fromhex(s) for s in shas)), dtype=torch.uint8).reshape(n, 32)
    meta = {"format": fmt, "trunk_id": "t", "tap": "pooled", "preprocess_key": "p", "dtype": "float16", "dim": "24"}
    path = cache.directory / name
    path.write_bytes(safetensors_save({"sha256": sha_t, "features": x.half()}, metadata=meta))
    return shas, x, path


def test_legacy_shard_without_checksums_is_read_with_one_warning(tmp_path, caplog):
    cache = fresh(tmp_path)
    shas, x, _ = raw_shard(cache, "shard-legacy.safetensors", 5, "feature-cache/1")
    with caplog.at_level(logging.WARNING, logger="trunk.cache"):
        got = cache.load(shas)
        cache.load(shas)
        assert cache.verify(shas) == 0
    torch.testing.assert_close(got, x, atol=1e-2, rtol=1e-3)
    assert caplog.text.count("predate checksums") == 1


def test_extraction_recomputes_the_rows_of_a_corrupt_shard(tiny_trunk, image_factory, tmp_path):
    images = [image_factory(f"set/{i}.png", color=(30 * i, 200 - 20 * i, 90), seed=i) for i in range(7)]
    root = tmp_path / "cache"
    first = extract(tiny_trunk, images, root, batch_size=4, progress=False)
    clean = first.caches["pooled"].load(first.shas)
    shard = first.caches["pooled"].shards[0]
    start, _ = tensor_span(shard, "features")
    flip(shard, start + 10, count=64)

    again = extract(tiny_trunk, images, root, batch_size=4, progress=False)
    assert again.summary["quarantined_rows"] == 7 and again.summary["new_rows"] == 7
    assert again.shas == first.shas == [sha256_bytes(p.read_bytes()) for p in images]
    assert torch.equal(FeatureCache.for_trunk(root, tiny_trunk, "pooled").load(again.shas), clean)
    assert (again.caches["pooled"].directory / QUARANTINE / shard.name).exists()


def test_extraction_recomputes_the_rows_of_a_truncated_shard(tiny_trunk, image_factory, tmp_path):
    images = [image_factory(f"set/{i}.png", color=(30 * i, 90, 200 - 20 * i), seed=i) for i in range(5)]
    root = tmp_path / "cache"
    first = extract(tiny_trunk, images, root, batch_size=4, progress=False)
    clean = first.caches["pooled"].load(first.shas)
    shard = first.caches["pooled"].shards[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    again = extract(tiny_trunk, images, root, batch_size=4, progress=False)
    assert again.summary["new_rows"] == 5 and again.summary["reused_rows"] == 0
    assert torch.equal(again.caches["pooled"].load(again.shas), clean)


def test_shard_of_an_unknown_format_is_skipped_not_quarantined(tmp_path, caplog):
    cache = fresh(tmp_path)
    shas, _, newer = raw_shard(cache, "shard-newer.safetensors", 2, "feature-cache/9")
    with caplog.at_level(logging.WARNING, logger="trunk.cache"):
        assert cache.missing(shas) == shas and cache.shards == []
    assert newer.exists() and not (cache.directory / QUARANTINE).exists()
    assert "'feature-cache/9'" in caplog.text and "skipped" in caplog.text
