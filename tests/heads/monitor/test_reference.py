"""A head's reference: built from tensors in memory, saved without pickles, altered files refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from heads.monitor.reference import HeadReference, HeadReferenceError
from heads.monitor.stats import row_keys

CLASSES = ["a", "b", "c", "d"]


def _reference(features: bool = True) -> HeadReference:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 4, generator=g) * 2
    train = torch.randn(500, 16, generator=g) * 2 + 3 if features else None
    keys = row_keys([f"{i:064x}" for i in range(500)], seed=5) if features else None
    return HeadReference.build(logits, CLASSES, train, tap="pooled", train_keys=keys, seed=5, sample_size=64,
                               meta={"head": "shapes", "version": "2"})


def test_build_records_validation_predictions_and_training_feature_stats():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 4, generator=g) * 2
    train = torch.randn(500, 16, generator=g) * 2 + 3
    ref = _reference()
    assert ref.predictions.label_counts.tolist() == torch.bincount(logits.argmax(1), minlength=4).tolist()
    top = torch.softmax(logits, 1).max(1).values
    assert ref.predictions.low_confidence_share(0.5) == pytest.approx(float((top < 0.5).double().mean()))
    assert ref.features.count == 500 and ref.features.sample.shape == (64, 16)
    torch.testing.assert_close(ref.features.mean, train.double().mean(0))
    summary = ref.summary()
    assert summary["n_val"] == 200 and summary["feature_dim"] == 16 and set(summary["label_distribution"]) == set(CLASSES)
    with pytest.raises(HeadReferenceError, match=r"validation scores: expected \(N, 4\)"):
        HeadReference.build(logits[:, :3], CLASSES, None, tap="pooled")


@pytest.mark.parametrize("features", [True, False])
def test_round_trip_keeps_every_figure(tmp_path, features):
    ref = _reference(features)
    back = HeadReference.load(ref.save(tmp_path / "reference.safetensors"), expected_digest=ref.digest)
    assert back.digest == ref.digest
    assert back.tap == "pooled" and back.classes == CLASSES and back.meta == {"head": "shapes", "version": "2"}
    assert back.predictions.to_dict() == ref.predictions.to_dict()
    if features:
        assert torch.equal(back.features.sample, ref.features.sample)
        assert torch.equal(back.features.mean, ref.features.mean) and back.features.count == 500
    else:
        assert back.features is None


def test_altered_or_replaced_or_foreign_files_are_refused(tmp_path):
    ref = _reference()
    path = ref.save(tmp_path / "reference.safetensors")
    other = _reference(features=False)
    with pytest.raises(HeadReferenceError, match=f"but {other.digest} was recorded"):
        HeadReference.load(path, expected_digest=other.digest)

    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of the feature sample
    path.write_bytes(bytes(data))
    with pytest.raises(HeadReferenceError, match="the file was altered"):
        HeadReference.load(path)

    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(HeadReferenceError, match="not a head reference"):
        HeadReference.load(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(HeadReferenceError, match="cannot be read"):
        HeadReference.load(garbage)
