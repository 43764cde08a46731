"""registry.jobs.train and .classify: the jobs behind the tools, on a real SQLite store, tiny trunk, generated shapes."""

from __future__ import annotations

import math

import pytest
import yaml

from heads.spec import load_head_spec
from registry.jobs.train import JobError, resolve_trunk, train_head_job
from registry.jobs.train_trunk import adopt_trunk, train_trunk_job
from registry.store.releases import get_release
from registry.store.trunks import register_trunk
from registry.store.workspace import Workspace
from tests.conftest import SMALL
from trunk.model import Trunk
from demo.shapes import generate_shapes

JOB = {"batch_size": 32, "num_workers": 0, "device": "cpu", "progress": False}
TRAIN = {"epochs": 1, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.0, "augment_ops": None, "seed": 0,
         "device": "cpu", "num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_images=80, n_holdout=0, size=32, seed=0)


def spec_for(tmp_path, shapes, attr: str, **gate):
    path = tmp_path / "heads" / f"{attr}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": attr, "owner": "tests", "data": {"manifest": str(shapes.manifests[attr])},
        "module": {"_target_": "heads.modules.LinearHead"}, "train": {"epochs": 5}, "gate": gate,
    }))
    return load_head_spec(path)


def test_no_production_yet_says_what_to_do(client):
    with pytest.raises(JobError, match="no production release yet: register a trunk first"):
        resolve_trunk(client, "production")
    with pytest.raises(JobError, match="'production' or a version number"):
        resolve_trunk(client, "latest")


def test_trunk_training_registers_adopts_and_reuses_the_same_recipe(client, workspace, shapes, tmp_path):
    ws = Workspace.at(workspace)
    specs = [spec_for(tmp_path, shapes, "shape")]
    base = Trunk("test_resnet", data_config=SMALL)
    first = train_trunk_job(client, base, specs, workspace=ws, **TRAIN)
    assert first.status == "production" and first.trunk.trunk_id != base.trunk_id
    assert get_release(client).trunk_version == first.version
    again = train_trunk_job(client, base, specs, workspace=ws, **TRAIN)
    assert again.version == first.version and again.status.startswith("reused")
    assert again.trunk.trunk_id == first.trunk.trunk_id


def test_head_job_promotes_then_refuses_a_head_on_another_trunk(client, workspace, shapes, tmp_path):
    ws = Workspace.at(workspace)
    v1 = register_trunk(client, Trunk("test_resnet", data_config=SMALL, seed=1))
    assert adopt_trunk(client, v1)[0] == "production"
    job = train_head_job(client, spec_for(tmp_path, shapes, "colour"), workspace=ws, **JOB)
    assert job.gate.passed and job.release is not None and job.release.heads == {"colour": job.version}
    assert job.extract_summary["new_rows"] == 80
    # its cost is measured inside the production bank: just itself here (the figure is a timing:
    # its floor-at-zero median is checked on controlled times in tests/heads/training/test_cost.py)
    assert job.result.metrics["bank_heads"] == 1 and math.isfinite(job.result.metrics["added_ms_per_image"])
    assert "added_ms_per_image_alone" in job.result.metrics
    shape = train_head_job(client, spec_for(tmp_path, shapes, "shape"), workspace=ws, **JOB)
    assert shape.result.metrics["bank_heads"] == 2  # timed beside the production colour head
    job_heads = {"colour": job.version, "shape": shape.version}

    # production now has a head on v1, so a new trunk becomes the candidate, not production
    v2 = register_trunk(client, Trunk("test_resnet", data_config=SMALL, seed=2))
    assert adopt_trunk(client, v2) == ("candidate", None)
    assert get_release(client).trunk_version == v1

    # a head trained on the candidate is registered but refused from production's release
    other = train_head_job(client, spec_for(tmp_path, shapes, "count"), workspace=ws, trunk_version=v2, **JOB)
    assert other.release is None
    assert "was trained on trunk_id" in other.refused and f"retrain it on trunk v{v1}" in other.refused
    assert get_release(client).heads == job_heads


