"""extract(): features for every good image, once per content, and nothing recomputed."""

from __future__ import annotations

import shutil

import pytest
import torch

from trunk.cache import FeatureCache
from trunk.decode import decode_image, sha256_bytes
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
