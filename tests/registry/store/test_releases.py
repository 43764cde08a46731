"""Releases: manifests, the production alias, trunk_id refusal, compare-and-swap, rollback."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from mlflow import MlflowClient

from heads.store import HeadArtifactError
from registry.serving.pack import PACK_FILES, PACK_INDEX, read_pack, write_pack
from registry.store.heads import register_head
from registry.store.releases import (
    ReleaseError, bootstrap_release, create_release, find_releases_by_tag, get_release, load_release, move_alias,
    promote_head, read_release, rollback,
)
from registry.store.trunks import register_trunk


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


def raced_client(workspace, race):
    """A real client on the workspace's store that runs ``race()`` (another writer, with its own
    client) just before its first ticket for the promotion lock is taken: the other promotion
    lands while this one is on its way to the lock."""
    from mlflow import MlflowClient

    from registry.store.lease import LOCK_MODEL

    class RacedClient(MlflowClient):
        fired = False

        def create_model_version(self, name, *args, **kwargs):
            if name == LOCK_MODEL and not RacedClient.fired:
                RacedClient.fired = True
                race()
            return super().create_model_version(name, *args, **kwargs)

    uri = f"sqlite:///{workspace.resolve()}/mlflow.db"
    return RacedClient(tracking_uri=uri, registry_uri=uri)


def test_swap_refused_when_production_moves_before_the_lock_is_held(client, registered, workspace):
    """create_release is a plain compare-and-swap: re-checked under the lock, refused, nothing made."""
    from registry.store.tracking import connect

    ta, _ = registered
    boot = bootstrap_release(client, ta)
    other = connect(workspace)
    raced = raced_client(workspace, lambda: promote_head(other, "colour", 1))
    with pytest.raises(ReleaseError, match=f"production moved from v{boot.version} to v2 since you began"):
        create_release(raced, ta, {"shape": 1}, expected_production=boot.version)
    prod = get_release(client)
    assert prod.version == 2 and prod.heads == {"colour": 1}
    assert sorted(int(v.version) for v in client.search_model_versions("name='release'")) == [1, 2]
    assert client.search_model_versions("name='release.lock'") == []  # every ticket released


def test_promotion_that_lost_the_race_is_rebuilt_on_top(client, registered, workspace):
    """promote_head re-reads production under the lock: the loser joins the winner's release."""
    from registry.store.tracking import connect

    ta, _ = registered
    boot = bootstrap_release(client, ta)
    other = connect(workspace)
    raced = raced_client(workspace, lambda: promote_head(other, "colour", 1))
    made = promote_head(raced, "shape", 1, started_from=boot)
    assert made.version == 3 and made.heads == {"colour": 1, "shape": 1}
    assert get_release(client) == made
    assert client.get_model_version("release", "3").tags["previous_production"] == "2"  # on top, not on v1


def test_promotion_refused_when_the_same_head_moved_meanwhile(client, registered, workspace, trunk_a, make_result):
    from registry.store.tracking import connect

    ta, _ = registered
    boot = bootstrap_release(client, ta)
    mine = register_head(client, make_result(trunk_a, "colour", seed=2), trunk_version=ta)
    other = connect(workspace)
    raced = raced_client(workspace, lambda: promote_head(other, "colour", 1))
    with pytest.raises(ReleaseError) as info:
        promote_head(raced, "colour", mine, started_from=boot)
    assert str(info.value) == (f"head.colour moved in production from none to v1 since this job started (release "
                               f"v1 -> v2); v{mine} was not promoted: compare it with v1 and promote again if it "
                               f"should replace it")
    assert get_release(client).heads == {"colour": 1} and get_release(client).version == 2
    # Nothing moved since it started: the same call replaces the head as before.
    assert promote_head(client, "colour", mine, started_from=get_release(client)).heads == {"colour": mine}


