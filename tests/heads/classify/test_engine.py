"""Bulk classification on a real tiny trunk, real heads, real files and real Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from heads.bank import HeadBank
from heads.classify.engine import JOB_FILE, SUCCESS_FILE, classify
from heads.modules import LinearHead, MLPHead
from heads.classify.output import job_id, shard_provenance
from heads.store import LoadedHead
from trunk.decode import load_image
from trunk.preprocess import eval_transform

ROWS_PER_SHARD = 3


@pytest.fixture
def bank(tiny_trunk):
    width = tiny_trunk.tap("pooled").channels
    torch.manual_seed(0)
    modules = {"shape": (LinearHead(width, 4), 4), "colour": (LinearHead(width, 3, dropout=0.2), 3),
               "count": (MLPHead(width, 5, hidden=8), 5)}
    heads = {}
    for name, (module, n_classes) in modules.items():
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.5)
        classes = [f"{name}{i}" for i in range(n_classes)]
        heads[name] = LoadedHead(module.eval(), {"name": name, "tap": "pooled", "classes": classes})
    return HeadBank(heads)


@pytest.fixture
def release(tiny_trunk):
    return {"name": "release", "version": "3", "trunk_version": "1", "trunk_id": tiny_trunk.trunk_id,
            "heads": {"colour": "2", "count": "1", "shape": "5"}}


@pytest.fixture
def inputs(tmp_path, image_factory):
    """Shard 0 holds a text file named .jpg; shard 2 is all errors (missing, empty)."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 20), (20, 220, 220)]
    good = [image_factory(f"img/good{i}.png", color=c, size=36 + 4 * i, seed=i) for i, c in enumerate(colours)]
    bad = tmp_path / "img" / "notes.jpg"
    bad.write_text("this is not an image\n")
    empty = tmp_path / "img" / "empty.jpg"
    empty.write_bytes(b"")
    missing = tmp_path / "img" / "gone.jpg"
    return [str(p) for p in [good[0], good[1], bad, good[2], good[3], good[4], missing, empty]]


def expected_columns(heads: list[str]) -> list[tuple[str, pa.DataType]]:
    cols = [("path", pa.string()), ("sha256", pa.string()), ("error", pa.string())]
    for h in heads:
        cols += [(f"{h}_label", pa.string()), (f"{h}_score", pa.float32())]
    return cols


