"""extract(): features for every good image, once per content, each file read once, nothing recomputed or re-decoded."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

from trunk.cache import DECODE_ERRORS, FeatureCache
from trunk.decode import decode_image, decoder_stamp, sha256_bytes
from trunk.device import resolve_device
from trunk.extract import extract, format_summary
from trunk.model import TrunkError
from trunk.preprocess import eval_transform


@pytest.fixture
def images(image_factory):
    return [image_factory(f"set/{i}.png", color=(30 * i, 200 - 20 * i, 90), seed=i) for i in range(7)]


@pytest.fixture
def forward_count(tiny_trunk):
    """Images seen by the trunk's forward, via a real forward hook."""
    seen = []
    handle = tiny_trunk.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    yield seen
    handle.remove()


def fresh_features(trunk, paths, tap="pooled"):
    transform = eval_transform(trunk.data_config)
    x = torch.stack([transform(decode_image(p.read_bytes())) for p in paths])
    with torch.inference_mode():
        return trunk(x, [tap])[tap].reshape(len(paths), -1)


def test_bad_files_are_errors_and_the_rest_get_features(tiny_trunk, images, tmp_path):
    bad = tmp_path / "set" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    missing = tmp_path / "set" / "gone.png"
    paths = images[:3] + [bad, missing] + images[3:]
    result = extract(tiny_trunk, paths, tmp_path / "cache", batch_size=3, progress=False)

    assert result.errors == {str(bad): f"not an image: {bad}", str(missing): f"file not found: {missing}"}
    assert result.shas[3] is None and result.shas[4] is None
    good = [s for s in result.shas if s is not None]
    assert good == [sha256_bytes(p.read_bytes()) for p in images]
    cache = FeatureCache.for_trunk(tmp_path / "cache", tiny_trunk, "pooled")
    assert cache.missing(good) == [] and len(cache) == 7
    assert result.summary["images"] == 9 and result.summary["errors"] == 2
    assert result.summary["new_rows"] == 7 and result.summary["reused_rows"] == 0


def test_cached_features_match_a_fresh_forward(tiny_trunk, images, tmp_path):
    result = extract(tiny_trunk, images, tmp_path / "cache", taps=("pooled", "layer2"), batch_size=4, progress=False)
    for tap in ("pooled", "layer2"):
        cached = result.caches[tap].load(result.shas)
        expected = fresh_features(tiny_trunk, images, tap)
        # Spatial taps are stored flattened, C*H*W wide.
        assert cached.shape[1] == torch.Size(tiny_trunk.tap(tap).shape).numel()
        torch.testing.assert_close(cached, expected, atol=2e-3, rtol=2e-3)


def test_int8_cache_is_close_to_a_fresh_forward(tiny_trunk, images, tmp_path):
    result = extract(tiny_trunk, images, tmp_path / "cache", dtype="int8", progress=False)
    assert result.caches["pooled"].directory.name.endswith("-int8")
    cached = result.caches["pooled"].load(result.shas)
    expected = fresh_features(tiny_trunk, images)
    step = expected.abs().amax(dim=1, keepdim=True) / 127
    assert ((cached - expected).abs() <= step / 2 + 1e-3).all()


def test_rerun_computes_nothing(tiny_trunk, images, tmp_path, forward_count):
    cache_root = tmp_path / "cache"
    first = extract(tiny_trunk, images, cache_root, taps=("pooled", "layer3"), progress=False)
    assert sum(forward_count) == 7
    listing = sorted(p.relative_to(cache_root) for p in cache_root.rglob("*"))

    second = extract(tiny_trunk, images, cache_root, taps=("pooled", "layer3"), progress=False)
    assert second.summary["new_rows"] == 0 and second.summary["reused_rows"] == 7
    assert sum(forward_count) == 7  # no forward pass at all
    assert sorted(p.relative_to(cache_root) for p in cache_root.rglob("*")) == listing
    assert second.shas == first.shas


