import csv
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL
from trunk.model import Trunk, state_dict_digest
from demo.shapes import ATTRIBUTES, generate_shapes
from trunk.train import Task, TrunkTrainResult, train_trunk

FLIP = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_images=16, n_holdout=0, size=32, seed=0)


def task(ds, attr, keep=None):
    rows = list(csv.DictReader(ds.manifests[attr].open()))
    if keep is not None:
        rows = rows[:keep]
    return Task(attr, ATTRIBUTES[attr], [str(ds.manifests[attr].parent / r["path"]) for r in rows],
                [ATTRIBUTES[attr].index(r["label"]) for r in rows])


@pytest.fixture
def start():
    return Trunk("test_resnet", data_config=SMALL)


def test_returns_a_new_trained_trunk_and_leaves_the_input_alone(shapes, start):
    before_id, before_digest = start.trunk_id, state_dict_digest(start.model.state_dict())
    result = train_trunk(start, [task(shapes, "shape"), task(shapes, "colour")], epochs=1, batch_size=8,
                         augment_ops=FLIP, progress=False)
    assert isinstance(result, TrunkTrainResult)
    assert result.trunk is not start
    assert result.trunk.trunk_id != before_id
    assert start.trunk_id == before_id
    assert state_dict_digest(start.model.state_dict()) == before_digest
    assert not start.training and not result.trunk.training
    assert result.trunk.model_name == start.model_name
    assert result.trunk.data_config == start.data_config
    assert len(result.history) == 1
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["train_loss"] > 0
    for name in ("shape", "colour"):
        assert 0.0 <= result.metrics[f"train_accuracy_{name}"] <= 1.0
        assert math.isfinite(result.metrics[f"train_loss_{name}"])
    assert result.metrics["n_images"] == 16 and result.metrics["skipped_images"] == 0


def test_trained_trunk_saves_and_loads_with_its_id(shapes, start, tmp_path):
    result = train_trunk(start, [task(shapes, "texture")], epochs=1, batch_size=8, progress=False)
    assert Trunk.load(result.trunk.save(tmp_path / "t")).trunk_id == result.trunk.trunk_id


def test_same_seed_same_trunk(shapes, start):
    tasks = [task(shapes, "shape")]
    a = train_trunk(start, tasks, epochs=1, batch_size=8, augment_ops=FLIP, seed=3, progress=False)
    b = train_trunk(start, tasks, epochs=1, batch_size=8, augment_ops=FLIP, seed=3, progress=False)
    c = train_trunk(start, tasks, epochs=1, batch_size=8, augment_ops=FLIP, seed=4, progress=False)
    assert a.trunk.trunk_id == b.trunk.trunk_id != c.trunk.trunk_id


def test_global_rng_is_left_as_found(shapes, start):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_trunk(start, [task(shapes, "shape")], epochs=1, batch_size=8, progress=False)
    torch.testing.assert_close(torch.rand(3), expected)


def test_images_without_a_label_for_a_task_are_ignored_by_it(shapes, start):
    # 'count' labels only 2 of the 16 images: with batches of 4, most batches have no count
    # label at all, which must neither give NaN nor count towards count's accuracy.
    result = train_trunk(start, [task(shapes, "shape"), task(shapes, "count", keep=2)],
                         epochs=2, batch_size=4, lr=1e-2, progress=False)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert all(math.isfinite(float(v.float().sum())) for v in result.trunk.model.state_dict().values())
    for h in result.history:
        assert h["accuracy_count"] * 2 in (0.0, 1.0, 2.0)  # out of exactly 2 labelled images
    assert result.metrics["n_images"] == 16


