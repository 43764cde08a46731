"""fit_branch_head end to end: real timm trunk, generated images, saved and reloaded branch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from heads.branch import branch_input
from heads.training.branch_train import fit_branch_head
from heads.training.data import load_labelled_data
from heads.modules import LinearHead
from heads.spec import HeadConfigError, load_head_spec
from heads.store import load_head
from tests.conftest import SMALL
from trunk.model import Trunk
from demo.shapes import generate_shapes

pytestmark = pytest.mark.usefixtures("one_thread")

DESIGN_METRICS = ("val_accuracy", "val_macro_f1", "params", "added_gflops", "added_ms_per_image")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_images=60, n_holdout=0, size=32)


def head_spec(tmp_path, manifest, tap="layer2", **module):
    path = tmp_path / "conf" / "texture.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": "texture", "owner": "team-a",
        "data": {"manifest": str(manifest)},
        "attach": {"tap": tap},
        "module": {"_target_": "heads.branch.BranchHead", **module},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.001, "patience": 0, "seed": 5},
        "gate": {"min_val_accuracy": 0.0, "min_slice_size": 1},
    }))
    spec = load_head_spec(path)
    return spec, load_labelled_data(spec)


def make_trunk():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Trunk("test_resnet", data_config=SMALL)


FLIP = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}]


def test_branch_fit_evaluates_saves_and_reloads(shapes, tmp_path):
    trunk = make_trunk()
    spec, data = head_spec(tmp_path, shapes.manifests["texture"], dropout=0.1)
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    result = fit_branch_head(spec, data, trunk, out_dir=tmp_path / "out", augment_ops=FLIP)

    for key in DESIGN_METRICS:
        assert key in result.metrics
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0
    assert result.metrics["epochs_run"] == 2 and len(result.history) == 2
    assert result.metrics["val_size"] == len(data.val) and result.metrics["train_skipped"] == 0
    assert (tmp_path / "out" / "confusion.png").stat().st_size > 0
    assert (tmp_path / "out" / "history.json").is_file()
    assert set(result.per_class_recall) == set(data.classes)

    # The shared trunk is never trained: weights and batch-norm statistics unchanged.
    after = trunk.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ...while the branch moved away from the trunk's copy of its layers.
    assert not torch.equal(result.module.suffix.blocks[0][0].conv1.weight, trunk.model.layer3[0].conv1.weight)

    loaded = load_head(tmp_path / "out" / "head")
    kwargs = loaded.meta["kwargs"]
    assert kwargs == {"model_name": "test_resnet", "tap": "layer2", "model_kwargs": {}, "dropout": 0.1}
    assert result.meta()["kwargs"] == kwargs  # the registry logs the same meta later
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats = branch_input(trunk, x, "layer2")
    with torch.no_grad():
        assert torch.equal(loaded.module(feats), result.module.eval()(feats))


def test_branch_fit_is_reproducible(shapes, tmp_path):
    spec, data = head_spec(tmp_path, shapes.manifests["texture"], dropout=0.1)
    a = fit_branch_head(spec, data, make_trunk(), out_dir=tmp_path / "a", augment_ops=FLIP)
    b = fit_branch_head(spec, data, make_trunk(), out_dir=tmp_path / "b", augment_ops=FLIP)
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.history == b.history


def test_unreadable_images_are_skipped_and_counted(shapes, tmp_path):
    spec, data = head_spec(tmp_path, shapes.manifests["texture"])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    data.train[0] = dataclasses.replace(data.train[0], path=str(bad))
    data.val[0] = dataclasses.replace(data.val[0], path=str(tmp_path / "missing.png"))
    result = fit_branch_head(spec, data, make_trunk(), out_dir=tmp_path / "out", augment_ops=None)
    assert result.metrics["train_skipped"] == 1
    assert result.metrics["val_skipped"] == 1
    assert result.metrics["val_size"] == len(data.val) - 1


def test_unknown_tap_is_a_one_line_error(shapes, tmp_path, tiny_trunk):
    spec, data = head_spec(tmp_path, shapes.manifests["texture"], tap="layer9")
    with pytest.raises(HeadConfigError) as e:
        fit_branch_head(spec, data, tiny_trunk, out_dir=tmp_path / "out", augment_ops=None)
    message = str(e.value)
    assert "\n" not in message and "attach.tap" in message and "layer9" in message
    assert "layer2" in message and "layer3" in message


def test_added_gflops_between_linear_head_and_full_trunk(shapes, tmp_path):
    from heads.training.cost import measure_cost
    from torch.utils.flop_counter import FlopCounterMode

    trunk = make_trunk()
    spec, data = head_spec(tmp_path, shapes.manifests["texture"])
    result = fit_branch_head(spec, data, trunk, out_dir=tmp_path / "out", augment_ops=None)
    pooled = trunk.tap("pooled").channels
    linear = measure_cost(LinearHead(pooled, len(data.classes)), pooled, repeats=1)["added_gflops"]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        trunk.model(torch.zeros(1, 3, 32, 32))
    full = counter.get_total_flops() / 1e9
    assert linear < result.metrics["added_gflops"] < full


def test_worker_processes_give_the_same_head(shapes, tmp_path):
    # Without augmentation, decoding in a worker process must not change what is learnt.
    spec, data = head_spec(tmp_path, shapes.manifests["texture"])
    a = fit_branch_head(spec, data, make_trunk(), out_dir=tmp_path / "a", augment_ops=None)
    b = fit_branch_head(spec, data, make_trunk(), out_dir=tmp_path / "b", augment_ops=None, num_workers=1)
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cached_tap_features_train_like_images_without_augmentation(shapes, tmp_path):
    """Without augmentation, training on the tap's cached features is training on the images."""
    trunk = make_trunk()
    spec, data = head_spec(tmp_path, shapes.manifests["texture"])
    from_images = fit_branch_head(spec, data, trunk, out_dir=tmp_path / "a", augment_ops=None)

    def tap_features(samples):
        from trunk.decode import load_image
        from trunk.preprocess import eval_transform

        transform = eval_transform(trunk.data_config)
        x = torch.stack([transform(load_image(s.path)[0]) for s in samples])
        with torch.no_grad():
            return branch_input(trunk, x, spec.tap)

    cached = (tap_features(data.train), tap_features(data.val))
    from_cache = fit_branch_head(spec, data, trunk, out_dir=tmp_path / "b", augment_ops=None, cached=cached)
    for a, b in zip(from_images.history, from_cache.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-6)
    with pytest.raises(HeadConfigError, match="field 'augment': cached tap features cannot be augmented"):
        fit_branch_head(spec, data, trunk, out_dir=tmp_path / "c", augment_ops=FLIP, cached=cached)
    with pytest.raises(ValueError, match="cached features .* do not match the data"):
        fit_branch_head(spec, data, trunk, out_dir=tmp_path / "d", augment_ops=None,
                        cached=(cached[0][:3], cached[1]))


