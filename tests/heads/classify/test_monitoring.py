"""Monitoring stats streamed by bulk classification: per shard, exact on resume, and a drift proof with a known shift."""

# ruff: noqa: F811  (fixtures imported from a sibling test module are redefined as arguments)
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from heads.bank import HeadBank
from heads.classify.engine import SUCCESS_FILE, classify
from heads.classify.output import (
    MONITOR_FILE,
    foreign_files,
    shard_monitor_name,
    shard_name,
)
from heads.modules import LinearHead
from heads.monitor.drift import DriftThresholds
from heads.monitor.reference import HeadReference
from heads.monitor.stats import load_run_stats, row_keys
from heads.predict import MONITOR_SEED, MonitorStats
from heads.store import LoadedHead
from tests.heads.classify.test_engine import ROWS_PER_SHARD, bank, inputs, release  # noqa: F401  (fixtures)
from trunk.preprocess import eval_transform
from trunk.seen import content_sha


def run(trunk, bank, inputs, out, release, **kw):
    return classify(trunk, bank, inputs, out, release=release, batch_size=2, rows_per_shard=ROWS_PER_SHARD,
                    progress=False, **kw)


def same_stats(a: MonitorStats, b: MonitorStats, atol: float | None = None) -> bool:
    """Counts, histograms and sampled rows' keys exact; moments and sampled values bit for bit, or
    (``atol`` given) up to float rounding."""
    if set(a.predictions) != set(b.predictions) or set(a.features) != set(b.features):
        return False
    for n, p in a.predictions.items():
        if not (torch.equal(p.label_counts, b.predictions[n].label_counts)
                and torch.equal(p.score_counts, b.predictions[n].score_counts)):
            return False
    for t, f in a.features.items():
        g = b.features[t]
        if f.count != g.count or not torch.equal(f.sample_keys, g.sample_keys):
            return False
        pairs = ((f.mean, g.mean), (f.m2, g.m2), (f.sample, g.sample))
        if atol is None and not all(torch.equal(x, y) for x, y in pairs):
            return False
        if atol is not None and not all(torch.allclose(x.double(), y.double(), atol=atol, rtol=1e-5)
                                        for x, y in pairs):
            return False
    return True


def test_job_stats_count_every_decoded_row_and_sample_by_content_hash(tmp_path, tiny_trunk, bank, inputs, release):
    out = tmp_path / "out"
    summary = run(tiny_trunk, bank, inputs, out, release)
    preds, feats, meta = load_run_stats(out / MONITOR_FILE)
    table = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pydict()
    ok = [i for i, e in enumerate(table["error"]) if e is None]
    for head in bank.names:
        labels = [table[f"{head}_label"][i] for i in ok]
        assert dict(zip(preds[head].classes, preds[head].label_counts.tolist())) == {
            c: labels.count(c) for c in bank.classes[head]}
        assert summary["monitor"]["heads"][head]["predictions"] == len(ok)
    # The tap's stats are those of the decoded images' pooled features, sampled by their sha256.
    transform = eval_transform(tiny_trunk.data_config)
    x = torch.stack([transform(Image.open(table["path"][i]).convert("RGB")) for i in ok])
    with torch.no_grad():
        pooled = tiny_trunk(x, ["pooled"])["pooled"]
    pooled_stats = feats["pooled"]
    assert pooled_stats.count == len(ok)
    assert torch.allclose(pooled_stats.mean, pooled.double().mean(0), atol=1e-5)
    assert torch.allclose(pooled_stats.var, pooled.double().var(0), atol=1e-5)
    keys = row_keys([table["sha256"][i] for i in ok], MONITOR_SEED)
    assert sorted(pooled_stats.sample_keys.tolist()) == sorted(keys.tolist())
    assert meta["fingerprint"] == summary["fingerprint"]
    assert summary["monitor"]["file"] == MONITOR_FILE
    # Every committed shard has its stats beside it, and the folder check accepts them.
    for k in range(3):
        assert (out / shard_monitor_name(k)).is_file()
    assert foreign_files(out) == []
    # Readers of the folder as one Parquet dataset see only the shards (the stats files start with '_').
    assert pq.read_table(out).num_rows == len(inputs)


