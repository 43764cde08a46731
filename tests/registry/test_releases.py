"""Releases: manifests, the production alias, trunk_id refusal, compare-and-swap."""

from __future__ import annotations

import json

import pytest
import torch

from registry.heads import register_head
from registry.releases import (
    ReleaseError, bootstrap_release, create_release, get_release, load_release, promote_head, read_release,
)
from registry.trunks import register_trunk


@pytest.fixture
def registered(client, trunk_a, trunk_b, make_result):
    """Trunks a (v1) and b (v2); colour v1 and shape v1 on a, colour v2 on b."""
    ta, tb = register_trunk(client, trunk_a), register_trunk(client, trunk_b)
    register_head(client, make_result(trunk_a, "colour"), trunk_version=ta)
    register_head(client, make_result(trunk_a, "shape", classes=("circle", "square")), trunk_version=ta)
    register_head(client, make_result(trunk_b, "colour", seed=1), trunk_version=tb)
    return ta, tb


def test_no_production_yet(client):
    assert get_release(client) is None


def test_promote_without_production_says_to_bootstrap(client, registered):
    with pytest.raises(ReleaseError, match="no production release yet.*bootstrap one with a trunk"):
        promote_head(client, "colour", 1)
    assert get_release(client) is None


def test_bootstrap_then_promote_moves_production(client, registered, trunk_a, tmp_path):
    ta, _ = registered
    boot = bootstrap_release(client, ta)
    assert (boot.version, boot.trunk_version, boot.trunk_id, boot.heads) == (1, ta, trunk_a.trunk_id, {})
    assert get_release(client) == boot

    r2 = promote_head(client, "colour", 1)
    assert r2.version == 2 and r2.heads == {"colour": 1}
    r3 = promote_head(client, "shape", 1)
    assert r3.heads == {"colour": 1, "shape": 1}
    prod = get_release(client)
    assert prod.version == 3 and prod.as_dict()["heads"] == {"colour": 1, "shape": 1}

    mv = client.get_model_version("release", "3")
    assert mv.tags["trunk_id"] == trunk_a.trunk_id and mv.tags["trunk_version"] == str(ta)
    assert {k: int(v) for k, v in client.get_registered_model("release").aliases.items()} == {"production": 3}
    manifest = json.loads(open(client.download_artifacts(mv.run_id, "release.json", str(tmp_path))).read())
    assert manifest["trunk"] == {"version": ta, "trunk_id": trunk_a.trunk_id}
    assert manifest["heads"] == {"colour": {"version": 1, "tap": "pooled", "trunk_id": trunk_a.trunk_id},
                                 "shape": {"version": 1, "tap": "pooled", "trunk_id": trunk_a.trunk_id}}
    # Older releases stay readable, unchanged.
    assert read_release(client, 2).heads == {"colour": 1}


def test_head_from_another_trunk_is_refused_and_production_untouched(client, registered, trunk_a, trunk_b):
    ta, tb = registered
    bootstrap_release(client, ta)
    before = promote_head(client, "colour", 1)
    with pytest.raises(ReleaseError) as info:
        promote_head(client, "colour", 2)
    assert str(info.value) == (f"head.colour v2 was trained on trunk_id {trunk_b.trunk_id} but the release's "
                               f"trunk is {trunk_a.trunk_id}; retrain it on trunk v{ta}")
    assert get_release(client) == before
    with pytest.raises(ReleaseError, match="head.shape v1 was trained on trunk_id .* retrain it on trunk v2"):
        create_release(client, tb, {"colour": 2, "shape": 1}, expected_production=before.version)
    assert get_release(client) == before
    assert len(client.search_model_versions("name='release'")) == 2


def test_failed_gate_head_is_never_released(client, registered, trunk_a, make_result):
    ta, _ = registered
    bootstrap_release(client, ta)
    bad = register_head(client, make_result(trunk_a, "colour", val_accuracy=0.3, gate={"min_val_accuracy": 0.6}),
                        trunk_version=ta)
    with pytest.raises(ReleaseError, match=f"head.colour v{bad} failed its gate"):
        promote_head(client, "colour", bad)
    assert get_release(client).heads == {}


