"""registry.jobs.train_trunk and the multitask refresh candidate: no leaked validation, trunk validation
figures, and a refresh that keeps the production trunk's recipe. Real SQLite store, tiny trunk, generated images.

Two heads label the same 24 images with independent splits (as teams do), so each head's
training split holds the other's validation images: the trunk must train on neither.
"""

from __future__ import annotations

import csv
import shutil

import pytest
import yaml

from heads.spec import load_head_spec
from registry.jobs.refresh import multitask_candidate
from registry.jobs.train import train_head_job
from registry.jobs.train_trunk import train_trunk_job
from registry.store.trunks import trunk_recipe, trunk_trained_on, trunk_version_tags
from registry.store.workspace import Workspace
from tests.conftest import SMALL, write_image
from trunk.model import Trunk
from trunk.seen import content_sha

TRAIN = {"batch_size": 8, "lr": 1e-3, "weight_decay": 0.0, "seed": 0, "device": "cpu", "num_workers": 0,
         "progress": False}
# A team's augmentation without flips (the platform default flips, which is wrong for digits).
NO_FLIPS = [{"_target_": "albumentations.RandomBrightnessContrast", "brightness_limit": 0.1, "contrast_limit": 0.1,
             "p": 0.5}]
DEFAULT_FLIPS = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5},
                 {"_target_": "albumentations.VerticalFlip", "p": 0.5}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 images (red/blue x dark/light); heads `hue` and `bright` with different val splits; a golden set."""
    root = tmp_path_factory.mktemp("overlap")
    rows = []
    for i in range(24):
        hue, bright = ("red", "blue")[i % 2], ("dark", "light")[(i // 2) % 2]
        level = 90 if bright == "dark" else 230
        color = (level, 20, 20) if hue == "red" else (20, 20, level)
        write_image(root / f"img{i:02d}.png", color, size=32, seed=i)
        rows.append((f"img{i:02d}.png", hue, bright, i))
    # The same bytes as hue's val image img00 under another name, in bright's training split only.
    shutil.copy(root / "img00.png", root / "copy_of_00.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # hue trains on it: skipped
    hue_val = {r[0] for r in rows if r[3] % 6 == 0 or r[3] % 6 == 1}
    bright_val = {r[0] for r in rows if r[3] % 6 == 2 or r[3] % 6 == 5}
    golden = ["img03.png", "img04.png"]  # in both heads' training splits
    with (root / "hue.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([name, hue, "val" if name in hue_val else "train"] for name, hue, _, _ in rows)
        w.writerow(["broken.png", "red", "train"])
    with (root / "bright.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([name, bright, "val" if name in bright_val else "train"] for name, _, bright, _ in rows)
        w.writerow(["copy_of_00.png", "dark", "train"])
    with (root / "golden.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *([g, dict((r[0], r[1]) for r in rows)[g]] for g in golden)])
    sha = {p.name: content_sha(p) for p in root.glob("*.png")}
    return {"root": root, "sha": sha, "hue_val": hue_val, "bright_val": bright_val, "golden": set(golden),
            "all": {r[0] for r in rows}}


def specs(tmp_path, data):
    out = []
    for name in ("bright", "hue"):
        gate = {"min_val_accuracy": 0.0, **({"golden": str(data["root"] / "golden.csv")} if name == "hue" else {})}
        path = tmp_path / "heads" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump({
            "name": name, "owner": "tests", "data": {"manifest": str(data["root"] / f"{name}.csv")},
            "module": {"_target_": "heads.modules.LinearHead"}, "train": {"epochs": 3}, "gate": gate}))
        out.append(load_head_spec(path))
    return out


def test_trunk_trains_on_no_heads_val_or_golden_image_and_records_what_it_trained_on(client, workspace, data,
                                                                                     tmp_path):
    job = train_trunk_job(client, Trunk("test_resnet", data_config=SMALL), specs(tmp_path, data),
                          workspace=Workspace.at(workspace), epochs=2, augment_ops=None, **TRAIN)
    sha = data["sha"]
    evaluation = data["hue_val"] | data["bright_val"] | data["golden"]
    expected = {sha[n] for n in data["all"] - evaluation}  # copy_of_00 is img00's bytes: an eval image too
    seen = trunk_trained_on(client, job.version)
    assert seen is not None and len(seen) == len(expected) == 6
    assert all(s in seen for s in expected)
    assert not any(sha[n] in seen for n in evaluation | {"copy_of_00.png", "broken.png"})
    # hue's training split holds bright's 8 val images and the 2 golden ones; bright's holds hue's 8 val
    # images, the golden ones and the copy of img00: 18 distinct images by content, every eval image
    assert job.metrics["excluded_eval_images"] == 18 == job.metrics["eval_images"]
    assert job.metrics["excluded_eval_images_hue"] == 10 and job.metrics["excluded_eval_images_bright"] == 11
    assert job.metrics["n_images"] == 6 and job.metrics["skipped_images"] == 1  # broken.png
    tags = trunk_version_tags(client, job.version)
    assert tags["trained_on_images"] == "6" and tags["trained_on_digest"] == seen.digest

    # validation per task, every epoch, on the head's own (unseen) val split; curves in MLflow by epoch
    assert [sorted(k for k in row if k.startswith("val_")) for row in job.history] == \
        [["val_accuracy_bright", "val_accuracy_hue"]] * 2
    assert job.metrics["val_images_hue"] == 8 and job.metrics["val_images_bright"] == 8
    run_id = client.get_model_version("trunk", str(job.version)).run_id
    for name in ("hue", "bright"):
        curve = client.get_metric_history(run_id, f"val_accuracy_{name}")
        assert sorted((m.step, m.value) for m in curve) == [(r["epoch"], r[f"val_accuracy_{name}"])
                                                             for r in job.history]
        assert client.get_run(run_id).data.metrics[f"val_accuracy_{name}"] == job.metrics[f"val_accuracy_{name}"]

    recipe = trunk_recipe(client, job.version)
    assert recipe == job.recipe and recipe["tasks"] == ["bright", "hue"] and recipe["augment"] == []
    assert (recipe["model_name"], recipe["epochs"], recipe["batch_size"], recipe["seed"]) == ("test_resnet", 2, 8, 0)
    assert recipe["data_config"]["input_size"] == [3, 32, 32]

    # a changed golden set changes what the trunk may train on, so the recipe is not reused
    spec_list = specs(tmp_path, data)
    (data["root"] / "golden2.csv").write_text("path,label\nimg07.png,blue\n")
    spec_list[1].gate["golden"] = str(data["root"] / "golden2.csv")
    again = train_trunk_job(client, Trunk("test_resnet", data_config=SMALL), spec_list,
                            workspace=Workspace.at(workspace), epochs=2, augment_ops=None, **TRAIN)
    assert not again.status.startswith("reused") and again.version != job.version


def test_refresh_keeps_production_recipe_unless_overridden_and_says_what_changed(client, workspace, data,
                                                                                 tmp_path):
    ws = Workspace.at(workspace)
    heads = specs(tmp_path, data)
    production = train_trunk_job(client, Trunk("test_resnet", data_config=SMALL), heads, workspace=ws, epochs=1,
                                 augment_ops=NO_FLIPS, **TRAIN)
    assert production.status == "production"
    for spec in heads:
        assert train_head_job(client, spec, workspace=ws, batch_size=32, num_workers=0, device="cpu",
                              progress=False).release is not None
    # What tools.refresh passes with no override: the config's defaults (5 epochs, flips), nothing overridden.
    config = dict(TRAIN, epochs=5, augment_ops=DEFAULT_FLIPS)
    kept = multitask_candidate(client, ws, base=None, overridden=(), **config)
    assert kept.recipe["augment"] == NO_FLIPS and kept.recipe["epochs"] == 1
    assert trunk_recipe(client, kept.version)["augment"] == NO_FLIPS
    assert kept.notes == [f"same recipe as production trunk v{production.version}"]
    assert trunk_version_tags(client, kept.version)["recipe_diff"] == "same recipe"
    seen = trunk_trained_on(client, kept.version)
    assert not any(data["sha"][n] in seen for n in data["hue_val"] | data["bright_val"] | data["golden"])

    # multitask.epochs=2 on the command line: only that field changes, and the difference says so
    longer = multitask_candidate(client, ws, base=None, overridden={"epochs"}, **dict(config, epochs=2))
    assert longer.recipe["augment"] == NO_FLIPS and longer.recipe["epochs"] == 2
    assert longer.notes == [f"recipe vs production trunk v{production.version}: epochs: 1 -> 2"]
    assert trunk_version_tags(client, longer.version)["recipe_diff"] == "epochs: 1 -> 2"
    # augment=default on the command line: the flips, and only that line
    flips = multitask_candidate(client, ws, base=None, overridden={"augment"}, **config)
    assert flips.recipe["augment"] == DEFAULT_FLIPS and flips.recipe["epochs"] == 1
    assert flips.notes == [f"recipe vs production trunk v{production.version}: augment: "
                           '[{"_target_": "albumentations.RandomBrightnessContrast", "brightness_limit": 0.1, '
                           '"contrast_limit": 0.1, "p": 0.5}] -> [{"_target_": "albumentations.HorizontalFlip", '
                           '"p": 0.5}, {"_target_": "albumentations.VerticalFlip", "p": 0.5}]']


def test_command_line_overrides_name_the_fields_they_set():
    from tools.candidates import overridden_fields

    assert overridden_fields(["candidate=multitask", "multitask.epochs=3", "workspace=/w"], "multitask") == {"epochs"}
    assert overridden_fields(["augment=none", "multitask.lr=0.1", "distill.epochs=2"], "multitask") == \
        {"augment", "lr"}
    assert overridden_fields(["augment.ops=[]"], "multitask") == {"augment"}
    assert overridden_fields(["progress=false"], "multitask") == set()


def test_a_trunk_trained_from_a_registered_base_inherits_what_the_base_saw(client, data):
    from registry.jobs.train_trunk import inherited_seen
    from registry.store.trunks import register_trunk
    from trunk.seen import SeenImages

    base = Trunk("test_resnet", data_config=SMALL)
    assert len(inherited_seen(client, base)) == 0  # not registered: nothing known
    record = SeenImages(data["sha"][n] for n in sorted(data["hue_val"]))
    register_trunk(client, base, trained_on=record)
    assert inherited_seen(client, base).digest == record.digest