def test_failed_gate_is_registered_but_not_released(client, workspace, shapes, tmp_path):
    ws = Workspace.at(workspace)
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL)))
    before = get_release(client)
    job = train_head_job(client, spec_for(tmp_path, shapes, "texture", min_val_accuracy=1.01), workspace=ws, **JOB)
    assert not job.gate.passed and job.release is None and job.version == 1
    assert "[FAIL] val_accuracy" in job.gate.format()
    assert get_release(client).version == before.version


def test_branch_head_trains_releases_and_classifies(client, workspace, shapes, tmp_path):
    import pyarrow.parquet as pq

    from registry.jobs.classify import classify_job

    ws = Workspace.at(workspace)
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL)))
    pooled = train_head_job(client, spec_for(tmp_path, shapes, "colour"), workspace=ws, **JOB)
    path = tmp_path / "heads" / "count.yaml"
    path.write_text(yaml.safe_dump({
        "name": "count", "owner": "tests", "data": {"manifest": str(shapes.manifests["count"])},
        "attach": {"tap": "layer2"}, "module": {"_target_": "heads.branch.BranchHead"},
        "augment": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}], "train": {"epochs": 1},
    }))
    branch = train_head_job(client, load_head_spec(path), workspace=ws, **JOB)
    m = branch.result.metrics
    assert branch.result.tap == "layer2" and branch.release is not None
    assert m["added_gflops"] > pooled.result.metrics["added_gflops"]
    assert m["bank_heads"] == 2 and m["cache_bytes_per_image"] > pooled.result.metrics["cache_bytes_per_image"]

    success = classify_job(client, shapes.root / "images", tmp_path / "out", batch_size=16, num_workers=0,
                           device="cpu", progress=False)
    table = pq.read_table(tmp_path / "out").to_pydict()
    assert success["release"]["heads"] == {"colour": pooled.version, "count": branch.version}
    assert len(table["path"]) == 80 and all(label is not None for label in table["count_label"])


def test_classify_resolves_the_release_once_and_a_restart_keeps_it(client, workspace, shapes, tmp_path):
    import pyarrow.parquet as pq

    from heads.classify.output import SUCCESS_FILE
    from registry.jobs.classify import classify_job

    ws = Workspace.at(workspace)
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL)))
    colour = train_head_job(client, spec_for(tmp_path, shapes, "colour"), workspace=ws, **JOB)
    first = colour.release.version
    run = {"batch_size": 16, "num_workers": 0, "device": "cpu", "progress": False, "rows_per_shard": 30}
    out = tmp_path / "out"
    clean = classify_job(client, shapes.root / "images", out, **run)
    assert clean["release"]["version"] == first and clean["counts"]["shards"] == 3
    # As if killed before its last shard, and production moved on meanwhile.
    (out / "part-00002.parquet").unlink()
    (out / SUCCESS_FILE).unlink()
    shape = train_head_job(client, spec_for(tmp_path, shapes, "shape"), workspace=ws, **JOB)
    assert get_release(client).version == shape.release.version != first

    resumed = classify_job(client, shapes.root / "images", out, **run)
    assert resumed["release"]["version"] == first and resumed["shards_written"] == 1
    table = pq.read_table(out)
    assert "shape_label" not in table.column_names and table.num_rows == 80  # no version mixing

    newer = classify_job(client, shapes.root / "images", tmp_path / "new", **run)
    assert newer["release"]["version"] == shape.release.version
    assert {"colour_label", "shape_label"} <= set(pq.read_table(tmp_path / "new").column_names)
    # Asking for production on the old job's folder would mix versions: refused, one line.
    (out / SUCCESS_FILE).unlink()
    with pytest.raises(ValueError, match=r"_JOB.json: holds another job's output \(field 'release' differs\)"):
        classify_job(client, shapes.root / "images", out, release="production", **run)
    # A release by number, into a new folder.
    pinned = classify_job(client, shapes.root / "images", tmp_path / "pinned", release=first, **run)
    assert pinned["release"]["version"] == first
    with pytest.raises(JobError, match="release 'latest' is neither a version number nor 'production'"):
        classify_job(client, shapes.root / "images", tmp_path / "x", release="latest", **run)


