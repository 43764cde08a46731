"""Refresh candidates: what a distilled student is recorded as having seen, and head-aware distillation."""

from __future__ import annotations

import pytest

from tests.registry.jobs import cascade_state as cs
from registry.jobs.refresh import distilled_on
from registry.store.trunks import register_trunk
from trunk.seen import SeenImages, content_sha


def test_a_distilled_student_has_seen_its_images_and_everything_its_teacher_trained_on(client, trunk_a, trunk_b,
                                                                                      image_factory):
    taught = [image_factory(f"t{i}.png", color=(20 * i, 40, 60)) for i in range(3)]
    own = [image_factory(f"s{i}.png", color=(200, 20 * i, 60)) for i in range(2)]
    teacher = register_trunk(client, trunk_a, trained_on=SeenImages(content_sha(p) for p in taught))
    seen = distilled_on(client, teacher, [str(p) for p in own])
    assert len(seen) == 5
    assert seen.count_in(content_sha(p) for p in [*taught, *own]) == 5
    # A teacher with no record: what its student saw is unknown, not "only its own images".
    assert distilled_on(client, register_trunk(client, trunk_b), [str(p) for p in own]) is None


def test_parallel_settings_are_typed_and_refused_in_one_line():
    from registry.jobs.cascade import Parallel
    from tests.tools.test_hydra import compose_tool, refusal

    assert refusal("refresh", "parallel.backend=threads") == \
        "field 'parallel.backend': 'threads' is not one of: serial, process, ray"
    assert refusal("refresh", "parallel.workers=0") == \
        "field 'parallel.workers': '0' is not 'auto' or a count of at least 1"
    assert refusal("refresh", "parallel.threads=many") == \
        "field 'parallel.threads': 'many' is not 'auto' or a count of at least 1"
    p = compose_tool("refresh").parallel
    assert Parallel(p.backend, p.workers, p.threads, p.address) == Parallel()  # the YAML says what the code does
    p = compose_tool("refresh", "parallel.backend=process", "parallel.workers=3").parallel
    assert (p.backend, p.workers, p.threads) == ("process", 3, "auto")


def test_pool_size_and_threads_follow_the_cores_and_the_heads(monkeypatch):
    import registry.jobs.cascade as cascade
    from registry.jobs.cascade import Parallel

    monkeypatch.setattr(cascade, "available_cores", lambda: 8)
    auto = Parallel("process")
    assert auto.pool_size(100) == 8 and auto.torch_threads(8) == 1
    assert auto.pool_size(3) == 3 and auto.torch_threads(3) == 2  # never more workers than heads
    assert Parallel("process", workers=2).pool_size(100) == 2 and Parallel("process", workers=2).torch_threads(2) == 4
    assert Parallel("process", workers=2, threads=1).torch_threads(2) == 1
    ray = Parallel("ray")
    assert ray.pool_size(100) == 100 and ray.torch_threads(100) == 1  # Ray schedules by num_cpus
    assert Parallel("ray", workers=10).pool_size(100) == 10


def test_an_outcome_crosses_from_a_worker_as_json_unchanged():
    from heads.checks.contract import CommonUnseen, GoldenResult, Tolerances, check_contract
    from registry.jobs.cascade import HeadOutcome, outcome_from_json, outcome_json

    prod = {"val_accuracy": 0.8, "slice_accuracy.day": 0.75, "slice_size.day": 40.0}
    cand = {"val_accuracy": 0.8 + 1e-16, "slice_accuracy.day": 1 / 3, "slice_size.day": 40.0}
    golden = GoldenResult("golden.csv", 3, [("a.png", "red", "blue")])
    unseen = CommonUnseen(12, 0.75, 0.9166666666666666)
    contract = check_contract(prod, cand, tolerances=Tolerances(), golden=golden, unseen=unseen)
    for outcome in (HeadOutcome("colour", 3, 7, "trained", contract, prod, cand, golden, unseen=unseen),
                    HeadOutcome("shape", 2, None, "failed", check_contract(prod, None, tolerances=Tolerances(), missing_reason="no layer2"),
                                prod, reason="no layer2")):
        back = outcome_from_json(outcome_json(outcome))
        assert back == outcome and back.blocking() == outcome.blocking()


# --- head-aware distillation through refresh: production heads, or probes on another teacher ------------------


STUDENT_KWARGS = {"channels": [16, 24, 24, 48], "stem_width": 8}


