"""Refresh candidates: what a distilled student is recorded as having seen."""

from __future__ import annotations

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
