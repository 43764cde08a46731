import sys

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from trunk.augment import build_ops, build_train_transform, check_ops
from trunk.targets import TargetError
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
    with pytest.raises(ValueError, match=r"field 'augment\[1\]\._target_': 'os\.system' is not an allowed class"):
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
     r"field 'augment\[0\]\._target_': 'albumentations\.NoSuchTransform' is not an allowed class: albumentations has "
     r"no 'NoSuchTransform'"),
    ([{"_target_": "albumentations.HorizontalFlip", "p": "often"}], r"field 'augment\[0\]': cannot build"),
    ([{"_target_": "albumentations.core.serialization.Serializable"}], r"augment\[0\]\._target_'.* not an allowed"),
])
def test_bad_ops_name_the_field(tiny_trunk, ops, message):
    with pytest.raises(ValueError, match=message):
        build_train_transform(tiny_trunk.data_config, ops)


# -- a config must not run code: targets are resolved and checked before anything is called ----
@pytest.mark.parametrize("target, why", [
    ("albumentations.os.makedirs", "albumentations.os is the module 'os', not part of albumentations"),
    ("albumentations.core.utils.np.save", "albumentations.core.utils.np is the module 'numpy'"),
    ("albumentations.augmentations.utils.cv2.imwrite", "albumentations.augmentations.utils.cv2 is the module 'cv2'"),
    ("albumentations.core.serialization.Path.mkdir", "serialization.Path is not a module of albumentations"),
])
def test_stdlib_reached_through_albumentations_is_refused_and_never_called(tmp_path, target, why):
    victim = tmp_path / "created-by-config"
    ops = [{"_target_": target, "name": str(victim)}]
    with pytest.raises(TargetError, match=rf"field 'augment\[0\]\._target_': '{target}' is not an allowed class"):
        build_ops(ops)
    with pytest.raises(TargetError, match=why):
        check_ops(ops)
    assert not victim.exists()


def test_dangerous_target_nested_in_one_of_is_refused_before_any_constructor_runs(tmp_path, monkeypatch):
    import albumentations as A

    built = []
    real_init = A.HorizontalFlip.__init__
    monkeypatch.setattr(A.HorizontalFlip, "__init__", lambda self, *a, **k: (built.append(1), real_init(self, *a, **k)))
    victim = tmp_path / "nested"
    ops = [{"_target_": "albumentations.HorizontalFlip"},
           {"_target_": "albumentations.OneOf", "transforms": [
               {"_target_": "albumentations.VerticalFlip"},
               {"_target_": "albumentations.Compose", "transforms": [
                   {"_target_": "albumentations.os.makedirs", "name": str(victim)}]}]}]
    with pytest.raises(TargetError, match=r"field 'augment\[1\]\.transforms\[1\]\.transforms\[0\]\._target_': "
                                          r"'albumentations\.os\.makedirs' is not an allowed class"):
        build_ops(ops)
    assert not victim.exists()
    assert built == []  # the harmless op before it was not built either: nothing runs until all pass


@pytest.mark.parametrize("target", [
    "albumentations.os.write", "albumentations.os.open", "albumentations.os.symlink",
    "albumentations.from_dict",            # a function of albumentations, not a class
    "albumentations.core",                 # a module
    "albumentations.core.serialization.Serializable",  # a class, but not a transform
    "albumentations.Lambda",               # a transform that calls what it is given
    "albumentations.HistogramMatching",    # a transform that reads files a config names
    "albumentations.__builtins__", "albumentations.core.__loader__",
    "albumentations..HorizontalFlip", "albumentations", "numpy.random.seed", 42, None,
])
def test_only_public_albumentations_transform_classes_are_allowed(target):
    with pytest.raises(TargetError, match=r"field 'augment\[0\]\._target_': .* not an allowed class"):
        check_ops([{"_target_": target}])


def test_resolution_imports_nothing():
    # A target naming a module albumentations never imported must not get imported.
    assert "albumentations.this_is_not_there" not in sys.modules
    assert "antigravity" not in sys.modules
    for target in ("albumentations.this_is_not_there.X", "antigravity.fly", "albumentations.antigravity.fly"):
        with pytest.raises(TargetError):
            check_ops([{"_target_": target}])
    assert "antigravity" not in sys.modules


@pytest.mark.parametrize("op, field", [
    ({"_target_": "albumentations.HorizontalFlip", "_args_": [1.0]}, "augment[0]._args_"),
    ({"_target_": "albumentations.HorizontalFlip", "_partial_": True}, "augment[0]._partial_"),
    ({"_target_": "albumentations.HorizontalFlip", "_recursive_": False}, "augment[0]._recursive_"),
    ({"_target_": "albumentations.HorizontalFlip", "_convert_": "all"}, "augment[0]._convert_"),
    ({"_target_": "albumentations.OneOf", "transforms": [{"_target_": "albumentations.HorizontalFlip", "_x": 1}]},
     "augment[0].transforms[0]._x"),
])
def test_private_hydra_keys_are_refused(op, field):
    with pytest.raises(TargetError, match=rf"field '{field.replace('[', '[[]').replace('.', '[.]')}': '_"):
        check_ops([op])


def test_fully_qualified_names_of_public_transforms_are_allowed():
    ops = [{"_target_": "albumentations.augmentations.geometric.flip.HorizontalFlip", "p": 1.0}]
    (flip,) = build_ops(ops)
    import albumentations as A

    assert type(flip) is A.HorizontalFlip and flip.p == 1.0
