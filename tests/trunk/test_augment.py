import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from trunk.augment import build_train_transform
from trunk.preprocess import eval_transform


@pytest.fixture
def image(image_factory):
    with Image.open(image_factory("a.png", size=40)) as im:
        return im.convert("RGB")


@pytest.mark.parametrize("option", ["default", "none"])
def test_shipped_options_give_normalised_chw_tensors(tiny_trunk, image, option):
    cfg = OmegaConf.load(f"conf/augment/{option}.yaml")
    tf = build_train_transform(tiny_trunk.data_config, cfg.ops, seed=0)
    x = tf(image)
    assert x.dtype == torch.float32
    assert tuple(x.shape) == tuple(tiny_trunk.data_config["input_size"])  # 40px in, 32px out


def test_no_ops_matches_the_trunks_eval_preprocessing(tiny_trunk, image_factory):
    # At the input size no resizing happens, so training and evaluation see the same tensor.
    with Image.open(image_factory("b.png", size=32)) as im:
        image = im.convert("RGB")
    x = build_train_transform(tiny_trunk.data_config, None)(image)
    torch.testing.assert_close(x, eval_transform(tiny_trunk.data_config)(image), atol=1e-5, rtol=0)


def test_seeded_augmentation_is_reproducible(tiny_trunk, image):
    ops = [{"_target_": "albumentations.Affine", "translate_percent": [-0.2, 0.2], "p": 1.0}]
    a = build_train_transform(tiny_trunk.data_config, ops, seed=1)
    b = build_train_transform(tiny_trunk.data_config, ops, seed=1)
    xs = [a(image) for _ in range(3)]
    ys = [b(image) for _ in range(3)]
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y)
    assert not torch.equal(xs[0], xs[1])  # the stream moves on between calls


def test_flip_op_is_applied(tiny_trunk, image):
    flipped = build_train_transform(tiny_trunk.data_config, [{"_target_": "albumentations.HorizontalFlip", "p": 1.0}])
    plain = build_train_transform(tiny_trunk.data_config, [])
    torch.testing.assert_close(flipped(image), plain(image).flip(-1), atol=1e-5, rtol=0)


def test_refuses_targets_outside_albumentations(tiny_trunk):
    ops = [{"_target_": "albumentations.HorizontalFlip"}, {"_target_": "os.system", "command": "true"}]
    with pytest.raises(ValueError, match=r"field 'augment\[1\]\._target_': 'os\.system' is not allowed"):
        build_train_transform(tiny_trunk.data_config, ops)


def test_refuses_nested_targets_outside_albumentations(tiny_trunk):
    ops = [{"_target_": "albumentations.OneOf", "transforms": [
        {"_target_": "albumentations.HorizontalFlip"}, {"_target_": "builtins.eval"}]}]
    with pytest.raises(ValueError, match=r"augment\[0\]\.transforms\[1\]\._target_"):
        build_train_transform(tiny_trunk.data_config, ops)


def test_nested_albumentations_ops_work(tiny_trunk, image):
    flips = [{"_target_": "albumentations.HorizontalFlip", "p": 1.0},
             {"_target_": "albumentations.VerticalFlip", "p": 1.0}]
    ops = OmegaConf.create([{"_target_": "albumentations.OneOf", "p": 1.0, "transforms": flips}])
    assert build_train_transform(tiny_trunk.data_config, ops, seed=0)(image).shape == (3, 32, 32)


@pytest.mark.parametrize("ops, message", [
    ([{"p": 0.5}], r"field 'augment\[0\]': expected a mapping with a _target_"),
    ({"_target_": "albumentations.HorizontalFlip"}, r"field 'augment': expected a list of ops, got dict"),
    ([{"_target_": "albumentations.NoSuchTransform"}],
     r"field 'augment\[0\]': cannot build albumentations\.NoSuchTransform"),
    ([{"_target_": "albumentations.HorizontalFlip", "p": "often"}], r"field 'augment\[0\]': cannot build"),
    ([{"_target_": "albumentations.core.serialization.Serializable"}], r"augment\[0\]"),
])
def test_bad_ops_name_the_field(tiny_trunk, ops, message):
    with pytest.raises(ValueError, match=message):
        build_train_transform(tiny_trunk.data_config, ops)
