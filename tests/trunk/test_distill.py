"""Feature distillation of test_resnet into a narrower test_resnet on generated images."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.conftest import SMALL
from heads.modules import LinearHead
from trunk.distill import DistillResult, FrozenHead, _map_loss, distill_trunk, head_kl
from trunk.model import Trunk, TrunkError, state_dict_digest

STUDENT_KWARGS = {"channels": [16, 24, 24, 48], "stem_width": 8}
FLIP = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}]


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Gradients with one coloured rectangle or ellipse each: varied, but with structure to learn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0.0, 1.0, 40)[:, None, None]
    paths = []
    for i in range(n):
        c0, c1 = rng.integers(0, 256, (2, 3))
        grad = ramp * (c1 - c0) + c0
        arr = (grad if i % 3 else grad.transpose(1, 0, 2)) * np.ones((40, 40, 1))
        image = Image.fromarray(arr.astype(np.uint8))
        x0, y0 = (int(v) for v in rng.integers(0, 20, 2))
        box = [x0, y0, x0 + int(rng.integers(8, 20)), y0 + int(rng.integers(8, 20))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw = ImageDraw.Draw(image)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=fill)
        path = folder / f"img_{i:02d}.png"
        image.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny trunks on a shared 2-core CPU: intra-op threads cost far more in sync than they save
    (measured under load: 48 images x 3 epochs take 0.3 s on one thread, 3-9 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("distill"), 48)


@pytest.fixture(scope="module")
def teacher():
    return Trunk("test_resnet", data_config=SMALL)


@pytest.fixture(scope="module")
def student(teacher):
    return Trunk("test_resnet", data_config=teacher.data_config, model_kwargs=STUDENT_KWARGS)


@pytest.fixture(scope="module")
def distilled(teacher, student, images):
    before = {"teacher": (teacher.trunk_id, state_dict_digest(teacher.state_dict()), teacher.training),
              "student": (student.trunk_id, state_dict_digest(student.state_dict()), student.training)}
    result = distill_trunk(teacher, student, images, epochs=3, batch_size=8, progress=False)
    return result, before


def test_distillation_lowers_the_loss_and_raises_the_cosine(distilled):
    result, _ = distilled
    assert isinstance(result, DistillResult)
    first, last = result.history[0], result.history[-1]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert last["loss"] < 0.8 * first["loss"]
    assert last["cosine_pooled"] > first["cosine_pooled"] + 0.1
    # Layer-normed MSE and cosine of the same centred vectors are tied: mse ~ 2 (1 - cos).
    assert last["loss_pooled"] == pytest.approx(2 * (1 - last["cosine_pooled"]), abs=0.05)
    assert -1.0 <= result.metrics["cosine_pooled"] <= 1.0
    assert result.metrics["distill_loss"] == pytest.approx(last["loss"])
    assert result.metrics["distill_loss"] == pytest.approx(result.metrics["distill_loss_pooled"])
    assert result.metrics["n_images"] == 48 and result.metrics["skipped_images"] == 0 and result.skipped == []
    assert result.metrics["distill_seconds"] > 0
    assert set(result.metrics) == {"distill_loss", "distill_loss_pooled", "cosine_pooled", "n_images",
                                   "skipped_images", "distill_seconds"}
    assert last["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule ran to its end


def test_returns_a_new_student_and_leaves_both_inputs_alone(distilled, teacher, student):
    result, before = distilled
    new = result.trunk
    assert new is not student and new.trunk_id not in (student.trunk_id, teacher.trunk_id)
    assert new.data_config == teacher.data_config
    assert new.model_name == student.model_name and new.model_kwargs == STUDENT_KWARGS
    assert new.tap("pooled").channels == 48 and not new.training
    assert (student.trunk_id, state_dict_digest(student.state_dict()), student.training) == before["student"]
    assert (teacher.trunk_id, state_dict_digest(teacher.state_dict()), teacher.training) == before["teacher"]


def test_a_tap_is_distilled_too(teacher, student, images):
    result = distill_trunk(teacher, student, images[:32], taps=["layer2"], epochs=2, batch_size=8, progress=False)
    m = result.metrics
    assert {"distill_loss_pooled", "distill_loss_layer2"} <= set(m)
    assert math.isfinite(m["distill_loss_layer2"]) and m["distill_loss_layer2"] > 0
    # One tap: the total is the pooled loss plus that tap's loss.
    assert m["distill_loss"] == pytest.approx(m["distill_loss_pooled"] + m["distill_loss_layer2"], rel=1e-5)
    assert result.history[-1]["loss_layer2"] < result.history[0]["loss_layer2"]


def test_map_loss_ignores_scale_and_offset_and_resizes_to_the_teacher():
    torch.manual_seed(0)
    target = torch.randn(2, 6, 4, 4)
    assert float(_map_loss(3 * target + 1, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(_map_loss(torch.randn(2, 6, 4, 4), target)) > 0.5
    # A student map at half the teacher's resolution is upsampled, not refused.
    coarse = torch.randn(2, 6, 2, 2)
    assert math.isfinite(float(_map_loss(coarse, target)))


def test_unknown_tap_names_the_valid_ones(teacher, student, images):
    with pytest.raises(TrunkError, match=r"no tap 'layer9'; valid taps: act1, layer1, layer2, layer3, layer4$"):
        distill_trunk(teacher, student, images, taps=["layer9"], progress=False)
    with pytest.raises(ValueError, match="'pooled' is always distilled"):
        distill_trunk(teacher, student, images, taps=["pooled"], progress=False)


def test_token_taps_are_refused():
    vit = Trunk("test_vit", data_config=SMALL)
    with pytest.raises(ValueError, match="token taps .* only map taps"):
        distill_trunk(vit, vit, ["unused.png"], taps=[next(iter(vit.taps))], progress=False)


def test_mismatched_data_config_is_refused(teacher, images):
    other = Trunk("test_resnet", data_config={**SMALL, "input_size": [3, 40, 40]}, model_kwargs=STUDENT_KWARGS)
    with pytest.raises(ValueError, match=r"^field 'data_config': the student's .* differs from the teacher's"):
        distill_trunk(teacher, other, images, progress=False)


def test_an_undecodable_image_is_skipped_and_counted(teacher, student, images, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping image .*empty.png"):
        result = distill_trunk(teacher, student, [*images[:15], str(empty)], epochs=1, batch_size=8,
                               progress=False)
    assert result.metrics["n_images"] == 15 and result.metrics["skipped_images"] == 1
    assert len(result.skipped) == 1 and "empty file" in result.skipped[0]
    assert result.paths == [str(p) for p in images[:15]]  # what the student saw, for its trained_on record
    with pytest.raises(ValueError, match="none of the 1 distillation images could be decoded"):
        with pytest.warns(UserWarning):
            distill_trunk(teacher, student, [str(empty)], progress=False)


def test_same_seed_same_student_and_global_rng_left_as_found(teacher, student, images):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = distill_trunk(teacher, student, images[:16], epochs=1, batch_size=8, augment_ops=FLIP, seed=3, progress=False)
    torch.testing.assert_close(torch.rand(3), expected)
    b = distill_trunk(teacher, student, images[:16], epochs=1, batch_size=8, augment_ops=FLIP, seed=3, progress=False)
    c = distill_trunk(teacher, student, images[:16], epochs=1, batch_size=8, augment_ops=FLIP, seed=4, progress=False)
    assert a.trunk.trunk_id == b.trunk.trunk_id != c.trunk.trunk_id
    assert a.metrics["distill_loss"] == b.metrics["distill_loss"]


# --- head-aware distillation: the student learns the frozen heads' softened outputs ---------------------------


def peaked_head(teacher: Trunk, images: list[str], classes: int = 4, seed: int = 0) -> LinearHead:
    """A linear head on the teacher's pooled features whose outputs are confident and vary across images.

    Random init gives nearly uniform outputs, which any student matches; scaling the logits to a
    spread of about 4 makes the target distributions sharp, so a student that ignores them is far off.
    """
    from trunk.preprocess import eval_transform
    from trunk.decode import load_image

    transform = eval_transform(teacher.data_config)
    x = torch.stack([transform(load_image(p)[0]) for p in images])
    with torch.no_grad():
        feats = copy.deepcopy(teacher).eval()(x, ["pooled"])["pooled"]
        head = LinearHead(feats.shape[1], classes)
        head.fc.weight.copy_(torch.randn(classes, feats.shape[1], generator=torch.Generator().manual_seed(seed)))
        logits = head(feats)
        head.fc.weight.mul_(4.0 / logits.std())
        head.fc.bias.copy_(-head.fc.weight @ feats.mean(0))
    return head.eval()


def head_state(module: torch.nn.Module) -> tuple:
    return (state_dict_digest(module.state_dict()), module.training,
            [p.requires_grad for p in module.parameters()], {p.device for p in module.parameters()})


def test_head_kl_is_zero_for_identical_outputs_and_scales_with_t_squared():
    torch.manual_seed(0)
    logits = 3 * torch.randn(8, 5)
    assert float(head_kl(logits, logits.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    other = 3 * torch.randn(8, 5)
    assert float(head_kl(logits, other, 1.0)) > 0.1
    # T^2 * KL at T: the same as KL of the logits divided by T, times T^2.
    kl = torch.nn.functional.kl_div(torch.log_softmax(other / 4, 1), torch.softmax(logits / 4, 1), reduction="batchmean")
    assert float(head_kl(logits, other, 4.0)) == pytest.approx(16 * float(kl), rel=1e-5)


@pytest.fixture(scope="module")
def frozen_heads(teacher, images):
    from heads.branch import BranchHead, branch_kwargs

    branch = BranchHead(teacher.tap("layer2").channels, 3, **branch_kwargs(teacher, "layer2")).init_from_trunk(teacher)
    with torch.no_grad():
        branch.fc.weight.mul_(20.0)  # confident outputs here too
    return [FrozenHead("colour", peaked_head(teacher, images), "pooled"), FrozenHead("count", branch.eval(), "layer2")]


def test_the_head_loss_pulls_the_student_to_the_teacher_heads_outputs(teacher, student, images, frozen_heads):
    before = [head_state(h.module) for h in frozen_heads]
    runs = {w: distill_trunk(teacher, student, images, taps=["layer2"], heads=frozen_heads, head_loss_weight=w,
                             temperature=2.0, epochs=4, batch_size=8, progress=False) for w in (0.0, 1.0)}
    learned, reported = runs[1.0], runs[0.0]
    # The frozen heads are copies: the caller's modules keep weights, mode, grad flags and device.
    assert [head_state(h.module) for h in frozen_heads] == before
    first, last = learned.history[0], learned.history[-1]
    assert last["loss_heads"] < 0.75 * first["loss_heads"]
    # Same seed, same images; only the weight differs: learning the heads' outputs gets far closer to them.
    assert learned.metrics["distill_loss_heads"] < 0.5 * reported.metrics["distill_loss_heads"]
    for name in ("colour", "count"):
        assert {f"distill_loss_head_{name}", f"head_agreement_{name}"} <= set(learned.metrics)
        assert 0.0 <= learned.metrics[f"head_agreement_{name}"] <= 1.0
    assert learned.metrics["distill_loss_heads"] == pytest.approx(
        (learned.metrics["distill_loss_head_colour"] + learned.metrics["distill_loss_head_count"]) / 2, rel=1e-5)
    # The loss is the features' loss plus the weighted head loss.
    m = learned.metrics
    assert m["distill_loss"] == pytest.approx(m["distill_loss_pooled"] + m["distill_loss_layer2"]
                                              + m["distill_loss_heads"], rel=1e-4)


def test_weight_zero_is_the_feature_only_student(teacher, student, images, frozen_heads):
    plain = distill_trunk(teacher, student, images[:16], epochs=1, batch_size=8, progress=False)
    watched = distill_trunk(teacher, student, images[:16], heads=frozen_heads[:1], head_loss_weight=0.0, epochs=1,
                            batch_size=8, progress=False)
    assert watched.trunk.trunk_id == plain.trunk.trunk_id  # heads reported, not learned
    assert "distill_loss_heads" in watched.metrics and "distill_loss_heads" not in plain.metrics


def test_bad_head_settings_are_one_line(teacher, student, images, frozen_heads):
    with pytest.raises(ValueError, match=r"^field 'heads': head 'count' reads tap 'layer2', which is not distilled "
                                         r"\(taps: pooled\); add it to taps or leave the head out$"):
        distill_trunk(teacher, student, images, heads=frozen_heads, head_loss_weight=1.0, progress=False)
    with pytest.raises(ValueError, match=r"^field 'temperature': must be a finite number > 0, got 0"):
        distill_trunk(teacher, student, images, heads=frozen_heads[:1], temperature=0, progress=False)
    with pytest.raises(ValueError, match=r"^field 'head_loss_weight': must be a finite number >= 0, got -1"):
        distill_trunk(teacher, student, images, heads=frozen_heads[:1], head_loss_weight=-1, progress=False)
    with pytest.raises(ValueError, match="given twice"):
        distill_trunk(teacher, student, images, heads=[frozen_heads[0]] * 2, progress=False)