def test_new_images_are_appended_and_duplicates_run_once(tiny_trunk, images, tmp_path, forward_count):
    cache_root = tmp_path / "cache"
    extract(tiny_trunk, images[:3], cache_root, progress=False)
    copy = tmp_path / "elsewhere" / "same_as_5.png"
    copy.parent.mkdir()
    shutil.copy(images[5], copy)
    forward_count.clear()
    result = extract(tiny_trunk, images + [copy], cache_root, batch_size=16, progress=False)
    assert forward_count == [4]  # images 3..6 once each; the copy shares image 5's row
    assert result.summary["new_rows"] == 4 and result.summary["reused_rows"] == 3
    assert result.summary["unique_images"] == 7 and result.summary["images"] == 8
    assert result.shas[-1] == result.shas[5]
    assert len(result.caches["pooled"].shards) == 2


def test_duplicate_of_a_bad_file_gets_the_same_error(tiny_trunk, tmp_path):
    a = tmp_path / "a.jpg"
    a.write_bytes(b"garbage")
    b = tmp_path / "b.jpg"
    b.write_bytes(b"garbage")
    result = extract(tiny_trunk, [a, b], tmp_path / "cache", progress=False)
    assert result.shas == [None, None]
    assert result.errors[str(b)] == f"not an image: {a} (same bytes as {a})"


def test_trunk_is_left_as_found(tiny_trunk, images, tmp_path):
    before = [m.training for m in tiny_trunk.modules()]
    extract(tiny_trunk, images[:2], tmp_path / "cache", progress=False)
    assert [m.training for m in tiny_trunk.modules()] == before
    assert next(tiny_trunk.parameters()).device.type == "cpu"


def test_bad_arguments_fail_before_any_work(tiny_trunk, images, tmp_path):
    with pytest.raises(TrunkError, match="no tap 'nope'"):
        extract(tiny_trunk, images, tmp_path / "cache", taps=("nope",), progress=False)
    with pytest.raises(ValueError, match="device 'tpu'"):
        extract(tiny_trunk, images, tmp_path / "cache", device="tpu", progress=False)
    assert not (tmp_path / "cache").exists()