# -- previous_production, move_alias, rollback ---------------------------------------------
@pytest.fixture
def history(client, registered):
    """Production history v1 (trunk a, no heads) -> v2 (+colour v1) -> v3 (+shape v1)."""
    ta, _ = registered
    bootstrap_release(client, ta)
    promote_head(client, "colour", 1)
    promote_head(client, "shape", 1)
    return ta


def release_tags(client, version: int) -> dict[str, str]:
    return dict(client.get_model_version("release", str(version)).tags)


def test_previous_production_and_extra_tags_are_recorded(client, history):
    assert [release_tags(client, v)["previous_production"] for v in (1, 2, 3)] == ["none", "1", "2"]
    r4 = create_release(client, history, {"colour": 1}, expected_production=3, tags={"cascade": "c-42"})
    tags = release_tags(client, r4.version)
    assert tags["previous_production"] == "3" and tags["cascade"] == "c-42"
    assert client.get_run(client.get_model_version("release", "4").run_id).data.tags["cascade"] == "c-42"
    # Only production's moves have a previous production.
    cand = create_release(client, history, {}, expected_production=None, alias="candidate", tags={"cascade": "c-42"})
    assert "previous_production" not in release_tags(client, cand.version)
    assert find_releases_by_tag(client, "cascade", "c-42") == [4, 5]
    assert find_releases_by_tag(client, "previous_production", "none") == [1]
    assert find_releases_by_tag(client, "cascade", "it's") == []
    with pytest.raises(ReleaseError, match="previous_production are set by the platform"):
        create_release(client, history, {}, expected_production=4, tags={"previous_production": "1"})


def test_find_releases_before_any_release_exists(client):
    assert find_releases_by_tag(client, "cascade", "c-1") == []


def test_rollback_restores_previous_release_then_goes_further_back(client, history, trunk_a):
    source, target = rollback(client)
    assert (source.version, target.version) == (3, 2)
    assert get_release(client) == target and target.heads == {"colour": 1}
    assert release_tags(client, 2)["rolled_back_from"] == "3"
    trunk, heads = load_release(client, get_release(client))
    assert trunk.trunk_id == trunk_a.trunk_id and sorted(heads) == ["colour"]

    source, target = rollback(client)  # follows v2's own previous_production
    assert (source.version, target.version) == (2, 1) and get_release(client).heads == {}
    with pytest.raises(ReleaseError, match="release v1 was the first production release.*nothing to roll back to"):
        rollback(client)
    assert get_release(client).version == 1


def test_rollback_to_a_named_version_and_refusals(client, history):
    with pytest.raises(ReleaseError, match="release v3 is production already"):
        rollback(client, to=3)
    with pytest.raises(ReleaseError, match="release v9 does not exist"):
        rollback(client, to=9)
    source, target = rollback(client, to=1)
    assert (source.version, target.version) == (3, 1) and get_release(client).version == 1
    source, target = rollback(client, to=3)  # a rollback is undone the same way
    assert (source.version, target.version) == (1, 3) and release_tags(client, 3)["rolled_back_from"] == "1"


def test_rollback_without_production_refuses(client):
    with pytest.raises(ReleaseError, match="there is no production release, so there is nothing to roll back"):
        rollback(client)


def test_rollback_without_previous_production_tag_takes_newest_consistent_older(client, history):
    # Releases made before previous_production existed: v3 lacks it, and v2's head is gone bad.
    client.delete_model_version_tag("release", "3", "previous_production")
    client.set_model_version_tag("head.colour", "1", "trunk_id", "someone-elses")
    source, target = rollback(client)
    assert (source.version, target.version) == (3, 1)


def test_move_alias_refuses_when_production_moved(client, history):
    seen = get_release(client).version
    promote_head(client, "colour", 1)  # v4, someone else's promotion
    with pytest.raises(ReleaseError, match=f"production moved from v{seen} to v4 since you began; nothing changed"):
        move_alias(client, 2, expected=seen)
    assert get_release(client).version == 4
    assert move_alias(client, 2, expected=4, note="bad colour").version == 2
    assert get_release(client).version == 2 and release_tags(client, 2)["production_note"] == "bad colour"


