"""backend=ray on a real local Ray cluster (2 CPUs): the same rows as the local backend.

One Ray per module: starting it costs seconds. The cluster is started by the test, as a
user's script would (``ray.init(num_cpus=2)``), and :func:`heads.classify.engine.classify` uses
the Ray it finds.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from heads.classify.engine import SUCCESS_FILE, classify
from heads.classify.output import JOB_FILE, shard_provenance
from tests.badcorpus import make_bad_corpus, make_good_images
from tests.heads.classify.driver import make_bank

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def inputs(tmp_path):
    good = [str(p) for p in make_good_images(tmp_path / "good", 30, size=40, seed=5)]
    bad = [str(c.path) for c in make_bad_corpus(tmp_path / "bad") if c.kind in ("html_as_jpg", "truncated_jpeg",
                                                                                 "vanished", "exif_rotated")]
    return good[:10] + bad[:2] + good[10:25] + bad[2:] + good[25:]


def _run(trunk, bank, paths, out, backend, **kw):
    return classify(trunk, bank, paths, out, release={"version": "2", "trunk_id": trunk.trunk_id}, batch_size=4,
                    rows_per_shard=9, progress=False, backend=backend, num_workers=0,
                    ray_options={"actors": 2, "decode_cpus": 0.5, "actor_cpus": 0.5}, **kw)


def _table(out):
    return pq.read_table(out).to_pylist()


def _same_rows(a: list[dict], b: list[dict]) -> None:
    """Same paths, hashes, errors and labels; scores equal up to float rounding.

    Same batches and same code, but the actors' torch runs with its own thread count, and
    a convolution split over other threads may round its last bits differently.
    """
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            if key.endswith("_score") and x[key] is not None:
                assert x[key] == pytest.approx(y[key], abs=1e-6), key
            else:
                assert x[key] == y[key], key


def test_ray_backend_writes_the_local_rows(local_ray, tmp_path, tiny_trunk, inputs):
    bank = make_bank(tiny_trunk)
    local = _run(tiny_trunk, bank, inputs, tmp_path / "local", "local")
    remote = _run(tiny_trunk, bank, inputs, tmp_path / "ray", "ray")
    _same_rows(_table(tmp_path / "ray"), _table(tmp_path / "local"))
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
    for key in ("fingerprint", "counts", "errors_by_reason", "schema", "release"):
        assert remote[key] == local[key]
    assert remote["backend"] == "ray" and remote["shards_written"] == remote["counts"]["shards"]
    # The same Parquet key-value metadata (provenance and Arrow's schema), shard by shard.
    shards = sorted(p.name for p in (tmp_path / "local").glob("part-*.parquet"))
    assert len(shards) == remote["counts"]["shards"]
    for name in shards:
        assert (pq.read_metadata(tmp_path / "ray" / name).metadata
                == pq.read_metadata(tmp_path / "local" / name).metadata), name
        assert shard_provenance(tmp_path / "ray" / name)["job"]["fingerprint"] == local["fingerprint"]
    # The same monitoring stats: counts and sampled rows exact, floats up to the actors' thread rounding (above).
    from heads.classify.output import MONITOR_FILE
    from heads.predict import MonitorStats
    from tests.heads.classify.test_monitoring import same_stats

    assert remote["monitor"]["heads"] == local["monitor"]["heads"]
    # Ray's workers run other thread counts: moments agree up to float rounding.
    assert same_stats(MonitorStats.load(tmp_path / "ray" / MONITOR_FILE),
                      MonitorStats.load(tmp_path / "local" / MONITOR_FILE), atol=1e-5)


def test_ray_reads_a_streamed_input_in_windows_and_writes_the_local_rows(local_ray, tmp_path, tiny_trunk, inputs):
    """What tools.classify sends (a re-iterable stream, never a list) through Ray, two planned
    windows of 6 batches (one Ray Dataset each): the rows of the local run on the list."""
    from trunk.images import InputStream

    bank = make_bank(tiny_trunk)
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("\n".join(inputs) + "\n")
    local = _run(tiny_trunk, bank, inputs, tmp_path / "local", "local")
    remote = classify(tiny_trunk, bank, InputStream(manifest), tmp_path / "ray",
                      release={"version": "2", "trunk_id": tiny_trunk.trunk_id}, batch_size=4, rows_per_shard=9,
                      progress=False, backend="ray", num_workers=0,
                      ray_options={"actors": 1, "decode_cpus": 0.5, "actor_cpus": 0.5, "window_batches": 6})
    _same_rows(_table(tmp_path / "ray"), _table(tmp_path / "local"))
    assert remote["fingerprint"] == local["fingerprint"] and remote["counts"] == local["counts"]


def test_ray_resumes_what_another_run_left(local_ray, tmp_path, tiny_trunk, inputs):
    bank = make_bank(tiny_trunk)
    out = tmp_path / "out"
    _run(tiny_trunk, bank, inputs, out, "local")
    clean = _table(out)
    # As if the job had been killed: two shards and _SUCCESS.json never made it.
    for name in ("part-00001.parquet", "part-00003.parquet", SUCCESS_FILE):
        (out / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # ... and killed holding claims: on shard 3 (not committed) and shard 0 (committed, not yet released).
    import subprocess
    import sys

    from heads.classify.output import ShardClaims, claim_files, claim_name, job_id

    job = job_id(json.loads((out / JOB_FILE).read_text())["fingerprint"])
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    for k in (0, 3):
        (out / claim_name(job, k, 0)).write_text(json.dumps({**ShardClaims(out, job).record, "pid": dead}))
    resumed = _run(tiny_trunk, bank, inputs, out, "ray")
    assert resumed["shards_written"] == 2 and resumed["shards_reused"] == resumed["counts"]["shards"] - 2
    assert resumed["shards_taken_over"] == 1 and resumed["shards_by_others"] == 0 and not claim_files(out, job)
    _same_rows(_table(out), clean)
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items())
    assert json.loads((out / SUCCESS_FILE).read_text())["fingerprint"] == json.loads((out / JOB_FILE).read_text())["fingerprint"]
    # Finished: a rerun on either backend writes nothing.
    again = _run(tiny_trunk, bank, inputs, out, "ray")
    assert again == resumed


def test_ray_backend_keeps_a_name_that_is_not_utf8(local_ray, tmp_path, tiny_trunk, inputs):
    # Before: Arrow refused the surrogates of such a name when the batches were planned.
    import os

    from trunk.images import path_from_text, path_text

    odd = os.fsdecode(os.fsencode(inputs[0]).rsplit(b"/", 1)[0] + b"/bad\xff\xfe.png")
    os.link(inputs[0], odd)
    paths = inputs[:5] + [odd] + inputs[5:12]
    bank = make_bank(tiny_trunk)
    _run(tiny_trunk, bank, paths, tmp_path / "local", "local")
    remote = _run(tiny_trunk, bank, paths, tmp_path / "ray", "ray")
    got = _table(tmp_path / "ray")
    _same_rows(got, _table(tmp_path / "local"))
    assert [path_from_text(r["path"]) for r in got] == paths and got[5]["path"] == path_text(odd)
    assert got[5]["error"] is None and got[5]["shape_label"] == got[0]["shape_label"]
    assert remote["counts"]["images"] == len(paths)


def test_bad_ray_option_is_one_line(tmp_path, tiny_trunk, inputs):
    with pytest.raises(ValueError, match=r"field 'ray.actor': unknown"):
        classify(tiny_trunk, make_bank(tiny_trunk), inputs, tmp_path / "out", release={"version": "1"},
                 backend="ray", ray_options={"actor": 2}, progress=False)
    with pytest.raises(ValueError, match=r"field 'ray.actors': must be positive, got 0"):
        classify(tiny_trunk, make_bank(tiny_trunk), inputs, tmp_path / "out", release={"version": "1"},
                 backend="ray", ray_options={"actors": 0}, progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_decoding_is_a_stage_of_its_own(local_ray, tiny_trunk, inputs):
    from heads.classify.engine import plan_batches
    from heads.classify.ray_backend import DEFAULTS, build_dataset
    from trunk.preprocess import eval_transform

    bank = make_bank(tiny_trunk)
    jobs = plan_batches(len(inputs), 9, 4, [0, 1])
    opts = {**DEFAULTS, "decode_cpus": 0.5, "actor_cpus": 0.5, "actors": 1}
    ds = build_dataset(tiny_trunk, bank, inputs, jobs, eval_transform(tiny_trunk.data_config), None,
                       gpus=0, amp=False, options=opts)
    rows = ds.take_all()
    assert sorted((r["shard"], r["batch"]) for r in rows) == [(j.shard, j.batch) for j in jobs]
    stats = ds.stats()
    # Not fused into "Map(_decode)->Map(_Predict)": decoding runs as tasks, the model in actors.
    assert "Map(_decode)->Map(_Predict)" not in stats
    assert "Map(_decode)" in stats and "Map(_Predict)" in stats


def test_batches_cross_stages_as_plain_data_exactly(tiny_trunk, inputs):
    import torch

    from heads.classify.ray_backend import pack_batch, unpack_batch
    from trunk.loader import decode_batch
    from trunk.preprocess import eval_transform

    transform = eval_transform(tiny_trunk.data_config)
    for indices in ([0, 1, 10, 11, 12], [10, 11]):  # good and bad mixed; bad only (no pixels)
        batch = decode_batch(indices, [inputs[i] for i in indices], transform)
        packed = pack_batch(batch)
        assert set(packed) == {"meta", "pixels"} and isinstance(packed["pixels"], bytes)
        back = unpack_batch(packed["meta"], packed["pixels"])
        assert (back.indices, back.paths, back.shas, back.errors) == \
            (batch.indices, batch.paths, batch.shas, batch.errors)
        assert back.pixels.dtype == batch.pixels.dtype and torch.equal(back.pixels, batch.pixels)
    with pytest.raises(KeyError):  # an unknown dtype is refused, never interpreted
        unpack_batch(json.dumps({**json.loads(packed["meta"]), "dtype": "object"}), b"")