def test_a_bad_image_is_skipped_and_counted(shapes, start, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = str(tmp_path / "missing.png")
    t = task(shapes, "shape")
    t.paths += [str(bad), missing]
    t.labels += [0, 1]
    with pytest.warns(UserWarning) as caught:
        result = train_trunk(start, [t], epochs=1, batch_size=8, progress=False)
    messages = [str(w.message) for w in caught]
    assert any("broken.png" in m for m in messages) and any("missing.png: file not found" in m for m in messages)
    assert result.metrics["skipped_images"] == 2
    assert result.metrics["n_images"] == 16
    assert any("broken.png" in s for s in result.skipped) and any("file not found" in s for s in result.skipped)


def test_same_image_spelled_two_ways_is_one_image(shapes, start):
    t1, t2 = task(shapes, "shape"), task(shapes, "colour")
    t2.paths = [str(Path(p).resolve()) for p in t2.paths]
    t2.name = "colour.v2"  # task names need not be Python identifiers
    result = train_trunk(start, [t1, t2], epochs=1, batch_size=8, progress=False)
    assert result.metrics["n_images"] == 16
    assert "train_accuracy_colour.v2" in result.metrics


@pytest.mark.parametrize("change, message", [
    (lambda t: setattr(t, "labels", [9] * len(t.labels)), r"task 'shape': field 'labels' has 9, outside 0\.\.3"),
    (lambda t: setattr(t, "classes", ["only"]), r"task 'shape': field 'classes' needs at least 2"),
    (lambda t: setattr(t, "labels", t.labels[:-1]), r"task 'shape': 16 paths but 15 labels"),
])
def test_bad_tasks_are_clear_errors(shapes, start, change, message):
    t = task(shapes, "shape")
    change(t)
    with pytest.raises(ValueError, match=message):
        train_trunk(start, [t], epochs=1, progress=False)


def test_bad_augment_op_names_the_field(shapes, start):
    with pytest.raises(ValueError, match=r"augment\[0\]\._target_"):
        train_trunk(start, [task(shapes, "shape")], epochs=1, augment_ops=[{"_target_": "torch.load"}], progress=False)


def test_worker_processes_give_the_same_trunk_run_to_run(shapes, start):
    tasks = [task(shapes, "shape")]
    a = train_trunk(start, tasks, epochs=1, batch_size=8, augment_ops=FLIP, num_workers=2, progress=False)
    b = train_trunk(start, tasks, epochs=1, batch_size=8, augment_ops=FLIP, num_workers=2, progress=False)
    assert a.trunk.trunk_id == b.trunk.trunk_id != start.trunk_id


def test_a_bad_device_name_is_one_line_before_any_image_is_read(shapes, start, tmp_path):
    # One resolver (trunk.device): before, torch.device("gpu0") raised a RuntimeError listing
    # every device type, and only after every image had been decoded.
    t = task(shapes, "shape")
    t.paths[0] = str(tmp_path / "never-read.png")  # not there: the device check comes first
    with pytest.raises(ValueError, match="^device 'gpu0' is not one of: auto, cpu, cuda, cuda:N$"):
        train_trunk(start, [t], epochs=1, device="gpu0", progress=False)
    result = train_trunk(start, [task(shapes, "shape")], epochs=1, batch_size=8, device=torch.device("cpu"),
                         progress=False)
    assert [row["epoch"] for row in result.history] == [1]


def test_val_images_are_scored_every_epoch_and_never_change_training(shapes, start):
    # 12 images train, the other 4 validate: a validation figure per task per epoch, with
    # the eval transform, no gradients, and not a single random draw taken from training.
    t = task(shapes, "shape")
    plain = Task(t.name, t.classes, t.paths[:12], t.labels[:12])
    checked = Task(t.name, t.classes, t.paths[:12], t.labels[:12], val_paths=t.paths[12:], val_labels=t.labels[12:])
    other = task(shapes, "colour", keep=12)  # no val images: no val figure for it, as before
    a = train_trunk(start, [checked, other], epochs=2, batch_size=4, augment_ops=FLIP, progress=False)
    b = train_trunk(start, [checked, other], epochs=2, batch_size=4, augment_ops=FLIP, progress=False)
    c = train_trunk(start, [plain, other], epochs=2, batch_size=4, augment_ops=FLIP, progress=False)
    assert a.trunk.trunk_id == b.trunk.trunk_id == c.trunk.trunk_id
    assert [sorted(k for k in row if k.startswith("val_")) for row in a.history] == [["val_accuracy_shape"]] * 2
    assert [row["val_accuracy_shape"] for row in a.history] == [row["val_accuracy_shape"] for row in b.history]
    assert all(row["val_accuracy_shape"] * 4 in (0, 1, 2, 3, 4) for row in a.history)  # out of exactly 4
    assert a.metrics["val_accuracy_shape"] == a.history[-1]["val_accuracy_shape"] and a.metrics["val_images_shape"] == 4
    assert "val_accuracy_colour" not in a.metrics and not any(k.startswith("val_") for k in c.metrics)
    assert sorted(a.paths) == sorted(set(t.paths[:12]) | set(other.paths))  # what it trained on, val excluded
