"""The benchmark's parts on timm's test_resnet at 32 px: structure, pairing, goals. No timing asserts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from heads.bank import HeadBank
from benchmarks.heads import (
    GOALS,
    BenchTrunk,
    HeadMix,
    bench_heads,
    bench_separate,
    bench_training,
    check_goals,
    format_table,
    interleaved,
    make_batches,
    make_heads,
    paired_ratio,
    per_batch,
    run_benchmark,
    train_linear_head,
    write_result,
)
from heads.modules import LinearHead, MLPHead
from tests.conftest import SMALL
from trunk.model import POOLED, Trunk

pytestmark = pytest.mark.usefixtures("one_thread")


def positive_finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_make_heads_mixes_three_linear_to_one_mlp():
    heads = make_heads(8, 16, num_classes=3, seed=5)
    kinds = [type(h.module) for h in heads.values()]
    assert kinds.count(LinearHead) == 6 and kinds.count(MLPHead) == 2
    assert all(h.tap == POOLED and h.classes == ["c0", "c1", "c2"] for h in heads.values())
    assert all(type(h.module) is LinearHead for h in make_heads(5, 16, mlp_every=0).values())
    # Seeded: the same call gives the same weights, without touching the global RNG stream.
    torch.manual_seed(0)
    before = torch.rand(1)
    again = make_heads(8, 16, num_classes=3, seed=5)
    torch.manual_seed(0)
    make_heads(8, 16, num_classes=3, seed=5)
    assert torch.equal(torch.rand(1), before)
    torch.testing.assert_close(again["head_000"].module.fc.weight, heads["head_000"].module.fc.weight)


def test_bank_of_benchmark_heads_fuses_the_linear_ones_and_groups_the_mlps():
    bank = HeadBank(make_heads(32, 16, num_classes=4))
    assert tuple(bank.fused["tap_0"].weight.shape) == (24 * 4, 16)
    assert len(bank.singles) == 0 and len(bank.grouped) == 1 and len(bank.grouped["group_0"].names) == 8


def test_batches_depend_only_on_the_seed():
    a = make_batches((3, 8, 8), 2, 3, seed=1)
    b = make_batches((3, 8, 8), 2, 3, seed=1)
    assert len(a) == 3 and a[0].shape == (2, 3, 8, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], make_batches((3, 8, 8), 2, 1, seed=2)[0])


def test_per_batch_gives_every_contender_the_same_batch_each_round():
    batches = [torch.full((1,), float(i)) for i in range(3)]
    seen: dict[str, list[float]] = {"a": [], "b": []}
    contenders = per_batch({name: (lambda x, name=name: seen[name].append(x.item())) for name in seen}, batches)
    interleaved(contenders, warmup=2, repeats=4)
    assert seen["a"] == seen["b"] == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # One slow round (the machine was busy) hits both sides; the pairing cancels it.
    assert paired_ratio([2.0, 40.0, 3.0], [1.0, 20.0, 1.0]) == 2.0


@pytest.fixture(scope="module")
def small():
    trunk = Trunk("test_resnet", data_config=SMALL)
    return trunk, make_batches(trunk.data_config["input_size"], 4, 2, seed=0)


def test_bench_heads_reports_every_case_against_the_bare_trunk(small):
    trunk, batches = small
    out = bench_heads(trunk, batches, mix=HeadMix(counts=(1, 8), linear_only=(32,)), warmup=0, repeats=2)
    assert positive_finite(out["trunk_ms"])
    assert [c["case"] for c in out["cases"]] == ["trunk+1 mixed", "trunk+8 mixed", "trunk+32 linear"]
    assert [(c["n_linear"], c["n_mlp"]) for c in out["cases"]] == [(1, 0), (6, 2), (32, 0)]
    assert all(positive_finite(c["ms"]) and positive_finite(c["ratio"]) for c in out["cases"])


def test_bench_separate_compares_full_models(small):
    trunk, batches = small
    out = bench_separate(trunk, batches, n_models=2, warmup=0, repeats=2)
    assert out["n_models"] == 2
    assert all(positive_finite(out[k]) for k in ("shared_ms", "separate_ms", "speedup"))


def test_cached_and_through_trunk_training_learn_the_same_head(small):
    trunk, batches = small
    labels = [torch.tensor([0, 1, 2, 1]), torch.tensor([2, 2, 0, 1])]
    with torch.no_grad():
        cached = [trunk(x, [POOLED])[POOLED] for x in batches]
    width = trunk.tap(POOLED).channels

    def through(x):
        def run():
            with torch.no_grad():
                return trunk(x, [POOLED])[POOLED]
        return run

    a = train_linear_head(width, 3, [((lambda f=f: f), y) for f, y in zip(cached, labels)], 2, lr=0.1)
    b = train_linear_head(width, 3, [(through(x), y) for x, y in zip(batches, labels)], 2, lr=0.1)
    untrained = train_linear_head(width, 3, [((lambda f=f: f), y) for f, y in zip(cached, labels)], 0)
    # Same features, same loop: the comparison is of where features come from, nothing else.
    torch.testing.assert_close(a.fc.weight, b.fc.weight)
    assert not torch.allclose(a.fc.weight, untrained.fc.weight)
    assert not any(p.grad is not None for p in trunk.parameters())

    out = bench_training(trunk, batches, epochs=1, warmup=0, repeats=1, num_classes=3)
    assert out["epochs"] == 1 and out["n_images"] == 8
    assert all(positive_finite(out[k]) for k in ("cached_ms", "through_trunk_ms", "extract_ms", "speedup"))


def test_check_goals_compares_with_the_issue_bounds():
    cases = {
        "heads": {"cases": [{"n_heads": 32, "n_mlp": 8, "ratio": 2.0}, {"n_heads": 32, "n_mlp": 0, "ratio": 1.01}]},
        "separate": {"n_models": 8, "speedup": 5.0},
        "training": {"speedup": 80.0},
    }
    goals = check_goals(cases)
    assert set(goals) == set(GOALS)
    assert goals["linear32_vs_trunk"]["value"] == 1.01 and goals["linear32_vs_trunk"]["passed"] is True
    assert goals["shared8_speedup"]["passed"] is False
    assert goals["cached_training_speedup"]["passed"] is True
    cases["heads"]["cases"].pop()
    cases["separate"]["n_models"] = 2
    goals = check_goals(cases)
    assert goals["linear32_vs_trunk"]["passed"] is None and goals["shared8_speedup"]["value"] is None


def check_result(result: dict) -> None:
    assert result["model"] == "test_resnet" and result["image_size"] == 32 and result["device"] == "cpu"
    assert result["torch"] == torch.__version__ and result["batch_size"] == 2
    assert set(result["cases"]) == {"heads", "separate", "training"}
    assert set(result["goals"]) == set(GOALS)
    for goal in result["goals"].values():
        assert positive_finite(goal["value"]) and isinstance(goal["passed"], bool)


def test_run_benchmark_writes_json_and_a_table(tmp_path):
    result = run_benchmark(BenchTrunk("test_resnet", image_size=32), mix=HeadMix(counts=(1,)), batch_size=2,
                           n_batches=1, warmup=0, repeats=1, separate_repeats=1, train_repeats=1, n_models=8,
                           train_epochs=1)
    check_result(result)
    path = write_result(result, tmp_path / "out" / "cpu.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    table = format_table(result)
    assert "trunk+32 linear (32L/0M)" in table and "8 separate models" in table
    assert table.count("PASS") + table.count("FAIL") == 3


def test_tool_config_composes_and_runs(tmp_path, capsys):
    from tools.bench import run
    from tools.common import CONF_DIR

    out = tmp_path / "bench.json"
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="bench", overrides=[
            "model=test_resnet", "image_size=32", "batch_size=2", "n_batches=1", "warmup=0", "repeats=1",
            "separate_repeats=1", "train_repeats=1", "head_counts=[1]", "train_epochs=1", "device=cpu",
            f"output={out}"])
    assert cfg.n_models == 8 and list(cfg.linear_only) == [32]
    result = run(cfg)
    check_result(result)
    assert json.loads(out.read_text())["goals"] == json.loads(json.dumps(result["goals"]))
    assert result["command"] == "python -m tools.bench" and result["created"].endswith("Z")
    assert f"wrote {out}" in capsys.readouterr().out


def test_pipeline_benchmark_measures_every_stage_on_the_same_files(tmp_path):
    from benchmarks.pipeline import format_pipeline_table, run_pipeline_benchmark, write_photos

    result = run_pipeline_benchmark(BenchTrunk("test_resnet", image_size=32), n_images=8, photo_size=(96, 64), batch_size=4,
                                    num_workers=0, n_heads=3, warmup=0, repeats=2, images_dir=tmp_path / "img")
    ips = result["images_per_s"]
    assert set(ips) == {"decode", "decode_full", "trunk", "end_to_end", "end_to_end_no_monitor",
                        "trunk_monitor"} and all(v > 0 for v in ips.values())
    assert result["monitor_time_ratio"] > 0 and "monitor=false end to end" in format_pipeline_table(result)
    assert result["goal"]["value"] == result["end_to_end_vs_slowest_stage"] > 0
    assert 0 < result["shared_cores_bound"] < min(ips["decode"], ips["trunk"])
    assert result["bottleneck"] in ("decode", "trunk") and result["n_heads"] == 3
    assert "end to end (files -> Parquet)" in format_pipeline_table(result)
    # The generated files are kept and reused.
    files = sorted((tmp_path / "img").iterdir())
    assert len(files) == 8 and write_photos(tmp_path / "img", 8, size=(96, 64)) == files
