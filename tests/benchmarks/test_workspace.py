"""benchmarks.workspace: generated head configs validate, every head trains and lands in one release."""

from __future__ import annotations

import pytest

from benchmarks.workspace import MARKER, build_workspace, head_config, head_name
from heads.spec import load_head_spec, validate


def test_generated_configs_validate_and_vary():
    names = [head_name(i) for i in range(300)]
    assert len(set(names)) == 300 and names[:2] == ["t00_shape_00", "t00_colour_01"] and names[37] == "t03_colour_07"
    configs = [head_config(i, mlp_every=10, branch_every=100, fail_every=50) for i in range(300)]
    specs = [validate(c, f"heads/{c['name']}.yaml", {"workspace": "/ws"}, expected_name=c["name"]) for c in configs]
    targets = [s.module["_target_"].rsplit(".", 1)[1] for s in specs]
    assert targets.count("BranchHead") == 3 and targets.count("MLPHead") == 27
    assert {s.tap for s in specs if s.module["_target_"].endswith("BranchHead")} == {"layer2"}
    assert sum(s.gate["min_val_accuracy"] > 0.9 for s in specs) == 6
    assert len({(s.train["lr"], s.train["seed"]) for s in specs}) == 300
    assert len({s.config_sha for s in specs}) == 300


def test_small_workspace_has_every_head_in_one_release(tmp_path, monkeypatch, one_thread):
    from registry.store.releases import get_release
    from registry.store.tracking import connect

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "big"
    built = build_workspace(root, 6, mlp_every=3, branch_every=6, n_images=120, image_size=32, head_epochs=2,
                            progress=False)
    assert built.heads == [head_name(i) for i in range(6)]
    client = connect(root)
    release = get_release(client)
    assert release.version == built.release_version and release.trunk_version == built.trunk_version
    assert sorted(release.heads) == sorted(built.heads) and set(release.heads.values()) == {1}
    taps = {n: client.get_model_version(f"head.{n}", "1").tags["tap"] for n in built.heads}
    assert taps[head_name(5)] == "layer2" and sum(t == "pooled" for t in taps.values()) == 5
    specs = [load_head_spec(root / "conf" / "heads" / f"{n}.yaml", {"workspace": str(root)}) for n in built.heads]
    assert [s.module["_target_"] for s in specs].count("heads.modules.MLPHead") == 1
    assert (root / MARKER).is_file() and built.seconds["per_head"] > 0

    # A second call with the same arguments finds it; other arguments are refused in one line.
    again = build_workspace(root, 6, mlp_every=3, branch_every=6, n_images=120, image_size=32, head_epochs=2,
                            progress=False)
    assert (again.release_version, again.heads) == (built.release_version, built.heads)
    with pytest.raises(ValueError, match=r"large_workspace.json: field 'params'.*n_heads"):
        build_workspace(root, 7, mlp_every=3, branch_every=6, n_images=120, image_size=32, head_epochs=2,
                        progress=False)
    # An interrupted build resumes: nothing is retrained, the release is the one already made.
    (root / MARKER).unlink()
    resumed = build_workspace(root, 6, mlp_every=3, branch_every=6, n_images=120, image_size=32, head_epochs=2,
                              progress=False)
    assert resumed.seconds["heads_trained"] == 0 and resumed.release_version == built.release_version