def test_progress_bar_and_summary_line(tiny_trunk, images, tmp_path, capsys):
    result = extract(tiny_trunk, images[:2], tmp_path / "cache", progress=True)
    assert "extracting" in capsys.readouterr().err
    line = format_summary(result.summary)
    assert "\n" not in line
    assert line.startswith("images=2 unique_images=2 new_rows=2 reused_rows=0 errors=0 seconds=")
    assert "images/s=" in line


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")  # an already-made device is checked too
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="^device 'gpu0' is not one of: auto, cpu, cuda, cuda:N$"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.fixture
def calls(monkeypatch):
    """Real counters around the platform's own read and decode: ``calls["read"][path]``, ``calls["decode"][path]``."""
    import trunk.dataset
    import trunk.extract

    counts = {"read": Counter(), "decode": Counter()}

    def counting(kind, fn):
        def wrapper(data_or_path, *args, **kwargs):
            name = str(data_or_path) if kind == "read" else str(args[0] if args else kwargs.get("name", ""))
            counts[kind][name] += 1
            return fn(data_or_path, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(trunk.extract, "read_bytes", counting("read", trunk.extract.read_bytes))
    monkeypatch.setattr(trunk.dataset, "read_bytes", counting("read", trunk.dataset.read_bytes))
    monkeypatch.setattr(trunk.dataset, "decode_image", counting("decode", trunk.dataset.decode_image))
    return counts


def test_each_file_is_read_once_and_a_cached_one_is_not_decoded(tiny_trunk, images, tmp_path, calls):
    cache_root = tmp_path / "cache"
    extract(tiny_trunk, images[:4], cache_root, batch_size=3, progress=False)
    # Hash and decode come from the same bytes: one read per file, not one to hash and one to decode.
    assert calls["read"] == Counter({str(p): 1 for p in images[:4]})
    assert calls["decode"] == Counter({str(p): 1 for p in images[:4]})

    calls["read"].clear()
    calls["decode"].clear()
    result = extract(tiny_trunk, images, cache_root, batch_size=3, progress=False)
    assert calls["read"] == Counter({str(p): 1 for p in images})  # cached files are read to hash them...
    assert calls["decode"] == Counter({str(p): 1 for p in images[4:]})  # ...and never decoded
    assert result.summary["reused_rows"] == 4 and result.summary["new_rows"] == 3


def test_a_corrupt_file_is_decoded_once_across_runs_and_still_listed(tiny_trunk, images, tmp_path, calls):
    cache_root = tmp_path / "cache"
    bad = tmp_path / "set" / "bad.png"
    bad.write_bytes(images[0].read_bytes()[:60])  # a PNG cut short: its header survives, its pixels do not
    paths = [images[0], bad, images[1]]
    first = extract(tiny_trunk, paths, cache_root, progress=False)
    assert first.shas[1] is None and first.errors[str(bad)].startswith("truncated image: ")
    assert calls["decode"][str(bad)] == 1
    record = json.loads((cache_root / DECODE_ERRORS).read_text())
    assert list(record["errors"]) == [sha256_bytes(bad.read_bytes())]

    second = extract(tiny_trunk, paths, cache_root, progress=False)
    assert calls["decode"][str(bad)] == 1  # remembered by content: not decoded again
    assert calls["read"][str(bad)] == 2  # but read (once per run) to learn its hash
    assert second.errors == first.errors and second.shas == first.shas
    assert second.summary["errors"] == first.summary["errors"] == 1
    assert second.summary["known_errors"] == 1 and "known_errors" not in first.summary

    # The same bytes under another name: not decoded either, and the reason names the new file.
    renamed = tmp_path / "elsewhere.png"
    shutil.copy(bad, renamed)
    third = extract(tiny_trunk, [renamed, bad], cache_root, progress=False)
    assert calls["decode"][str(renamed)] == 0
    assert third.errors == {str(renamed): first.errors[str(bad)].replace(str(bad), str(renamed)),
                            str(bad): f"{first.errors[str(bad)].replace(str(bad), str(renamed))} "
                                      f"(same bytes as {renamed})"}


def test_a_fixed_file_is_decoded_again(tiny_trunk, images, tmp_path, calls):
    cache_root = tmp_path / "cache"
    path = tmp_path / "set" / "fixed.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not yet")
    assert str(path) in extract(tiny_trunk, [path], cache_root, progress=False).errors

    shutil.copy(images[2], path)  # same path, new bytes: a new content hash
    result = extract(tiny_trunk, [path], cache_root, progress=False)
    assert calls["decode"][str(path)] == 2
    assert result.errors == {} and result.shas == [sha256_bytes(images[2].read_bytes())]
    assert result.summary["new_rows"] == 1 and "known_errors" not in result.summary


def test_a_failure_recorded_by_another_decoder_is_tried_again(tiny_trunk, tmp_path, calls):
    cache_root = tmp_path / "cache"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    extract(tiny_trunk, [bad], cache_root, progress=False)
    record = json.loads((cache_root / DECODE_ERRORS).read_text())
    for entry in record["errors"].values():
        entry["decoder"] = "decode-0/pillow-1.0"  # e.g. an older Pillow that may have refused it wrongly
    (cache_root / DECODE_ERRORS).write_text(json.dumps(record))

    again = extract(tiny_trunk, [bad], cache_root, progress=False)
    assert calls["decode"][str(bad)] == 2 and again.errors == {str(bad): f"not an image: {bad}"}
    stamps = {e["decoder"] for e in json.loads((cache_root / DECODE_ERRORS).read_text())["errors"].values()}
    assert stamps == {decoder_stamp()}