def test_a_branch_result_keeps_its_validation_logits_and_the_prefix_gives_training_stats(shapes, tmp_path):
    from heads.monitor.stats import row_keys
    from heads.training.branch_train import train_tap_stats
    from trunk.seen import content_sha

    trunk = make_trunk()
    spec, data = head_spec(tmp_path, shapes.manifests["texture"])
    bad = tmp_path / "missing.png"
    data.val[0] = dataclasses.replace(data.val[0], path=str(bad))  # left out: rows follow val_paths
    result = fit_branch_head(spec, data, trunk, out_dir=tmp_path / "out", augment_ops=FLIP)
    from trunk.decode import load_image
    from trunk.preprocess import eval_transform

    transform = eval_transform(trunk.data_config)

    def tap_of(paths):
        x = torch.stack([transform(load_image(p)[0]) for p in paths])
        with torch.no_grad():
            return branch_input(trunk, x, spec.tap)

    assert result.val_paths == [s.path for s in data.val[1:]]
    assert result.val_logits.shape == (len(data.val) - 1, len(data.classes))
    with torch.no_grad():
        assert torch.allclose(result.val_logits, result.module(tap_of(result.val_paths)), atol=1e-4)
    assert result.val_logits.argmax(1).tolist() == result.val_predictions

    # The training images' tap features, as an augmented head's reference records them.
    stats = train_tap_stats(trunk, data, spec.tap, batch_size=16, seed=3)
    x = tap_of([s.path for s in data.train]).double().mean(dim=(2, 3))
    assert stats.count == len(data.train) and torch.allclose(stats.mean, x.mean(0), atol=1e-6)
    assert torch.allclose(stats.var, x.var(0), rtol=1e-5, atol=1e-7)
    keys = row_keys([content_sha(s.path) for s in data.train], 3)
    assert torch.equal(stats.sample_keys, torch.sort(keys).values[:256])