def test_move_alias_refuses_a_release_whose_head_is_on_another_trunk(client, history, trunk_a):
    client.set_model_version_tag("head.colour", "1", "trunk_id", "someone-elses")
    with pytest.raises(ReleaseError) as info:
        move_alias(client, 2, expected=3)
    assert str(info.value) == (f"release v2 is not consistent: head.colour v1 was trained on trunk_id someone-elses "
                               f"but the release's trunk is {trunk_a.trunk_id}; retrain it on trunk v{history}")
    assert get_release(client).version == 3
    with pytest.raises(ReleaseError, match="cannot roll back from release v3 to its previous production v2: release "
                                           "v2 is not consistent"):
        rollback(client)
    assert get_release(client).version == 3 and "rolled_back_from" not in release_tags(client, 2)


def test_rollback_refused_when_production_moves_meanwhile(client, history, workspace):
    """Another writer promotes while the rollback is choosing its target: production stays theirs."""
    from mlflow import MlflowClient

    from registry.store.tracking import connect

    other = connect(workspace)

    class RacedClient(MlflowClient):
        def get_model_version(self, name, version):
            mv = super().get_model_version(name, version)
            if name == "release" and str(version) == "3" and get_release(other).version == 3:
                promote_head(other, "colour", 1)
            return mv

    uri = f"sqlite:///{workspace.resolve()}/mlflow.db"
    with pytest.raises(ReleaseError, match="production moved from v3 to v4 since you began"):
        rollback(RacedClient(tracking_uri=uri, registry_uri=uri))
    assert get_release(client).version == 4 and "rolled_back_from" not in release_tags(client, 2)


# -- what the registry UI shows: descriptions, contents tags, production markers -------------
def aliases(client, model):
    return {k: int(v) for k, v in client.get_registered_model(model).aliases.items()}


def test_release_versions_describe_their_contents_and_markers_follow_production(client, registered, trunk_a):
    ta, tb = registered
    bootstrap_release(client, ta)
    promote_head(client, "colour", 1)
    r3 = promote_head(client, "shape", 1)
    mv = client.get_model_version("release", str(r3.version))
    assert mv.description.endswith(f"trunk v{ta} (trunk_id {trunk_a.trunk_id})\n"
                                   f"2 heads: colour v1 (pooled), shape v1 (pooled)")
    assert mv.tags["heads"] == "colour:v1,shape:v1" and mv.tags["head_count"] == "2"
    # Every model shows which of its versions serves: the trunk and each head carry alias production.
    assert aliases(client, "trunk") == {"production": ta}
    assert aliases(client, "head.colour") == aliases(client, "head.shape") == {"production": 1}

    # Switching trunk: colour v2 (on trunk b) serves, shape left the release and loses its marker.
    r4 = create_release(client, tb, {"colour": 2}, expected_production=r3.version, note="trunk b")
    assert aliases(client, "trunk") == {"production": tb}
    assert aliases(client, "head.colour") == {"production": 2} and aliases(client, "head.shape") == {}
    assert client.get_model_version("release", str(r4.version)).description.startswith("trunk b\n\ntrunk v")

    # A rollback moves them back; a marker lost (a promoter killed after production moved) is repaired by a sweep.
    rollback(client)
    assert aliases(client, "trunk") == {"production": ta}
    assert aliases(client, "head.colour") == aliases(client, "head.shape") == {"production": 1}
    client.delete_registered_model_alias("head.shape", "production")
    from registry.store.releases import reap_leftovers

    assert reap_leftovers(client)["serving_markers_moved"] == ["head.shape"]
    assert aliases(client, "head.shape") == {"production": 1}


def test_long_head_lists_are_cut_below_mlflow_limits():
    from registry.store.releases import contents_tags, release_description

    manifest = {"trunk": {"version": 1, "trunk_id": "abc"},
                "heads": {f"head_{i:03d}": {"version": 12, "tap": "pooled"} for i in range(400)}}
    description, tags = release_description(manifest, "big"), contents_tags(manifest)
    assert len(description) < 5000 and len(tags["heads"]) < 5000 and tags["head_count"] == "400"
    assert description.splitlines()[-1].startswith("400 heads: head_000 v12 (pooled), head_001 v12")
    assert "more (release.json lists them all)" in description and "more (release.json" in tags["heads"]


