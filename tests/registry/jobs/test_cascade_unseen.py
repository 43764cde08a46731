"""The cascade compares production and candidate on the validation images neither trunk trained on.

A small world of its own (80 generated images, untrained tiny trunks) so it stays fast: each
trunk version carries a record of "its training images" that names a few of the heads'
validation images, as a trunk trained on leaked validation data would.
"""

from __future__ import annotations

import pytest

from tests.conftest import SMALL
from tests.registry.jobs.cascade_state import head_config

HEADS = ("colour", "count_branch")
# Lenient: this test is about which images are compared, not about these untrained trunks.
LENIENT = {"tolerance": 1.0, "slice_tolerance": 1.0}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def accuracy_on(client, ws, trunk, name, version, samples, classes) -> float:
    """A head version scored on cached features of ``samples``, independently of the cascade's code."""
    from registry.jobs.extract import extract_job
    from registry.store.heads import load_head_version

    head = load_head_version(client, name, version)
    got = extract_job(trunk, [s.path for s in samples], workspace=ws, taps=(head.tap,), batch_size=32,
                      num_workers=0, device="cpu", progress=False)
    x = got.caches[head.tap].load(got.shas).float()
    if head.tap != "pooled":
        x = x.view(-1, *trunk.tap(head.tap).shape)
    preds = head.module.eval()(x).argmax(1).tolist()
    return sum(head.classes[p] == classes[s.label] for p, s in zip(preds, samples)) / len(samples)


