"""Exactly-once bulk output under SIGKILL and under two jobs racing on one folder.

Each job is a real process (:mod:`tests.heads.classify.driver`, forked by its fork server so
that twenty-odd jobs pay the imports once; the ones killed at random moments are fresh
interpreters, as slow after ``ready`` as a real job) killed with a real SIGKILL: at random moments while it works, and at the few narrow places a timer rarely
hits (half-written temp file, fsynced but not linked, linked but the folder not fsynced,
a shard claimed but not computed). After every kill the same job is started again; the
folder it finally leaves must hold exactly the rows a clean run writes. Two jobs on one
folder split the shards between them through claims, each shard computed once.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from heads.classify.output import JOB_FILE, MONITOR_FILE, SUCCESS_FILE, TEMP_GLOB, claim_files, job_id, pid_alive, shard_name
from heads.predict import MonitorStats
from tests.conftest import write_image
from tests.heads.classify.test_monitoring import same_stats
from tests.tools.toolserver import ForkServer

ROOT = Path(__file__).resolve().parents[3]
N_IMAGES = 120
ROWS_PER_SHARD = 10
N_SHARDS = -(-(N_IMAGES + 2) // ROWS_PER_SHARD)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("crash-images")
    rng = random.Random(0)
    lines = []
    for i in range(N_IMAGES):
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        fmt = "JPEG" if i % 3 == 0 else "PNG"
        p = write_image(folder / f"img{i:03d}.{fmt.lower()}", colour, size=24 + i % 17, seed=i, fmt=fmt)
        lines.append(str(p))
    (folder / "notes.jpg").write_text("<html>not an image</html>")
    lines.insert(37, str(folder / "notes.jpg"))
    lines.insert(80, str(folder / "vanished.png"))
    m = folder / "manifest.txt"
    m.write_text("\n".join(lines) + "\n")
    return m


class Job:
    """One job: a process forked by the :class:`Zygote`, with the part of ``Popen`` these tests use."""

    def __init__(self, zygote: "Zygote", argv: list[str]):
        self.zygote = zygote
        zygote.count += 1
        self.stdout_path = zygote.folder / f"job-{zygote.count}.out"
        self.stderr_path = zygote.folder / f"job-{zygote.count}.err"
        self.pid = zygote.ask(op="start", argv=argv, stdout=str(self.stdout_path), stderr=str(self.stderr_path))["pid"]
        self.returncode: int | None = None

    def _wait(self, timeout: float) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.ask(op="wait", pid=self.pid, timeout=timeout)["returncode"]
        return self.returncode

    def poll(self) -> int | None:
        return self._wait(0)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped yet, so the pid is still this job's
            os.kill(self.pid, sig)

    def communicate(self, timeout: float) -> tuple[str, str]:
        if self._wait(timeout) is None:
            raise subprocess.TimeoutExpired(f"job {self.pid}", timeout)
        return self.stdout_path.read_text(), self.stderr_path.read_text()

    def first_line(self, timeout: float = 300) -> str:
        """The job's first line of output, once it is whole (or all there is, if the job exited)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stdout_path.read_text() if self.stdout_path.exists() else ""
            if "\n" in text:
                return text.split("\n", 1)[0] + "\n"
            if self.poll() is not None:
                return self.stdout_path.read_text()
            time.sleep(0.005)
        return ""


class Zygote(ForkServer):
    """The driver's fork server (``driver --serve``): the imports once, a fresh child per job."""

    def __init__(self, folder: Path):
        self.folder, self.count = folder, 0
        super().__init__([sys.executable, "-m", "tests.heads.classify.driver", "--serve"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         err=folder / "zygote.err")


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("jobs"))
    yield z
    z.close()


def _start(zygote: Zygote, manifest: Path, out: Path, *extra: str) -> Job:
    return Job(zygote, [str(manifest), str(out), "--rows-per-shard", str(ROWS_PER_SHARD), *extra])


