"""The cache-precision benchmark on a few demo images: real shards, real training; structure, not speed."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from benchmarks.cache_precision import (MAX_DROP_POINTS, default_train_settings, format_cache_precision_table,
                                        run_cache_precision_benchmark)
from heads.training.train import TrainSettings
from trunk.cache import FeatureCache
from trunk.model import POOLED, Trunk

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cache_precision_measures_real_shards_and_trains_from_each_cache(tmp_path):
    train = TrainSettings(epochs=3, batch_size=16, lr=0.01, weight_decay=0.0, patience=0, seed=0)
    result = run_cache_precision_benchmark(tmp_path, n_images=40, size=32, heads=("colour", "shape"), train=train,
                                           rows_per_shard=16)
    width = result["width"]
    trunk = Trunk("test_resnet", pretrained=False, seed=0, data_config={"input_size": [3, 32, 32], "crop_pct": 1.0})
    assert width == trunk.tap(POOLED).channels
    for dtype in ("float16", "int8"):
        b = result["bytes"][dtype]
        cache = FeatureCache(tmp_path / "features", trunk.trunk_id, POOLED, trunk.preprocess_key, dtype=dtype)
        files = list(cache.directory.glob("shard-*.safetensors"))
        # The sizes are the real shard files' (40 rows, 16 per shard: 3 shards).
        assert b["rows"] == len(cache) == 40 and b["shards"] == len(files) == 3
        assert b["file_bytes"] == sum(f.stat().st_size for f in files)
        assert b["file_bytes_per_row"] == pytest.approx(b["file_bytes"] / 40) == pytest.approx(cache.bytes_per_row())
    assert result["bytes"]["float16"]["feature_bytes_per_row"] == 2 * width
    assert result["bytes"]["int8"]["feature_bytes_per_row"] == width + 4
    assert result["bytes_ratio"] == pytest.approx((width + 4) / (2 * width))
    assert result["file_bytes_ratio"] < 1.0
    # The two caches hold different rows (int8 is rounded coarser than fp16), close to each other.
    caches = {d: FeatureCache(tmp_path / "features", trunk.trunk_id, POOLED, trunk.preprocess_key, dtype=d)
              for d in ("float16", "int8")}
    shas = [hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((tmp_path / "shapes" / "images").iterdir())]
    assert len(shas) == 40
    a, b = caches["float16"].load(shas), caches["int8"].load(shas)
    assert not torch.equal(a, b)
    assert (a - b).abs().max() <= a.abs().amax(dim=1).max() / 127
    for head, r in result["heads"].items():
        assert r["n_train"] + r["n_val"] == 40 and r["n_val"] == 8
        assert set(r["accuracy"]) == set(r["accuracy_cached"]) == {"float32", "float16", "int8"}
        assert all(0.0 <= v <= 1.0 for v in [*r["accuracy"].values(), *r["accuracy_cached"].values()])
        # fp32 features are their own cache: the two accuracies are measured on the same rows.
        assert r["accuracy"]["float32"] == r["accuracy_cached"]["float32"]
        assert r["drop_points"] == pytest.approx(100 * (r["accuracy"]["float16"] - r["accuracy"]["int8"]))
    assert result["max_drop_points"] == max(r["drop_points"] for r in result["heads"].values())
    assert result["passed"] == (result["max_drop_points"] <= MAX_DROP_POINTS)
    json.dumps(result)
    table = format_cache_precision_table(result)
    assert "colour" in table and "shape" in table and "feature B/row" in table


def test_default_train_settings_are_the_demo_heads():
    settings = default_train_settings()
    assert settings.epochs >= 1 and settings.batch_size >= 1 and settings.lr > 0