def test_compare_and_swap_refuses_when_production_moved(client, registered):
    ta, _ = registered
    first = bootstrap_release(client, ta)
    seen = get_release(client)  # a slow job reads production ...
    promote_head(client, "colour", 1)  # ... someone else promotes meanwhile ...
    with pytest.raises(ReleaseError) as info:  # ... and the slow job's swap must fail.
        create_release(client, ta, {"shape": 1}, expected_production=seen.version)
    assert str(info.value).startswith(f"production moved from v{first.version} to v2 since you began; nothing changed")
    prod = get_release(client)
    assert prod.version == 2 and prod.heads == {"colour": 1}
    assert len(client.search_model_versions("name='release'")) == 2


def test_expected_none_refused_once_production_exists(client, registered):
    ta, _ = registered
    bootstrap_release(client, ta)
    with pytest.raises(ReleaseError, match="production moved from none to v1"):
        create_release(client, ta, {}, expected_production=None)


def test_switch_trunk_with_bootstrap(client, registered, trunk_b):
    ta, tb = registered
    bootstrap_release(client, ta)
    promote_head(client, "colour", 1)
    switched = bootstrap_release(client, tb)
    assert get_release(client) == switched and switched.trunk_id == trunk_b.trunk_id and switched.heads == {}
    assert promote_head(client, "colour", 2).heads == {"colour": 2}


def test_unknown_versions_are_refused(client, registered):
    ta, _ = registered
    with pytest.raises(ReleaseError, match="trunk v9 does not exist"):
        bootstrap_release(client, 9)
    bootstrap_release(client, ta)
    with pytest.raises(ReleaseError, match="head.colour v5 does not exist"):
        promote_head(client, "colour", 5)


def test_candidate_alias_leaves_production_alone(client, registered):
    ta, _ = registered
    prod = bootstrap_release(client, ta)
    cand = create_release(client, ta, {"colour": 1}, expected_production=None, alias="candidate")
    assert get_release(client, "candidate") == cand
    assert get_release(client) == prod


def test_load_release_gives_runnable_trunk_and_heads(client, registered, trunk_a):
    ta, _ = registered
    bootstrap_release(client, ta)
    promote_head(client, "colour", 1)
    trunk, heads = load_release(client, promote_head(client, "shape", 1))
    assert trunk.trunk_id == trunk_a.trunk_id
    assert sorted(heads) == ["colour", "shape"]
    with torch.no_grad():
        feats = trunk(torch.randn(2, 3, 32, 32), taps=[heads["shape"].tap])["pooled"]
        assert heads["shape"].module(feats).shape == (2, 2)
        assert heads["colour"].module(feats).shape == (2, 3)


def test_swap_refused_when_production_moves_during_release_creation(client, registered, workspace):
    """Another writer promotes while our release version is being created: ours is withdrawn."""
    from mlflow import MlflowClient

    from registry.tracking import connect

    ta, _ = registered
    boot = bootstrap_release(client, ta)
    other = connect(workspace)

    class RacedClient(MlflowClient):
        # A real client; the real concurrent promotion lands right after our version is created.
        def create_model_version(self, *args, **kwargs):
            mv = super().create_model_version(*args, **kwargs)
            promote_head(other, "colour", 1)
            return mv

    uri = f"sqlite:///{workspace.resolve()}/mlflow.db"
    raced = RacedClient(tracking_uri=uri, registry_uri=uri)
    with pytest.raises(ReleaseError, match=f"production moved from v{boot.version} to v3 since you began"):
        create_release(raced, ta, {"shape": 1}, expected_production=boot.version)
    prod = get_release(client)
    assert prod.version == 3 and prod.heads == {"colour": 1}
    versions = sorted(int(v.version) for v in client.search_model_versions("name='release'"))
    assert versions == [1, 3]  # our v2 was withdrawn, not left behind
