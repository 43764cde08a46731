"""Trunk versions: tags, params, artifacts, dedupe by trunk_id, exact round trip."""

from __future__ import annotations

import torch

import pytest

from registry.store.tracking import RegistryError
from registry.store.trunks import TRUNK_MODEL, find_trunk_version, load_trunk, register_trunk


def test_register_records_trunk_id_tag_params_and_artifacts(client, trunk_a):
    version = register_trunk(client, trunk_a, description="tiny test trunk",
                             params={"epochs": 3}, metrics={"train_loss": 0.25})
    assert version == 1
    mv = client.get_model_version(TRUNK_MODEL, "1")
    assert mv.tags["trunk_id"] == trunk_a.trunk_id
    assert mv.tags["model_name"] == "test_resnet"
    run = client.get_run(mv.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "trunks"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model_name"] == "test_resnet"
    assert params["trunk_id"] == trunk_a.trunk_id
    assert params["preprocess_key"] == trunk_a.preprocess_key
    assert params["data_config.input_size"] == "[3, 32, 32]"
    assert params["epochs"] == "3"
    assert run.data.metrics["train_loss"] == 0.25
    files = sorted(f.path for f in client.list_artifacts(mv.run_id, "trunk"))
    assert files == ["trunk/trunk.json", "trunk/trunk.safetensors"]


def test_same_trunk_id_is_not_registered_twice(client, trunk_a, trunk_b):
    first = register_trunk(client, trunk_a)
    assert register_trunk(client, trunk_a) == first
    second = register_trunk(client, trunk_b)
    assert second == first + 1
    assert len(client.search_model_versions(f"name='{TRUNK_MODEL}'")) == 2
    assert find_trunk_version(client, trunk_b.trunk_id) == second
    assert find_trunk_version(client, "0" * 16) is None


def test_load_roundtrip_gives_identical_trunk(client, trunk_a):
    version = register_trunk(client, trunk_a)
    loaded = load_trunk(client, version)
    assert loaded.trunk_id == trunk_a.trunk_id
    assert loaded.data_config == trunk_a.data_config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)["pooled"], trunk_a(x)["pooled"])


def test_load_missing_version_names_it(client):
    with pytest.raises(RegistryError, match="trunk v7 does not exist"):
        load_trunk(client, 7)


def test_load_refuses_weights_that_do_not_match_the_tag(client, trunk_a):
    version = register_trunk(client, trunk_a)
    client.set_model_version_tag(TRUNK_MODEL, str(version), "trunk_id", "f" * 16)
    with pytest.raises(RegistryError, match="tag 'trunk_id' says ffff"):
        load_trunk(client, version)


def _shas(n: int, salt: str = "") -> list[str]:
    import hashlib

    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def test_trained_on_round_trips_and_a_trunk_without_a_record_is_unknown(client, trunk_a, trunk_b):
    from registry.store.trunks import TRAINED_ON_TAG, trunk_trained_on
    from trunk.seen import SeenImages

    seen = SeenImages(_shas(50))
    version = register_trunk(client, trunk_a, trained_on=seen)
    assert client.get_model_version(TRUNK_MODEL, str(version)).tags[TRAINED_ON_TAG] == seen.digest
    back = trunk_trained_on(client, version)
    assert len(back) == 50 and back.digest == seen.digest
    assert back.count_in(_shas(60)) == 50 and back.count_in(_shas(5, salt="x")) == 0
    assert trunk_trained_on(client, register_trunk(client, trunk_b)) is None


def test_trained_on_refuses_a_record_that_does_not_match_its_tag(client, trunk_a):
    from registry.store.trunks import TRAINED_ON_TAG, trunk_trained_on
    from trunk.seen import SeenImages

    version = register_trunk(client, trunk_a, trained_on=SeenImages(_shas(10)))
    client.set_model_version_tag(TRUNK_MODEL, str(version), TRAINED_ON_TAG, SeenImages(_shas(9)).digest)
    with pytest.raises(RegistryError, match=f"trunk v{version}: record of training images refused: .*was recorded"):
        trunk_trained_on(client, version)


def test_recipe_round_trips_and_one_that_does_not_match_its_tag_is_refused(client, trunk_a, trunk_b):
    from registry.store.trunks import RECIPE_SHA_TAG, trunk_recipe

    recipe = {"epochs": 3, "augment": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}]}
    version = register_trunk(client, trunk_a, recipe=recipe)
    assert trunk_recipe(client, version) == recipe
    assert trunk_recipe(client, register_trunk(client, trunk_b)) is None
    client.set_model_version_tag(TRUNK_MODEL, str(version), RECIPE_SHA_TAG, "0" * 16)
    with pytest.raises(RegistryError, match=f"trunk v{version}: recipe refused: .*altered"):
        trunk_recipe(client, version)
