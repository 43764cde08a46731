"""registry.jobs.tradeoff: one head at several taps, registered unpromoted, the sweep logged to MLflow."""

from __future__ import annotations

import yaml

from heads.spec import load_head_spec
from registry.jobs.train_trunk import adopt_trunk
from registry.store.releases import get_release
from registry.store.trunks import register_trunk
from registry.jobs.tradeoff import sweep_taps, variant
from registry.store.workspace import Workspace
from tests.conftest import SMALL
from trunk.model import Trunk
from demo.shapes import generate_shapes


def test_sweep_trains_each_tap_and_logs_the_front(client, workspace, tmp_path):
    shapes = generate_shapes(tmp_path / "shapes", n_images=60, n_holdout=0, size=32, seed=0)
    path = tmp_path / "heads" / "count.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"name": "count", "owner": "tests", "data": {"manifest": str(shapes.manifests["count"])},
                                    "module": {"_target_": "heads.modules.LinearHead"}, "train": {"epochs": 20}}))
    spec = load_head_spec(path)
    assert variant(spec, "layer3", branch_train={"epochs": 1}).module == {"_target_": "heads.branch.BranchHead"}
    assert variant(spec, "layer3", branch_train={"epochs": 1}).train["epochs"] == 1
    adopt_trunk(client, register_trunk(client, Trunk("test_resnet", data_config=SMALL)))
    before = get_release(client)

    sweep = sweep_taps(client, spec, ["layer3", "pooled"], workspace=Workspace.at(workspace), tolerance=0.5,
                       trunk_version="production", batch_size=32, num_workers=0, device="cpu", progress=False,
                       branch_train={"epochs": 1}, echo=lambda line: None)

    assert [p.label for p in sweep.points] == ["layer3", "pooled"]
    by_tap = {p.label: p for p in sweep.points}
    assert by_tap["layer3"].cost > by_tap["pooled"].cost
    # no augmentation: the branch trained on layer3 features taken once into the cache
    layer3 = sweep.jobs["layer3"]
    assert layer3.extract_summary["new_rows"] == 60
    assert layer3.result.metrics["cache_bytes_per_image"] > sweep.jobs["pooled"].result.metrics["cache_bytes_per_image"]
    assert sweep.chosen.label == "pooled"  # a tolerance of 0.5 picks the cheapest
    assert sweep.png.is_file() and "<- chosen" in sweep.table
    versions = client.search_model_versions("name='head.count'")
    assert sorted(v.tags["tap"] for v in versions) == ["layer3", "pooled"]
    run = client.get_run(sweep.run_id)
    assert {"val_accuracy.layer3", "val_accuracy.pooled", "added_gflops.layer3"} <= set(run.data.metrics)
    assert run.data.tags["chosen_tap"] == "pooled"
    assert get_release(client).version == before.version  # a sweep never promotes