def test_the_cascade_compares_on_the_images_neither_trunk_trained_on(tmp_path, migrated_db):
    import shutil

    from demo.shapes import generate_shapes
    from heads.spec import validate
    from heads.training.data import load_labelled_data
    from registry.jobs.cascade import run_cascade
    from registry.jobs.refresh import mark_candidate
    from registry.jobs.train import train_head_job
    from registry.store.heads import head_metrics, load_head_version
    from registry.store.releases import bootstrap_release
    from registry.store.tracking import connect
    from registry.store.trunks import register_trunk
    from registry.store.workspace import Workspace
    from trunk.model import Trunk
    from trunk.seen import SeenImages, content_sha

    shapes = generate_shapes(tmp_path / "data", n_images=80, n_holdout=0, size=32, seed=0)
    (tmp_path / "ws").mkdir()
    shutil.copy(migrated_db, tmp_path / "ws" / "mlflow.db")
    client, ws = connect(tmp_path / "ws"), Workspace.at(tmp_path / "ws")
    specs = {n: validate(head_config(n, shapes.root / "manifests", LENIENT), f"conf/heads/{n}.yaml",
                          expected_name=n)
             for n in HEADS}
    data = {n: load_labelled_data(specs[n]) for n in HEADS}
    val = [s.path for s in data["colour"].val]  # both heads' manifests share the data set's one split
    assert len(val) == 16 and [s.path for s in data["count_branch"].val] == val
    train = [s.path for s in data["colour"].train]

    # Production's trunk saw val images 0-3, the candidate's 2-8: 9 of 16 are out, 7 are compared.
    production, candidate = Trunk("test_resnet", data_config=SMALL), Trunk("test_resnet", seed=1, data_config=SMALL)
    pv = register_trunk(client, production, trained_on=SeenImages(content_sha(p) for p in val[:4] + train[:20]))
    bootstrap_release(client, pv)
    prod_versions = {}
    for name in HEADS:
        job = train_head_job(client, specs[name], workspace=ws, batch_size=32, num_workers=0, device="cpu",
                             progress=False)
        assert job.release is not None
        prod_versions[name] = job.version
    cv = register_trunk(client, candidate, trained_on=SeenImages(content_sha(p) for p in val[2:9] + train[10:]))
    mark_candidate(client, cv)

    lines: list[str] = []
    first = run_cascade(client, ws, progress=False, promote=False, echo=lines.append)
    for name in HEADS:
        o = first.outcomes[name]
        common, classes = data[name].val[9:], data[name].classes
        assert o.status == "trained" and o.unseen.images == 7
        assert o.unseen.production_accuracy == pytest.approx(
            accuracy_on(client, ws, production, name, prod_versions[name], common, classes), abs=1e-12)
        assert o.unseen.candidate_accuracy == pytest.approx(
            accuracy_on(client, ws, candidate, name, o.candidate_version, common, classes), abs=1e-12)
        # 7 >= the head's min_slice_size 5: the contract holds accuracy on those 7 images.
        held = next(c for c in o.contract.checks if c.name == "val_accuracy_unseen")
        assert held.value == o.unseen.candidate_accuracy and "on the 7 val images neither trunk" in held.note
        assert next(c for c in o.contract.checks if c.name == "val_accuracy").note.startswith("full split, reported")
        assert head_metrics(client, name, o.candidate_version)["contract_unseen_images"] == 7
        line = next(x for x in lines if f"] {name}: v" in x)
        assert "compared on 7 val images neither trunk trained on" in line

    # Resumed: the same versions, reused, and the very same figures.
    again = run_cascade(client, ws, progress=False, promote=False, echo=lambda _: None)
    for name in HEADS:
        assert again.outcomes[name].status == "reused"
        assert again.outcomes[name].unseen == first.outcomes[name].unseen
        assert again.outcomes[name].contract.checks == first.outcomes[name].contract.checks

    # A candidate without a record: unknown, said so, and the full split is held (the scorer the
    # cascade builds, run directly: a third cascade would only repeat the retraining and the report).
    from heads.checks.contract import Tolerances, check_contract
    from registry.jobs.cascade import CommonUnseenScorer

    unknown = register_trunk(client, Trunk("test_resnet", seed=2, data_config=SMALL))
    scorer = CommonUnseenScorer.for_cascade(client, ws, first.production, unknown, batch_size=32, num_workers=0,
                                            device="cpu")
    note = f"trunk v{unknown} has no record of its training images"
    assert scorer.excluded is None and scorer.note == note
    o = first.outcomes["colour"]
    head = load_head_version(client, "colour", o.candidate_version)
    got = scorer.score(specs["colour"], data["colour"], candidate, head)
    assert got.images is None and got.describe() == f"unseen subset unknown ({note}): compared on the full split"
    report = check_contract(o.production_metrics, o.candidate_metrics, tolerances=Tolerances(min_slice_size=5),
                            unseen=got)
    assert [c.name for c in report.checks if c.name.startswith("val_accuracy")] == ["val_accuracy"]
    assert f"unseen subset unknown ({note}): held on the full split" in report.checks[1].note

    # The head's own held-out set (data.heldout): production on its trunk, the candidate on its own,
    # the very same images, scored from pixels (independently here, through trunk + head).
    import csv

    import torch

    from trunk.loader import iter_decoded
    from trunk.preprocess import eval_transform

    held = data["colour"].val[9:]
    heldout_csv = shapes.root / "manifests" / "heldout.csv"
    with heldout_csv.open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *([s.path, data["colour"].classes[s.label]] for s in held)])
    config = head_config("colour", shapes.root / "manifests", LENIENT)
    config["data"]["heldout"] = str(heldout_csv)
    spec = validate(config, "conf/heads/colour.yaml", expected_name="colour")

    def direct(trunk, version):
        h = load_head_version(client, "colour", version)
        batch = next(iter_decoded([s.path for s in held], eval_transform(trunk.data_config), batch_size=len(held)))
        with torch.inference_mode():
            preds = h.module.eval()(trunk.eval()(batch.pixels, [h.tap])[h.tap]).argmax(1).tolist()
        return sum(h.classes[p] == data["colour"].classes[s.label] for p, s in zip(preds, held)) / len(held)

    pair = scorer.heldout(spec, candidate, head)
    assert pair.images == 7 and pair.source == str(heldout_csv)
    assert pair.production_accuracy == pytest.approx(direct(production, prod_versions["colour"]), abs=1e-12)
    assert pair.candidate_accuracy == pytest.approx(direct(candidate, o.candidate_version), abs=1e-12)
    assert scorer.heldout(specs["colour"], candidate, head) is None  # no data.heldout: nothing to check
