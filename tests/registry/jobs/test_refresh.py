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