# -- a head's validation split against what its trunk trained on --------------------------------
def test_val_images_the_trunk_trained_on_are_counted_and_the_unseen_part_scored(client, workspace, shapes, tmp_path):
    import torch

    from heads.training.data import load_labelled_data
    from registry.jobs.extract import extract_job
    from registry.jobs.train import overlap_line
    from registry.store.heads import head_metrics, head_tags
    from trunk.seen import SeenImages, content_sha

    ws = Workspace.at(workspace)
    spec = spec_for(tmp_path, shapes, "colour")
    data = load_labelled_data(spec)
    val = [s.path for s in data.val]
    assert len(val) == 16
    # The trunk trained on 6 of the head's val images (and some of its training images, which do not count).
    record = SeenImages(content_sha(p) for p in val[:6] + [s.path for s in data.train[:10]])
    trunk = Trunk("test_resnet", data_config=SMALL, seed=3)
    adopt_trunk(client, register_trunk(client, trunk, trained_on=record))
    job = train_head_job(client, spec, workspace=ws, **JOB)
    m = job.result.metrics
    assert (m["val_seen_by_trunk"], m["val_seen_share"], m["val_unseen_images"]) == (6, 6 / 16, 10)
    # The unseen figure is the same head scored on the other 10 images' cached features, nothing retrained.
    got = extract_job(trunk, val[6:], workspace=ws, taps=("pooled",), **JOB)
    preds = job.result.module(got.caches["pooled"].load(got.shas).float()).argmax(1)
    truth = torch.tensor([s.label for s in data.val[6:]])
    assert m["val_accuracy_unseen"] == pytest.approx((preds == truth).sum().item() / 10, abs=1e-12)
    assert 0.0 <= m["val_macro_f1_unseen"] <= 1.0
    logged = head_metrics(client, "colour", job.version)
    assert logged["val_seen_by_trunk"] == 6 and logged["val_accuracy_unseen"] == pytest.approx(m["val_accuracy_unseen"])
    assert head_tags(client, "colour", job.version)["trunk_trained_on"] == record.digest
    assert overlap_line(job) == (f"  val overlap with trunk v1's training images: 6 of 16 (37.5%); val_accuracy on "
                                 f"the 10 unseen {m['val_accuracy_unseen']:.4f} (macro-F1 "
                                 f"{m['val_macro_f1_unseen']:.4f})")

    # A branch head trained from augmented images hashes its val files: the same 6 are found.
    path = tmp_path / "heads" / "count.yaml"
    path.write_text(yaml.safe_dump({
        "name": "count", "owner": "tests", "data": {"manifest": str(shapes.manifests["count"])},
        "attach": {"tap": "layer2"}, "module": {"_target_": "heads.branch.BranchHead"},
        "augment": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}], "train": {"epochs": 1},
    }))
    count = load_head_spec(path)
    assert [s.path for s in load_labelled_data(count).val] == val  # the data set's one split
    branch = train_head_job(client, count, workspace=ws, **JOB).result
    assert (branch.metrics["val_seen_by_trunk"], branch.metrics["val_unseen_images"]) == (6, 10)
    unseen = [i for i, p in enumerate(branch.val_paths) if p not in val[:6]]
    assert branch.metrics["val_accuracy_unseen"] == pytest.approx(
        sum(branch.val_predictions[i] == branch.val_labels[i] for i in unseen) / 10, abs=1e-9)


def test_a_trunk_without_a_record_is_unknown_not_zero_overlap(client, workspace, shapes, tmp_path):
    from registry.jobs.train import overlap_line
    from registry.store.heads import head_metrics, head_tags

    ws = Workspace.at(workspace)
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL)))  # as from timm
    job = train_head_job(client, spec_for(tmp_path, shapes, "colour"), workspace=ws, **JOB)
    assert head_tags(client, "colour", job.version)["trunk_trained_on"] == "unknown"
    assert not {k for k in head_metrics(client, "colour", job.version) if k.startswith("val_") and "seen" in k}
    assert "unknown" in overlap_line(job)