def test_a_resumed_job_has_exactly_the_stats_of_a_clean_run(tmp_path, tiny_trunk, bank, inputs, release):
    clean = tmp_path / "clean"
    run(tiny_trunk, bank, inputs, clean, release)
    want = MonitorStats.load(clean / MONITOR_FILE)

    # Killed after committing shard 0 only; then killed between shard 1's stats and shard 1 itself.
    resumed = tmp_path / "resumed"
    run(tiny_trunk, bank, inputs, resumed, release)
    for name in (SUCCESS_FILE, MONITOR_FILE, shard_name(1), shard_name(2), shard_monitor_name(2)):
        (resumed / name).unlink()
    kept = os.stat(resumed / shard_name(0)).st_ino
    summary = run(tiny_trunk, bank, inputs, resumed, release)
    assert summary["shards_reused"] == 1 and summary["shards_written"] == 2
    assert os.stat(resumed / shard_name(0)).st_ino == kept
    assert same_stats(MonitorStats.load(resumed / MONITOR_FILE), want)


def test_a_shard_without_stats_is_recomputed_and_its_rows_kept(tmp_path, tiny_trunk, bank, inputs, release):
    clean = tmp_path / "clean"
    run(tiny_trunk, bank, inputs, clean, release)
    out = tmp_path / "out"
    bare = run(tiny_trunk, bank, inputs, out, release, monitor=False)
    assert bare["monitor"] is None
    assert not list(out.glob("*.safetensors"))
    (out / SUCCESS_FILE).unlink()
    inode = os.stat(out / shard_name(1)).st_ino
    summary = run(tiny_trunk, bank, inputs, out, release)
    assert summary["shards_written"] == 0 and summary["shards_reused"] == 0
    assert os.stat(out / shard_name(1)).st_ino == inode  # the committed rows stay as they were
    assert same_stats(MonitorStats.load(out / MONITOR_FILE), MonitorStats.load(clean / MONITOR_FILE))


def test_a_damaged_shard_stats_file_is_set_aside_and_recomputed(tmp_path, tiny_trunk, bank, inputs, release):
    clean = tmp_path / "clean"
    run(tiny_trunk, bank, inputs, clean, release)
    out = tmp_path / "out"
    run(tiny_trunk, bank, inputs, out, release)
    (out / SUCCESS_FILE).unlink()
    (out / MONITOR_FILE).unlink()
    (out / shard_monitor_name(0)).write_bytes(b"garbage")
    run(tiny_trunk, bank, inputs, out, release)
    assert same_stats(MonitorStats.load(out / MONITOR_FILE), MonitorStats.load(clean / MONITOR_FILE))


def test_monitor_stats_survive_json_exactly(tmp_path, tiny_trunk, bank, inputs, release):
    out = tmp_path / "out"
    run(tiny_trunk, bank, inputs, out, release)
    stats = MonitorStats.load(out / MONITOR_FILE)
    assert same_stats(MonitorStats.from_json(stats.to_json()), stats)


# ----------------------------------------------------------------------------- proof: a known shift