def listing(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


def run(tiny_trunk, bank, inputs, out, release):
    return classify(tiny_trunk, bank, inputs, out, release=release, batch_size=2,
                    rows_per_shard=ROWS_PER_SHARD, progress=False)


def test_one_row_per_input_with_contract_schema(tmp_path, tiny_trunk, bank, inputs, release):
    out = tmp_path / "out"
    summary = run(tiny_trunk, bank, inputs, out, release)

    assert sorted(p.name for p in out.iterdir()) == sorted([
        JOB_FILE, SUCCESS_FILE, "_MONITOR.safetensors", "part-00000.parquet", "part-00001.parquet",
        "part-00002.parquet", "_part-00000.monitor.safetensors", "_part-00001.monitor.safetensors",
        "_part-00002.monitor.safetensors"])
    want = expected_columns(["colour", "count", "shape"])
    for k in range(3):
        schema = pq.read_schema(out / f"part-{k:05d}.parquet")
        assert [(f.name, f.type) for f in schema] == want  # same types even in the all-error shard
    rows = pa.concat_tables([pq.read_table(out / f"part-{k:05d}.parquet") for k in range(3)]).to_pylist()
    assert [r["path"] for r in rows] == inputs

    by_path = {r["path"]: r for r in rows}
    notes, gone, empty = by_path[inputs[2]], by_path[inputs[6]], by_path[inputs[7]]
    assert notes["error"].startswith("not an image") and notes["sha256"] is not None
    assert gone["error"].startswith("file not found") and gone["sha256"] is None
    assert empty["error"].startswith("empty file")
    for r in (notes, gone, empty):
        assert all(r[f"{h}_label"] is None and r[f"{h}_score"] is None for h in bank.names)

    # Good rows: what the bank says on a direct forward of the same images.
    good = [p for p in inputs if by_path[p]["error"] is None]
    assert len(good) == 5
    transform = eval_transform(tiny_trunk.data_config)
    loaded = [load_image(p) for p in good]
    x = torch.stack([transform(img) for img, _ in loaded])
    with torch.inference_mode():
        direct = bank.predict(tiny_trunk(x, bank.taps))
    for i, p in enumerate(good):
        assert by_path[p]["sha256"] == loaded[i][1]
        for h in bank.names:
            labels, scores = direct[h]
            assert by_path[p][f"{h}_label"] == labels[i]
            assert by_path[p][f"{h}_score"] == pytest.approx(scores[i].item(), abs=1e-5)

    assert summary["counts"] == {"images": 8, "ok": 5, "errors": 3, "shards": 3}
    assert summary["errors_by_reason"] == {"empty file": 1, "file not found": 1, "not an image": 1}
    assert summary["release"] == release
    assert summary["heads"] == ["colour", "count", "shape"]
    assert summary["schema"] == [c for c, _ in want]
    assert summary["images_per_s"] > 0 and summary["seconds"] > 0
    assert json.loads((out / SUCCESS_FILE).read_text()) == summary
    assert json.loads((out / JOB_FILE).read_text())["fingerprint"] == summary["fingerprint"]


def test_rerun_writes_nothing(tmp_path, tiny_trunk, bank, inputs, release):
    out = tmp_path / "out"
    first = run(tiny_trunk, bank, inputs, out, release)
    before = listing(out)
    again = run(tiny_trunk, bank, inputs, out, release)
    assert again == first
    assert listing(out) == before


def test_resume_rewrites_only_the_missing_shard(tmp_path, tiny_trunk, bank, inputs, release):
    # Inputs whose last shard has images, so the rewrite runs the trunk.
    inputs = inputs[:6]
    out = tmp_path / "out"
    first = run(tiny_trunk, bank, inputs, out, release)
    last = out / "part-00001.parquet"
    original = last.read_bytes()
    last.unlink()
    (out / SUCCESS_FILE).unlink()
    kept = listing(out)

    resumed = run(tiny_trunk, bank, inputs, out, release)
    after = listing(out)
    for name, stat in kept.items():
        assert after[name] == stat  # shard 0 and _JOB.json untouched
    assert last.read_bytes() == original
    assert sorted(after) == sorted([*kept, last.name, SUCCESS_FILE])
    assert resumed["shards_reused"] == 1
    assert resumed["counts"] == first["counts"] and resumed["fingerprint"] == first["fingerprint"]


def test_foreign_job_is_refused(tmp_path, tiny_trunk, bank, inputs, release):
    out = tmp_path / "out"
    run(tiny_trunk, bank, inputs, out, release)
    other = {**release, "version": "4"}
    with pytest.raises(ValueError, match=rf"{out / SUCCESS_FILE}: holds another job's output \(field 'release'"):
        run(tiny_trunk, bank, inputs, out, other)
    (out / SUCCESS_FILE).unlink()  # an unfinished job is just as foreign
    before = listing(out)
    with pytest.raises(ValueError, match=rf"{out / JOB_FILE}: holds another job's output \(field 'images'"):
        run(tiny_trunk, bank, inputs[:-1], out, release)
    assert listing(out) == before


def test_release_for_another_trunk_is_refused(tmp_path, tiny_trunk, bank, inputs, release):
    with pytest.raises(ValueError, match="release field 'trunk_id' is deadbeef"):
        run(tiny_trunk, bank, inputs, tmp_path / "out", {**release, "trunk_id": "deadbeef"})
    assert not (tmp_path / "out").exists()


def test_damaged_shard_is_rewritten(tmp_path, tiny_trunk, bank, inputs, release):
    out = tmp_path / "out"
    run(tiny_trunk, bank, inputs, out, release)
    first = out / "part-00000.parquet"
    original = first.read_bytes()
    first.write_bytes(original[: len(original) // 2])  # not a shard a clean run could leave
    job = job_id(json.loads((out / JOB_FILE).read_text())["fingerprint"])
    (out / f".vtp-{job}.part-00001.parquet.999.0123abcd.tmp").write_bytes(b"half a shard from a killed run")
    (out / SUCCESS_FILE).unlink()
    resumed = run(tiny_trunk, bank, inputs, out, release)
    assert first.read_bytes() == original
    assert resumed["shards_reused"] == 2
    assert not list(out.glob(".*.tmp"))
    # The damaged shard is kept, set aside under the job's own name.
    assert [p.name.startswith(f".vtp-{job}.part-00000.parquet.damaged-") for p in out.glob(".*")] == [True]


def test_every_shard_says_where_it_came_from(tmp_path, tiny_trunk, bank, inputs, release):
    out = tmp_path / "out"
    summary = run(tiny_trunk, bank, inputs, out, release)
    for k in range(3):
        copy = tmp_path / f"copied-{k}.parquet"  # away from its folder and its _JOB.json
        copy.write_bytes((out / f"part-{k:05d}.parquet").read_bytes())
        got = shard_provenance(copy)
        assert got["release"] == release
        assert got["trunk"] == {"version": "1", "trunk_id": tiny_trunk.trunk_id}
        assert got["heads"] == {name: {"version": release["heads"][name], "classes": bank.classes[name]}
                                for name in ("colour", "count", "shape")}
        assert got["job"]["fingerprint"] == summary["fingerprint"] and got["job"]["id"] == summary["fingerprint"][:16]
        assert got["job"]["settings"] == summary["settings"] and got["job"]["shards"] == 3
        assert got["shard"] == {"index": k, "first_row": 3 * k, "rows": [3, 3, 2][k]}
        assert pq.read_metadata(copy).metadata[b"ARROW:schema"]  # Arrow's own key is still there


def test_another_jobs_shard_is_set_aside_and_recomputed(tmp_path, tiny_trunk, bank, inputs, release):
    # Same heads, same row count, same schema: only the provenance tells the shards apart.
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    run(tiny_trunk, bank, inputs, ours, release)
    run(tiny_trunk, bank, list(reversed(inputs[:3])) + inputs[3:], theirs, release)
    original = (ours / "part-00000.parquet").read_bytes()
    (ours / "part-00000.parquet").unlink()
    (ours / SUCCESS_FILE).unlink()
    (ours / "part-00000.parquet").write_bytes((theirs / "part-00000.parquet").read_bytes())
    resumed = run(tiny_trunk, bank, inputs, ours, release)
    assert resumed["shards_reused"] == 2 and resumed["shards_written"] == 1
    assert (ours / "part-00000.parquet").read_bytes() == original
    assert [r["path"] for r in pq.read_table(ours / "part-00000.parquet").to_pylist()] == inputs[:3]
    job = resumed["fingerprint"][:16]
    assert [p.name.startswith(f".vtp-{job}.part-00000.parquet.damaged-") for p in ours.glob(".*")] == [True]


def test_a_job_waits_for_the_shards_a_live_run_holds(tmp_path, tiny_trunk, bank, inputs, release):
    """Another host's live run holds shard 1 and commits it later; another's claim on shard 2 expires.

    The job computes shard 0, takes shard 2 over once its lease is out, and returns only when
    shard 1 is in, committed by the other run: the output is whole when it returns.
    """
    import os
    import threading
    import time

    from heads.classify.output import claim_files, claim_name

    clean, out = tmp_path / "clean", tmp_path / "out"
    run(tiny_trunk, bank, inputs, clean, release)
    job = job_id(json.loads((clean / JOB_FILE).read_text())["fingerprint"])
    out.mkdir()
    for k, lease in ((1, 60.0), (2, 1.0)):
        record = {"owner": "o" * 32, "host": "another-host", "pid": 1, "pid_start": None, "lease_s": lease}
        (out / claim_name(job, k, 0)).write_text(json.dumps(record))

    def other_run():  # commits shard 1 (its stats first), then releases its claim
        time.sleep(2.0)
        for name in ("_part-00001.monitor.safetensors", "part-00001.parquet"):
            os.link(clean / name, out / name)
        (out / claim_name(job, 1, 0)).unlink()

    other = threading.Thread(target=other_run)
    other.start()
    summary = run(tiny_trunk, bank, inputs, out, release)
    other.join()
    assert summary["shards_written"] == 2 and summary["shards_by_others"] == 1
    assert summary["shards_computed"] == 2 and summary["shards_taken_over"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir()) and not claim_files(out, job)
    for k in range(3):
        assert (out / f"part-{k:05d}.parquet").read_bytes() == (clean / f"part-{k:05d}.parquet").read_bytes()
    assert summary["counts"] == json.loads((clean / SUCCESS_FILE).read_text())["counts"]