def run_dir(client, model: str, version: int) -> Path:
    """The artifact store's own copy of a model version's run artifacts (the local store is a folder)."""
    uri = client.get_run(client.get_model_version(model, str(version)).run_id).info.artifact_uri
    return Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)


def test_load_release_reads_the_heads_pack_and_refuses_a_tampered_one(client, registered):
    ta, _ = registered
    release = create_release(client, ta, {"colour": 1, "shape": 1}, expected_production=None, alias="candidate")
    pack = release.manifest["pack"]
    folder = run_dir(client, "release", release.version)
    assert json.loads((folder / "release.json").read_text())["pack"] == pack
    assert pack["dir"].startswith("model/") and {f: pack["files"][f] for f in PACK_FILES} == pack["files"]
    stored = read_pack(folder / pack["dir"], expected=pack["files"], recorded_in="release.json")
    assert {n: h.version for n, h in stored.items()} == {"colour": 1, "shape": 1}
    for name, head in stored.items():  # byte for byte the files the version registered, by the registry's hashes
        tags = client.get_model_version(f"head.{name}", "1").tags
        assert head.digests() == {k: tags[k] for k in ("weights_sha256", "spec_sha256")}
    _, heads = load_release(client, release)
    assert heads["shape"].classes == ["circle", "square"]

    # The pack's heads.json rewritten: refused against the sha256 release.json records.
    spec = json.loads(stored["shape"].spec)
    spec["classes"] = spec["classes"][::-1]
    swapped = {**stored, "shape": dataclasses.replace(stored["shape"], spec=json.dumps(spec).encode())}
    files = write_pack(folder / pack["dir"], swapped)
    assert files[PACK_INDEX] != pack["files"][PACK_INDEX]
    fresh = MlflowClient(client.tracking_uri)  # release.json is kept per client: read it again
    with pytest.raises(HeadArtifactError, match=r"^release v1 pack: heads\.json does not match the sha256 in "
                                                r"release\.json \(tampered or corrupt\)$"):
        load_release(fresh, read_release(fresh, release.version))
    # ... and with release.json rewritten to match: the head's own hash recorded at registration refuses it.
    manifest = json.loads((folder / "release.json").read_text())
    (folder / "release.json").write_text(json.dumps({**manifest, "pack": {**pack, "files": files}}))
    fresh = MlflowClient(client.tracking_uri)
    with pytest.raises(HeadArtifactError, match=r"^head\.shape v1: head\.json does not match the sha256 recorded"):
        load_release(fresh, read_release(fresh, release.version))


def test_a_promotion_takes_unchanged_heads_from_the_production_pack(client, registered, trunk_a, make_result):
    ta, _ = registered
    bootstrap_release(client, ta)
    promote_head(client, "colour", 1)
    promote_head(client, "shape", 1)
    v2 = register_head(client, make_result(trunk_a, "shape", classes=("circle", "square"), seed=3), trunk_version=ta)
    # A fresh client has checked no file yet: what it does not download comes from production's pack.
    fresh = MlflowClient(client.tracking_uri)
    # The version's own stored files for colour are gone: a promotion of shape must not need them.
    colour_files = run_dir(client, "head.colour", 1) / "head"
    saved = {p.name: p.read_bytes() for p in colour_files.iterdir() if p.is_file()}
    for name in ("head.json", "head.safetensors"):
        (colour_files / name).unlink()
    try:
        release = promote_head(fresh, "shape", v2)
    finally:
        for name, data in saved.items():
            (colour_files / name).write_bytes(data)
    assert release.heads == {"colour": 1, "shape": v2}
    _, heads = load_release(MlflowClient(client.tracking_uri), get_release(client))
    assert sorted(heads) == ["colour", "shape"]