PROOF = {"input_size": [3, 32, 32], "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def colour_blind_pooled_trunk():
    """test_resnet whose ``pooled`` tap sees only R+G+B per pixel, while its stem (``act1``) sees colour.

    Stem channels 0-7 are grey filters (equal weights on R, G, B); the next stem convs and
    everything from layer2 on read only the grey channels (the colour channels reach layer1
    only through its residual). With a per-channel-equal normalisation, a permutation of
    the RGB channels leaves ``pooled`` unchanged (up to float rounding), by construction.
    """
    from trunk.model import Trunk

    base = Trunk("test_resnet", data_config=PROOF)
    m = base.model
    with torch.no_grad():
        c0, c3, c6 = m.conv1[0], m.conv1[3], m.conv1[6]
        c0.weight[:8] = c0.weight[:8].mean(dim=1, keepdim=True)
        c3.weight[:8, 8:] = 0
        c6.weight[:16, 8:] = 0
        m.layer1[0].conv1.weight[:, 16:] = 0
        m.layer2[0].conv1.weight[:, 16:] = 0
        m.layer2[0].downsample[1].weight[:, 16:] = 0
    return Trunk("test_resnet", data_config=PROOF, state_dict=m.state_dict())


def shapes(folder, n: int, seed: int, rotate_channels: bool = False) -> list[str]:
    """Synthetic images (demo.shapes.render), objects red or yellow; rotated: R->G->B->R (red -> green, yellow -> cyan)."""
    from demo.shapes import ATTRIBUTES, render

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        labels = {a: v[int(rng.integers(len(v)))] for a, v in ATTRIBUTES.items()}
        labels["colour"] = ("red", "yellow")[int(rng.integers(2))]
        arr = np.asarray(render(np.random.default_rng([seed, i]), labels, "large", 32))
        if rotate_channels:
            arr = arr[..., [2, 0, 1]]
        Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def features_of(trunk, paths, taps):
    transform = eval_transform(trunk.data_config)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return trunk(x, taps)


def test_a_colour_shift_flags_the_head_that_sees_colour_and_not_the_other(tmp_path, one_thread):
    trunk = colour_blind_pooled_trunk()
    torch.manual_seed(0)
    colour = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(trunk.tap("act1").channels, 2)).eval()
    count = LinearHead(trunk.tap("pooled").channels, 4).eval()
    heads = {"colour": LoadedHead(colour, {"name": "colour", "tap": "act1", "classes": ["red", "yellow"]}),
             "count": LoadedHead(count, {"name": "count", "tap": "pooled", "classes": ["1", "2", "3", "4"]})}
    bank = HeadBank(heads)

    # References: each head's validation predictions and its training features at its tap.
    train, val = shapes(tmp_path / "train", 160, seed=1), shapes(tmp_path / "val", 120, seed=2)
    f_train, f_val = features_of(trunk, train, ["act1", "pooled"]), features_of(trunk, val, ["act1", "pooled"])
    keys = row_keys([content_sha(p) for p in train], MONITOR_SEED)
    with torch.no_grad():
        references = {name: HeadReference.build(heads[name].module(f_val[heads[name].tap]), heads[name].classes,
                                                f_train[heads[name].tap], tap=heads[name].tap, train_keys=keys,
                                                seed=MONITOR_SEED, meta={"head": name})
                      for name in heads}
    thresholds = {name: DriftThresholds() for name in heads}
    release = {"name": "release", "version": "1", "trunk_id": trunk.trunk_id, "heads": {"colour": 1, "count": 1}}

    from registry.jobs.monitor import assess_job

    verdicts = {}
    for name, rotate in (("same", False), ("shifted", True)):
        paths = shapes(tmp_path / name, 120, seed=3, rotate_channels=rotate)
        out = tmp_path / f"out-{name}"
        classify(trunk, bank, paths, out, release=release, batch_size=32, rows_per_shard=50, progress=False)
        drifts, unreferenced = assess_job(out / MONITOR_FILE, references, thresholds)
        assert unreferenced == []
        verdicts[name] = {d.head: d for d in drifts}

    assert {h: d.verdict for h, d in verdicts["same"].items()} == {"colour": "ok", "count": "ok"}
    shifted = verdicts["shifted"]
    assert shifted["colour"].verdict == "drift" and shifted["colour"].feature_verdict == "drift"
    assert "input drift at tap 'act1'" in shifted["colour"].reason
    assert shifted["count"].verdict == "ok", shifted["count"].reason
    # The count head's tap cannot see the shift: its figures are the no-shift run's.
    assert shifted["count"].feature_p == pytest.approx(verdicts["same"]["count"].feature_p, abs=0.01)
