"""fit_head end to end: real head config, real image manifest, separable features, saved head."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from PIL import Image

from heads.training.data import load_labelled_data
from heads.training.fit import fit_head
from heads.spec import load_head_spec
from heads.store import load_head
from tests.conftest import write_image

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}
DIM = 12


@pytest.fixture
def labelled(tmp_path):
    """A manifest of 3 classes x 16 tiny images, 4 per class for validation, two slices."""
    rows = []
    for c, colour in CLASSES.items():
        for i in range(16):
            write_image(tmp_path / "ds" / f"{c}_{i}.png", colour, size=8, seed=i)
            rows.append({"path": f"{c}_{i}.png", "label": c, "split": "val" if i < 4 else "train",
                         "slice": "indoor" if i % 2 else "outdoor"})
    with (tmp_path / "ds" / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    path = tmp_path / "conf" / "heads" / "colour.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({
        "name": "colour", "owner": "team-a",
        "data": {"manifest": str(tmp_path / "ds" / "labels.csv")},
        "module": {"_target_": "heads.modules.MLPHead", "hidden": 16, "dropout": 0.1},
        "train": {"epochs": 40, "batch_size": 8, "lr": 0.02, "patience": 8, "seed": 3},
        "gate": {"min_val_accuracy": 0.8, "min_slice_size": 2},
    }))
    spec = load_head_spec(path)
    return spec, load_labelled_data(spec)


def features(samples, seed):
    """Features as a trunk would give them: one Gaussian cluster per class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([s.label for s in samples])
    x = torch.randn(len(y), DIM, generator=g) * 0.5
    x[torch.arange(len(y)), y] += 2.0
    return x.half()


def test_fit_trains_evaluates_costs_and_saves(labelled, tmp_path):
    spec, data = labelled
    train_x, val_x = features(data.train, 0), features(data.val, 1)
    result = fit_head(spec, data, train_x, val_x, trunk_id="abc123", out_dir=tmp_path / "out")

    m = result.metrics
    assert m["val_accuracy"] >= 0.9 and m["val_macro_f1"] >= 0.9
    assert m["params"] == (DIM * 16 + 16) + (16 * 3 + 3)
    assert m["added_gflops"] == pytest.approx(2 * (DIM * 16 + 16 * 3) / 1e9)
    assert m["added_ms_per_image"] > 0
    assert (m["train_size"], m["val_size"]) == (36, 12)
    assert 1 <= m["best_epoch"] <= len(result.history) <= 40
    assert result.classes == ["blue", "green", "red"] and result.in_features == DIM
    assert result.trunk_id == "abc123" and result.data_sha == data.data_sha
    assert set(result.per_class_recall) == set(result.classes)
    assert sum(map(sum, result.confusion)) == 12
    assert set(result.slice_accuracy) == {"indoor", "outdoor"}
    assert all(v["n"] == 6 and 0.0 <= v["accuracy"] <= 1.0 for v in result.slice_accuracy.values())
    assert not result.module.training

    with Image.open(result.artifacts["confusion"]) as im:
        assert im.format == "PNG"
    assert json.loads(result.artifacts["history"].read_text()) == result.history

    # The saved head rebuilds from safetensors + JSON and predicts exactly as the result's module.
    loaded = load_head(tmp_path / "out" / "head")
    assert loaded.meta["data_sha"] == data.data_sha and loaded.meta["config_sha"] == spec.config_sha
    assert loaded.classes == result.classes and loaded.meta["trunk_id"] == "abc123"
    with torch.no_grad():
        assert torch.equal(loaded.module(val_x.float()), result.module(val_x.float()))


def test_fit_is_reproducible(labelled, tmp_path):
    spec, data = labelled
    train_x, val_x = features(data.train, 0), features(data.val, 1)
    a = fit_head(spec, data, train_x, val_x, trunk_id="t", out_dir=tmp_path / "a")
    b = fit_head(spec, data, train_x, val_x, trunk_id="t", out_dir=tmp_path / "b")
    assert a.history == b.history and a.confusion == b.confusion
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (tmp_path / "a" / "head" / "head.safetensors").read_bytes() == \
        (tmp_path / "b" / "head" / "head.safetensors").read_bytes()


def test_features_must_line_up_with_the_data(labelled, tmp_path):
    spec, data = labelled
    with pytest.raises(ValueError, match="colour.yaml: features do not match"):
        fit_head(spec, data, features(data.train, 0)[:-1], features(data.val, 1), trunk_id="t",
                 out_dir=tmp_path / "out")


def test_the_result_keeps_its_validation_logits_in_row_order(labelled, tmp_path):
    spec, data = labelled
    train_x, val_x = features(data.train, 0), features(data.val, 1)
    result = fit_head(spec, data, train_x, val_x, trunk_id="t", out_dir=tmp_path / "out")
    assert result.val_logits.dtype == torch.float32 and result.val_logits.device.type == "cpu"
    assert result.val_logits.shape == (len(data.val), 3)
    with torch.no_grad():
        assert torch.allclose(result.val_logits, result.module(val_x.float()), atol=1e-5)
    assert result.val_logits.argmax(1).tolist() == result.val_predictions
    assert result.val_paths == [s.path for s in data.val]


def test_training_from_a_cache_view_gives_the_same_head_as_from_memory(labelled, tmp_path):
    from trunk.cache import FeatureCache

    spec, data = labelled
    train_x, val_x = features(data.train, 0), features(data.val, 1)
    shas = [f"{i:064x}" for i in range(len(data.train) + len(data.val))]
    cache = FeatureCache(tmp_path / "cache", "t", "pooled", "p")
    with cache.writer(rows_per_shard=20) as w:  # several shards: batches gather across them
        w.add(shas, torch.cat([train_x, val_x]))
    train_shas, val_shas = shas[:len(data.train)], shas[len(data.train):]
    in_memory = fit_head(spec, data, cache.load(train_shas), cache.load(val_shas), trunk_id="t",
                         out_dir=tmp_path / "a")
    streamed = fit_head(spec, data, cache.rows(train_shas), cache.rows(val_shas), trunk_id="t",
                        out_dir=tmp_path / "b")
    assert streamed.history == in_memory.history
    assert (tmp_path / "a" / "head" / "head.safetensors").read_bytes() == \
        (tmp_path / "b" / "head" / "head.safetensors").read_bytes()
    assert torch.equal(streamed.val_logits, in_memory.val_logits)
