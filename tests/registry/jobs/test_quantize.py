"""The quantize refresh candidate: built from production, registered, reused, and classified with.

A real SQLite store; production is trunk_a with two heads whose labelled folders are
generated here, so the candidate calibrates on the heads' real training split.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from heads.classify.output import shard_provenance
from heads.training.data import load_labelled_data
from registry.jobs.classify import classify_job
from registry.jobs.quantize import QUANTIZE_RECIPE_TAG, quantize_candidate
from registry.store.heads import register_head
from registry.store.releases import bootstrap_release, promote_head
from registry.store.trunks import (
    load_trunk,
    register_trunk,
    trunk_alias_versions,
    trunk_metrics,
    trunk_trained_on,
    trunk_version_tags,
)
from registry.store.workspace import Workspace
from tests.conftest import write_image
from trunk.model import TrunkError
from trunk.preprocess import eval_transform
from trunk.quantize import QuantizedTrunk
from trunk.seen import SeenImages, content_sha

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
RUN = {"batch_size": 4, "num_workers": 0, "device": "cpu", "progress": False}
QUANTIZE = {"calibration_images": 256, "input": None, "seed": 0, "device": "cpu", "progress": False}


@pytest.fixture
def production(client, trunk_a, make_result, tmp_path):
    """Production: trunk_a (trained on one known image) with heads colour and shape, each with a labelled folder."""
    for name in ("colour", "shape"):
        for c, (label, rgb) in enumerate(COLOURS.items()):
            for i in range(6):
                write_image(tmp_path / "data" / name / label / f"{i}.png", rgb, size=32, seed=10 * c + i)
    seen = SeenImages([content_sha(tmp_path / "data" / "colour" / "red" / "0.png")])
    tv = register_trunk(client, trunk_a, trained_on=seen)
    bootstrap_release(client, tv)
    results = [make_result(trunk_a, "colour", classes=tuple(COLOURS)),
               make_result(trunk_a, "shape", classes=tuple(COLOURS), seed=1)]
    for result in results:
        register_head(client, result, trunk_version=tv)
        promote_head(client, result.spec.name, 1)
    return tv, seen, [r.spec for r in results]


def test_static_candidate_calibrates_on_training_images_registers_and_is_reused(client, workspace, production):
    tv, seen, specs = production
    ws = Workspace.at(workspace)
    built = quantize_candidate(client, ws, scheme="static", **QUANTIZE)
    assert (built.how, built.status) == ("quantize", "built") and isinstance(built.trunk, QuantizedTrunk)
    assert trunk_alias_versions(client)["candidate"] == built.version != tv
    tags = trunk_version_tags(client, built.version)
    assert tags["quantized_from"] == str(tv) and tags["trunk_id"] == built.trunk.trunk_id
    # Calibrated on every head's training split, never on an image any head validates on.
    data = [load_labelled_data(s) for s in specs]
    val = {content_sha(s.path) for d in data for s in d.val}
    train = {s.path for d in data for s in d.train if content_sha(s.path) not in val}
    run = client.get_run(client.get_model_version("trunk", str(built.version)).run_id)
    assert int(run.data.params["calibration_images"]) == len(train) > 0
    assert built.trunk.reduction["calibration_images"] == len(train)  # under the cap of 256: all there were
    metrics = trunk_metrics(client, built.version)
    for key in ("speedup_vs_source", "size_ratio_vs_source", "cosine_pooled_vs_source"):
        assert metrics[key] == pytest.approx(built.figures[key])
    assert metrics["size_ratio_vs_source"] < 1 / 3 and metrics["cosine_pooled_vs_source"] > 0.9
    # Calibration learns nothing: what the candidate has seen is what its source has seen.
    assert trunk_trained_on(client, built.version).digest == seen.digest
    # Stored without pickles, rebuilt from the registry to the same id.
    assert load_trunk(client, built.version).trunk_id == built.trunk.trunk_id

    again = quantize_candidate(client, ws, scheme="static", **QUANTIZE)
    assert (again.version, again.status) == (built.version, "reused (same recipe)")
    assert trunk_version_tags(client, again.version)[QUANTIZE_RECIPE_TAG] == tags[QUANTIZE_RECIPE_TAG]

def test_a_scheme_the_family_cannot_take_is_refused_before_anything_is_registered(client, workspace, production):
    tv, _, _ = production
    with pytest.raises(TrunkError, match="dynamic int8 quantizes Linear layers only and ResNet has none; use static"):
        quantize_candidate(client, Workspace.at(workspace), scheme="dynamic", **QUANTIZE)
    with pytest.raises(TrunkError, match="unknown quantization scheme 'int4'"):
        quantize_candidate(client, Workspace.at(workspace), scheme="int4", **QUANTIZE)
    assert "candidate" not in trunk_alias_versions(client)


def test_bulk_classification_runs_on_a_quantized_trunk(client, workspace, production, make_result, tmp_path):
    built = quantize_candidate(client, Workspace.at(workspace), scheme="static", **dict(QUANTIZE, calibration_images=6))
    assert built.trunk.reduction["calibration_images"] == 6
    # A release on the quantized trunk (the cascade would retrain the heads; here one head is registered on it).
    bootstrap_release(client, built.version)
    head = make_result(built.trunk, "colour", classes=tuple(COLOURS))
    register_head(client, head, trunk_version=built.version)
    promote_head(client, "colour", 2)
    folder = tmp_path / "images"
    paths = [write_image(folder / f"{i}.png", rgb, size=32, seed=50 + i) for i, rgb in enumerate(COLOURS.values())]
    out = tmp_path / "out"
    classify_job(client, folder, out, **RUN)
    assert shard_provenance(out / "part-00000.parquet")["trunk"] == {"version": built.version,
                                                                   "trunk_id": built.trunk.trunk_id}
    table = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pydict()
    assert sorted(table["path"]) == sorted(str(p) for p in paths) and all(e is None for e in table["error"])
    # The scores are those of the quantized trunk's pooled features through the head.
    transform = eval_transform(built.trunk.data_config)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        probs = torch.softmax(head.module(built.trunk(x, ["pooled"])["pooled"]), dim=1)
    by_path = dict(zip(table["path"], table["colour_score"]))
    expected = probs.max(dim=1).values
    assert [by_path[str(p)] for p in paths] == pytest.approx(expected.tolist(), abs=1e-4)


def test_candidate_quantize_composes_and_bad_settings_are_one_line():
    from tests.tools.test_hydra import compose_tool
    from tools.candidates import Quantize, build_candidate

    chosen = build_candidate(compose_tool("refresh", "candidate=quantize", "candidate.scheme=dynamic"))
    assert isinstance(chosen, Quantize) and chosen.name == "candidate"
    assert (chosen.scheme, chosen.calibration_images, chosen.input, chosen.seed) == ("dynamic", 256, None, 0)
    for override, line in [
        ("candidate.scheme=int4", "field 'candidate.scheme': 'int4' is not one of static, dynamic, weight_only, "
                                  "float16, bfloat16"),
        ("candidate.calibration_images=0", "field 'candidate.calibration_images': '0' is not a count of at least 1"),
    ]:
        with pytest.raises(ValueError) as e:
            build_candidate(compose_tool("refresh", "candidate=quantize", override))
        assert str(e.value) == line