def test_decoding_in_worker_processes_gives_the_same_result(tiny_trunk, images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    paths = images[:3] + [bad]
    inline = extract(tiny_trunk, paths, tmp_path / "a", batch_size=2, progress=False)
    workers = extract(tiny_trunk, paths, tmp_path / "b", batch_size=2, num_workers=1, progress=False)
    assert workers.shas == inline.shas and workers.errors == inline.errors
    torch.testing.assert_close(workers.caches["pooled"].load(inline.shas[:3]),
                               inline.caches["pooled"].load(inline.shas[:3]))
    assert json.loads((tmp_path / "b" / DECODE_ERRORS).read_text())["errors"]


def test_rows_lost_to_a_later_quarantine_are_read_again_and_recomputed(tiny_trunk, images, tmp_path, calls,
                                                                       monkeypatch):
    import trunk.cache

    root = tmp_path / "cache"
    block_rows = trunk.cache.BLOCK_ROWS
    monkeypatch.setattr(trunk.cache, "BLOCK_ROWS", 1)  # one checksum per row: chunks verify separate blocks
    first = extract(tiny_trunk, images[:4], root, batch_size=2, progress=False)
    monkeypatch.setattr(trunk.cache, "BLOCK_ROWS", block_rows)
    cache = first.caches["pooled"]
    clean = cache.load(first.shas)
    shard = cache.shards[0]
    start = shard.read_bytes().index(clean[3].half().numpy().tobytes())  # the last row's features
    raw = bytearray(shard.read_bytes())
    raw[start:start + 8] = bytes(b ^ 0xFF for b in raw[start:start + 8])
    shard.write_bytes(bytes(raw))
    calls["read"].clear()

    # Chunk 1 (images 0, 1) verifies and counts as cached; chunk 2 finds row 3 damaged and the
    # whole shard goes, taking rows 0 and 1 with it: they are read again and recomputed.
    again = extract(tiny_trunk, images[:4], root, batch_size=2, progress=False)
    assert again.summary["quarantined_rows"] == 4 and again.summary["new_rows"] == 4
    assert again.summary["reused_rows"] == 0 and again.errors == {}
    assert [calls["read"][str(p)] for p in images[:4]] == [2, 2, 1, 1]
    torch.testing.assert_close(FeatureCache.for_trunk(root, tiny_trunk, "pooled").load(again.shas), clean)


def test_with_the_content_hash_index_cached_files_are_not_read_at_all(tiny_trunk, images, tmp_path, calls,
                                                                       image_factory):
    import os

    from trunk.hashindex import ContentHashes

    cache_root = tmp_path / "cache"
    bad = tmp_path / "set" / "bad.png"
    bad.write_bytes(images[0].read_bytes()[:60])
    paths = [*images, bad]
    hour_ago = os.stat(images[0]).st_mtime_ns - 3600 * 10**9  # older than the index's racy-mtime window
    for p in paths:
        os.utime(p, ns=(hour_ago, hour_ago))
    first = extract(tiny_trunk, paths, cache_root, progress=False, hashes=ContentHashes(cache_root))
    assert calls["read"] == Counter({str(p): 1 for p in paths}) and "unread" not in first.summary

    calls["read"].clear()
    calls["decode"].clear()
    second = extract(tiny_trunk, paths, cache_root, progress=False, hashes=ContentHashes(cache_root))
    assert calls["read"] == Counter() and calls["decode"] == Counter()  # nothing read, nothing decoded
    assert second.shas == first.shas and second.errors == first.errors  # the bad file is still listed
    assert second.summary["unread"] == len(images) and second.summary["reused_rows"] == len(images)

    # A file whose content changed (new size or mtime) is read, hashed and computed; only that one.
    changed = image_factory("new/changed.png", color=(1, 2, 3), seed=99).read_bytes()
    images[2].write_bytes(changed)
    os.utime(images[2], ns=(hour_ago + 10**9, hour_ago + 10**9))
    third = extract(tiny_trunk, paths, cache_root, progress=False, hashes=ContentHashes(cache_root))
    assert calls["read"] == Counter({str(images[2]): 1}) and calls["decode"] == Counter({str(images[2]): 1})
    assert third.shas[2] == sha256_bytes(changed) and third.summary["new_rows"] == 1

    # An index entry whose rows are gone from the cache: the file is read after all, and computed.
    shutil.rmtree(cache_root / tiny_trunk.trunk_id)
    calls["read"].clear()
    fourth = extract(tiny_trunk, images[:2], cache_root, progress=False, hashes=ContentHashes(cache_root))
    assert calls["read"] == Counter({str(p): 1 for p in images[:2]}) and fourth.summary["new_rows"] == 2
