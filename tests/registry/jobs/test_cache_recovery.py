"""Head training on a damaged feature cache: the shard is quarantined and its rows recomputed."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import yaml

from heads.training.data import load_labelled_data
from heads.spec import load_head_spec
from registry.jobs.train import features_for
from registry.store.workspace import Workspace
from tests.conftest import SMALL
from trunk.cache import QUARANTINE, FeatureCache
from trunk.model import Trunk
from demo.shapes import generate_shapes

JOB = {"batch_size": 16, "num_workers": 0, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_images=40, n_holdout=0, size=32, seed=0)


def test_training_features_are_recomputed_from_a_corrupt_shard(shapes, tmp_path):
    spec_file = tmp_path / "colour.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "colour", "owner": "tests", "data": {"manifest": str(shapes.manifests["colour"])},
        "module": {"_target_": "heads.modules.LinearHead"}, "train": {"epochs": 1}, "gate": {},
    }))
    spec = load_head_spec(spec_file)
    data = load_labelled_data(spec)
    trunk = Trunk("test_resnet", data_config=SMALL)
    ws = Workspace.at(tmp_path / "ws")
    _, train_x, val_x, first = features_for(trunk, spec, data, workspace=ws, **JOB)
    assert first.summary["new_rows"] == 40

    # Same-size damage inside the features of the one shard (what a bad disk or a stray write does).
    shard = FeatureCache.for_trunk(ws.cache, trunk, spec.tap).shards[0]
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = 8 + n + json.loads(raw[8:8 + n])["features"]["data_offsets"][0]
    raw[start + 100:start + 164] = bytes(b ^ 0xFF for b in raw[start + 100:start + 164])
    shard.write_bytes(bytes(raw))

    _, train_again, val_again, second = features_for(trunk, spec, data, workspace=ws, **JOB)
    assert second.summary["quarantined_rows"] == 40 and second.summary["new_rows"] == 40
    assert torch.equal(train_again, train_x) and torch.equal(val_again, val_x)
    assert (shard.parent / QUARANTINE / shard.name).exists() and not shard.exists()
