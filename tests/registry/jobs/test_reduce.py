"""The reduction search on a small real platform: build, cascade, time, choose, report, promote."""

from __future__ import annotations

import json

import pytest

from heads.checks.contract import Tolerances
from registry.jobs.reduce import Reduction, pareto_front, search_reductions
from registry.jobs.refresh import timm_candidate
from registry.store.releases import get_release
from tests.registry.jobs import cascade_state as cs
from trunk.model import Trunk, TrunkError

# Half the widths of test_resnet: fewer GFLOPs by construction (the search's cost here is
# counted, not timed, so the choice cannot hinge on timing noise).
HALF = {"channels": [16, 24, 24, 48], "stem_width": 8}
LENIENT = Tolerances(tolerance=1.0, slice_tolerance=1.0, min_slice_size=5)


def test_the_pareto_front_keeps_only_points_nothing_beats_on_both():
    points = [("a", 1.0, 0.90), ("b", 2.0, 0.99), ("c", 2.0, 0.95), ("d", 0.5, 0.80), ("e", 3.0, 0.99)]
    # c is beaten by b (same cost, keeps more); e by b (costs more, keeps the same).
    assert pareto_front(points) == ["d", "a", "b"]
    assert pareto_front([("only", 1.0, 0.5)]) == ["only"]


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    return cs.small_platform(tmp_path_factory.mktemp("reduce"))


def _space(client, built: dict, seed: int = 0):
    """A half-width student (built once, then reused like a candidate with the same recipe) and one that cannot be built."""
    def half():
        if "half" not in built:
            built["half"] = timm_candidate(client, Trunk("test_resnet", model_kwargs=HALF, data_config=cs.SMALL,
                                                         seed=seed))
        else:
            built["half"].status = "reused (same recipe)"
        return built["half"]

    def refused():
        raise TrunkError("static int8 cannot quantize 'test_vit' (VisionTransformer): use scheme=dynamic")

    return [Reduction("half", half, {"student": HALF}), Reduction("vit_static", refused, {"scheme": "static"})]


def test_a_search_proposes_then_promotes_the_cheapest_passing_trunk_and_reports_it(platform):
    client, ws, release = platform
    built: dict = {}
    lines: list[str] = []
    proposed = search_reductions(client, ws, _space(client, built), tolerances=LENIENT, promote=False,
                                 cost_key="gflops", progress=False, echo=lines.append, timing_batch=4)
    half, vit = proposed.row("half"), proposed.row("vit_static")
    assert vit.verdict == "not built" and "use scheme=dynamic" in vit.error and vit.version is None
    assert half.passed and set(half.kept) == set(cs.HEADS) and half.worst is not None
    assert half.cost["gflops"] < proposed.baseline["gflops"] and half.cost["bytes"] < proposed.baseline["bytes"]
    assert proposed.chosen == "half" and proposed.front == ["half"] and proposed.promoted is None
    assert get_release(client).version == release.version  # proposed only

    text = proposed.report["text"]
    assert "PROPOSED half" in text and "vit_static: static int8 cannot quantize" in text
    assert all(name in text for name in cs.HEADS)
    saved = json.loads(proposed.report["json"].read_text())
    assert saved["chosen"] == "half" and [c["verdict"] for c in saved["candidates"]] == ["passes", "not built"]
    assert proposed.report["png"].stat().st_size > 1000
    run = client.get_run(proposed.report["run_id"])
    assert run.data.tags["chosen"] == "half"
    assert run.data.metrics["half.gflops"] == pytest.approx(half.cost["gflops"])
    assert set(run.data.metrics) >= {f"half.kept.{h}" for h in cs.HEADS}
    assert client.get_experiment(run.info.experiment_id).name == "reductions"

    # Again with promote: the same candidate and its retrained heads are reused, and it reaches production.
    lines.clear()
    promoted = search_reductions(client, ws, _space(client, built), tolerances=LENIENT, promote=True,
                                 cost_key="gflops", progress=False, echo=lines.append, timing_batch=4)
    # Each head twice: gated with promote=false, then by the promoting cascade; never retrained.
    assert sum("(reused)" in line for line in lines) == 2 * len(cs.HEADS)
    assert promoted.chosen == "half" and promoted.promoted is not None
    assert promoted.promoted.trunk_version == built["half"].version
    assert get_release(client).version == promoted.promoted.version
    assert "PROMOTED half" in promoted.report["text"]


def test_when_no_candidate_passes_nothing_is_chosen_and_production_stays(platform):
    client, ws, _ = platform
    before = get_release(client)
    impossible = Tolerances(tolerance=-1.0, slice_tolerance=1.0, min_slice_size=5)  # every head must gain a point
    built: dict = {}
    result = search_reductions(client, ws, _space(client, built, seed=1)[:1], tolerances=impossible, promote=True,
                               cost_key="gflops", progress=False, timing_batch=4)
    assert result.chosen is None and result.promoted is None
    # shape's own gate block keeps its lenient tolerance (cs.DEFAULT_GATES); the other two block.
    assert not result.row("half").passed and set(result.row("half").blocked) == {"colour", "count_branch"}
    assert "production stays release" in result.report["text"]
    assert get_release(client).version == before.version


def test_an_empty_or_duplicated_space_is_refused_in_one_line(platform):
    client, ws, _ = platform
    with pytest.raises(ValueError, match="field 'space': the search space is empty"):
        search_reductions(client, ws, [])
    one = Reduction("x", lambda: None)
    with pytest.raises(ValueError, match="field 'space': x appears more than once"):
        search_reductions(client, ws, [one, one])
    with pytest.raises(ValueError, match="field 'cost': 'watts'"):
        search_reductions(client, ws, [one], cost_key="watts")