def _start_fresh(manifest: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A job in a fresh interpreter: for the kills at random moments, whose odds of landing
    depend on how long a job runs after ``ready`` (a forked one, its imports warm, is quicker)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.heads.classify.driver", str(manifest), str(out),
         "--rows-per-shard", str(ROWS_PER_SHARD), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )


def _finish(proc: Job) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _wait_ready(proc: Job | subprocess.Popen) -> None:
    if isinstance(proc, Job):
        line = proc.first_line()
        assert line.strip() == "ready", (line, proc.stderr_path.read_text()[-2000:] if proc.poll() is not None else "")
    else:
        line = proc.stdout.readline()
        assert line.strip() == "ready", (line, proc.stderr.read()[-2000:] if proc.poll() is not None else "")


def _rows(out: Path) -> list[dict]:
    shards = sorted(out.glob("part-*.parquet"))
    return [row for s in shards for row in pq.read_table(s).to_pylist()]


@pytest.fixture(scope="module")
def clean(zygote, manifest, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clean") / "out"
    return out, _finish(_start(zygote, manifest, out))


def test_clean_run_output(clean, manifest):
    out, result = clean
    rows = _rows(out)
    paths = [line for line in manifest.read_text().splitlines() if line]
    assert [r["path"] for r in rows] == paths
    summary = result["summary"]
    assert summary["counts"] == {"images": len(paths), "ok": len(paths) - 2, "errors": 2,
                                 "shards": -(-len(paths) // ROWS_PER_SHARD)}
    assert summary["errors_by_reason"] == {"file not found": 1, "not an image": 1}
    assert sorted(result["committed"]) == sorted([JOB_FILE, SUCCESS_FILE, MONITOR_FILE]
                                                 + [p.name for p in out.glob("*part-*")])


def _job(out: Path) -> str:
    return job_id(json.loads((out / JOB_FILE).read_text())["fingerprint"])


def _assert_same_as_clean(out: Path, clean_out: Path) -> None:
    assert _rows(out) == _rows(clean_out)
    assert sorted(p.name for p in out.glob("part-*")) == sorted(p.name for p in clean_out.glob("part-*"))
    # Byte for byte, metadata (each shard's provenance) included: nothing of the run that wrote it goes in.
    for shard in sorted(clean_out.glob("part-*.parquet")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert not list(out.glob(TEMP_GLOB)), "temp files left after the job finished"
    assert not claim_files(out, _job(out)), "claims left after the job finished"
    a, b = json.loads((out / SUCCESS_FILE).read_text()), json.loads((clean_out / SUCCESS_FILE).read_text())
    for key in ("fingerprint", "counts", "errors_by_reason", "release", "schema", "monitor"):
        assert a[key] == b[key], key
    # The monitoring stats too, bit for bit, however often the job was killed.
    assert same_stats(MonitorStats.load(out / MONITOR_FILE), MonitorStats.load(clean_out / MONITOR_FILE))


def test_sigkill_anywhere_then_restart_gives_the_clean_rows(zygote, manifest, clean, tmp_path):
    clean_out, _ = clean
    out = tmp_path / "out"
    # Aimed kills at the places a timer rarely hits, then kills at random moments.
    aimed = ["write:1", "link:2", "linked:3", "batch:9", "write:5", "link:1", "linked:1", "claimed:4"]
    rng = random.Random(1234)
    kills = 0
    for point in aimed:
        proc = _start(zygote, manifest, out, "--kill", point)
        proc.communicate(timeout=300)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
    for _ in range(6):
        proc = _start_fresh(manifest, out, "--workers", "1")
        _wait_ready(proc)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=300)
    print(f"kills: {kills} of {len(aimed) + 6}")
    assert kills >= 10
    # Killed runs left partial work behind: whole shards only, never a partial one.
    for shard in out.glob("part-*.parquet"):
        pq.read_metadata(shard)
    assert not (out / SUCCESS_FILE).exists() or len(list(out.glob("part-*"))) == N_SHARDS
    final = _finish(_start(zygote, manifest, out))
    _assert_same_as_clean(out, clean_out)
    # The restart only computed what the killed runs had not committed.
    assert final["summary"]["shards_written"] + final["summary"]["shards_reused"] == final["summary"]["counts"]["shards"]


def test_rerun_of_a_finished_job_writes_nothing(zygote, manifest, clean):
    clean_out, _ = clean
    before = {p.name: p.stat().st_mtime_ns for p in clean_out.iterdir()}
    again = _finish(_start(zygote, manifest, clean_out))
    assert again["committed"] == []
    assert {p.name: p.stat().st_mtime_ns for p in clean_out.iterdir()} == before


def test_two_jobs_on_one_folder_commit_each_shard_once(zygote, manifest, clean, tmp_path):
    clean_out, _ = clean
    out = tmp_path / "out"
    a = _start(zygote, manifest, out, "--batch-size", "4")
    b = _start(zygote, manifest, out, "--batch-size", "4")
    ra, rb = _finish(a), _finish(b)
    commits = ra["committed"] + rb["committed"]
    assert sorted(commits) == sorted(set(commits)), "a file was committed twice"
    assert sorted(commits) == sorted([JOB_FILE, SUCCESS_FILE, MONITOR_FILE]
                                     + [p.name for p in clean_out.glob("*part-*")])
    _assert_same_as_clean(out, clean_out)
    assert ra["summary"]["fingerprint"] == rb["summary"]["fingerprint"]
    # However the two overlapped, claims let no shard be computed twice.
    assert not set(ra["computed"]) & set(rb["computed"]), "a shard was computed by both jobs"
    assert sorted(ra["computed"] + rb["computed"]) == list(range(N_SHARDS))


def test_two_jobs_on_one_folder_split_the_shards(zygote, manifest, clean, tmp_path):
    clean_out, _ = clean
    out = tmp_path / "out"
    # Slow batches, and each job holds a claim before either computes: both work, by construction.
    extra = ("--batch-delay", "0.1", "--sync", str(tmp_path / "sync"), "--parties", "2")
    a, b = _start(zygote, manifest, out, *extra), _start(zygote, manifest, out, *extra)
    ra, rb = _finish(a), _finish(b)
    ca, cb = ra["computed"], rb["computed"]
    print(f"shards computed: {len(ca)} + {len(cb)} of {N_SHARDS}")
    assert len(ca) == len(set(ca)) and len(cb) == len(set(cb))
    assert not set(ca) & set(cb), "a shard was computed by both jobs"
    assert sorted(ca + cb) == list(range(N_SHARDS)), "a shard was never computed"
    assert ca and cb, "one job did all the work"
    commits = ra["committed"] + rb["committed"]
    assert sorted(commits) == sorted(set(commits)), "a file was committed twice"
    for result, mine in ((ra, ca), (rb, cb)):
        s = result["summary"]
        assert s["shards_computed"] == s["shards_written"] == len(mine)
        assert s["shards_by_others"] == N_SHARDS - len(mine)
        assert s["shards_reused"] == 0 and s["shards_taken_over"] == 0
    _assert_same_as_clean(out, clean_out)  # each job returned only once the output was whole


def test_a_killed_jobs_claim_is_taken_over(zygote, manifest, clean, tmp_path):
    clean_out, _ = clean
    out = tmp_path / "out"
    proc = _start(zygote, manifest, out, "--kill", "claimed:3")  # killed holding shard 2, not yet computed
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    left = claim_files(out, _job(out))
    for claim in left:
        record = json.loads(claim.read_text())
        assert record["pid"] == proc.pid and not pid_alive(record["pid"], record["pid_start"])
    shards = {int(re.search(r"claim-([0-9]+)\.", c.name).group(1)) for c in left}
    orphaned = {k for k in shards if not (out / shard_name(k)).exists()}
    assert 2 in orphaned
    final = _finish(_start(zygote, manifest, out))["summary"]
    assert final["shards_taken_over"] == len(orphaned)  # at once: the owner's pid is gone
    assert final["shards_written"] + final["shards_reused"] == N_SHARDS and final["shards_by_others"] == 0
    _assert_same_as_clean(out, clean_out)