def test_a_one_class_head_is_refused_before_training(client, workspace, shapes, tmp_path):
    from heads.spec import HeadConfigError
    from registry.store.heads import head_model_versions

    ws = Workspace.at(workspace)
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL)))
    lines = shapes.manifests["colour"].read_text().splitlines()
    label = lines[1].split(",")[1]
    one = shapes.manifests["colour"].with_name("one_class.csv")
    one.write_text("\n".join([lines[0], *(r for r in lines[1:] if r.split(",")[1] == label)]) + "\n")
    path = tmp_path / "heads" / "colour.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"name": "colour", "owner": "tests", "data": {"manifest": str(one)},
                                    "module": {"_target_": "heads.modules.LinearHead"}}))
    with pytest.raises(HeadConfigError) as e:
        train_head_job(client, load_head_spec(path), workspace=ws, **JOB)
    assert e.value.field == "data.manifest" and "\n" not in str(e.value)
    assert f"{one}: column 'label' has a single class ('{label}'" in str(e.value)
    assert head_model_versions(client) == {}  # nothing registered, nothing shipped


def _train_tap_moments(trunk, spec, tap):
    """The head's training images' features at its tap, computed here from the images (not the cache)."""
    import torch

    from heads.branch import branch_input
    from heads.training.data import load_labelled_data
    from trunk.loader import iter_decoded
    from trunk.preprocess import eval_transform

    paths = [s.path for s in load_labelled_data(spec).train]
    batch = next(iter_decoded(paths, eval_transform(trunk.data_config), batch_size=len(paths)))
    with torch.no_grad():
        x = trunk(batch.pixels, [tap])[tap] if tap == "pooled" else branch_input(trunk, batch.pixels, tap)
    x = x.double() if x.dim() == 2 else x.double().mean(dim=(2, 3))
    return len(paths), x.mean(0), x.var(0)


def test_a_registered_head_remembers_its_val_predictions_and_training_features(client, workspace, shapes, tmp_path):
    """Pooled, cached branch and augmented branch: the stored reference is the head's own val and training data."""
    import torch

    from registry.store.heads import head_reference

    ws = Workspace.at(workspace)
    trunk = Trunk("test_resnet", data_config=SMALL)
    adopt_trunk(client, register_trunk(client, trunk))
    specs = [spec_for(tmp_path, shapes, "colour")]
    for name, augment in (("count", None), ("shape", [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}])):
        path = tmp_path / "heads" / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "owner": "tests", "data": {"manifest": str(shapes.manifests[name])},
            "attach": {"tap": "layer2"}, "module": {"_target_": "heads.branch.BranchHead"},
            "augment": augment, "train": {"epochs": 1},
        }))
        specs.append(load_head_spec(path))
    for spec, source in zip(specs, ("feature cache", "feature cache", "frozen trunk prefix")):
        job = train_head_job(client, spec, workspace=ws, promote=False, **JOB)
        r = job.result
        assert r.val_logits.shape == (len(r.val_predictions), len(r.classes))
        assert r.val_logits.argmax(1).tolist() == r.val_predictions
        ref = head_reference(client, spec.name, job.version)
        assert ref is not None and ref.digest == r.reference.digest and ref.tap == spec.tap
        assert ref.meta["features"].startswith(source) and ref.meta["head"] == spec.name
        # label counts are the histogram of the head's own validation predictions
        hist = torch.bincount(torch.tensor(r.val_predictions), minlength=len(r.classes))
        assert torch.equal(ref.predictions.label_counts, hist)
        n, mean, var = _train_tap_moments(trunk, spec, spec.tap)
        assert ref.features.count == n == r.metrics["train_size"]
        # the cache stores fp16 (one part in ~2000); the prefix pass is float32
        tol = 2e-3 if source == "feature cache" else 1e-5
        assert torch.allclose(ref.features.mean, mean, rtol=tol, atol=tol), spec.name
        assert torch.allclose(ref.features.var, var, rtol=4 * tol, atol=tol), spec.name
        assert ref.features.sample.shape == (min(n, 256), mean.numel())