@pytest.fixture(scope="module")
def distill_state(tmp_path_factory, migrated_db):
    """A production release (random test_resnet, heads shape, colour, count_branch at layer2) and 16 unlabelled images."""
    from tests.trunk.test_distill import write_images
    from trunk.model import Trunk

    root = tmp_path_factory.mktemp("refresh-distill")
    manifests = cs.generate(root / "data")
    client, ws, release = cs.build(root / "ws", migrated_db, root / "cache", manifests,
                                   Trunk("test_resnet", data_config=cs.SMALL), None)
    write_images(root / "unlabelled", 16)
    return client, ws, release, str(root / "unlabelled")


def distill(state, **settings):
    from registry.jobs.refresh import distill_candidate

    client, ws, _, folder = state
    args = dict(model_name="test_resnet", model_kwargs=STUDENT_KWARGS, student_seed=0, input=folder, taps="auto",
                epochs=1, batch_size=8, lr=2e-3, weight_decay=1e-4, augment_ops=None, seed=0, device="cpu",
                num_workers=0, progress=False)
    return distill_candidate(client, ws, **{**args, **settings})


def test_head_aware_distillation_learns_every_production_head_and_its_settings_are_the_recipe(distill_state):
    from registry.store.releases import get_release
    from registry.store.trunks import trunk_recipe, trunk_version_tags

    client, _, release, _ = distill_state
    built = distill(distill_state, head_loss_weight=1.0, temperature=2.0)
    assert built.status == "built"
    for name in cs.HEADS:  # count_branch too: its tap layer2 is distilled (taps=auto), the student has it
        assert 0.0 <= built.figures[f"head_agreement_{name}"] <= 1.0
        assert built.figures[f"distill_loss_head_{name}"] >= 0.0
    recipe = trunk_recipe(client, built.version)
    assert (recipe["teacher"], recipe["head_loss_weight"], recipe["temperature"], recipe["teacher_heads"]) == \
        (release.trunk_version, 1.0, 2.0, "production heads")
    assert recipe["heads"] == {k: int(v) for k, v in release.heads.items()}
    assert get_release(client).version == release.version  # production untouched
    tag = trunk_version_tags(client, built.version)["distill_recipe"]
    assert distill(distill_state, head_loss_weight=1.0, temperature=2.0).status == "reused (same recipe)"
    # Every new setting is in the recipe: changing one builds a new student.
    other_t = distill(distill_state, head_loss_weight=1.0, temperature=3.0)
    features_only = distill(distill_state, head_loss_weight=0.0, temperature=2.0)
    assert other_t.status == features_only.status == "built"
    tags = {trunk_version_tags(client, c.version)["distill_recipe"] for c in (other_t, features_only)}
    assert len(tags | {tag}) == 3
    assert "head_agreement_colour" not in features_only.figures  # weight 0: features only, as before


def test_another_teacher_gets_linear_probes_for_the_heads(distill_state):
    from registry.store.trunks import register_trunk, trunk_recipe, trunk_version_tags
    from trunk.model import Trunk

    client, _, release, _ = distill_state
    deeper = register_trunk(client, Trunk("test_resnet", data_config=cs.SMALL, seed=5,
                                          model_kwargs={"channels": [32, 48, 96, 128]}))
    built = distill(distill_state, teacher=deeper, head_loss_weight=1.0, temperature=2.0)
    assert any("linear probes" in note and f"trunk v{deeper}" in note for note in built.notes)
    for name in cs.HEADS:  # a probe per head, on the teacher's pooled features
        assert 0.0 <= built.figures[f"probe_train_accuracy_{name}"] <= 1.0
        assert f"head_agreement_{name}" in built.figures
    recipe = trunk_recipe(client, built.version)
    assert recipe["teacher"] == deeper and recipe["teacher_heads"].startswith("linear probes")
    assert recipe["production_trunk_version"] == release.trunk_version
    assert trunk_version_tags(client, built.version)["distilled_from"] == str(deeper)


def test_a_teacher_that_does_not_exist_is_one_line(distill_state):
    from registry.store.tracking import RegistryError

    _, _, release, _ = distill_state
    with pytest.raises(RegistryError, match=rf"^field 'distill.teacher': trunk v99 does not exist in the registry "
                                            rf"\(null: production's trunk v{release.trunk_version}\)$"):
        distill(distill_state, teacher=99, head_loss_weight=1.0)
    with pytest.raises(ValueError, match=r"^field 'distill.teacher': 'x' is neither null"):
        distill(distill_state, teacher="x")
