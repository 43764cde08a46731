"""Promotions racing: N promoter processes at once, on SQLite and through a real ``mlflow server``.

Every promoter is its own process (``promotion_worker.py``; started once per module, so the
platform is imported once per process), and all of them promote at the same instant: each
is armed (connected, its starting production read), then a start file releases them
together. What must hold on both stores: every passing head in production at the end, one
unbroken ``previous_production`` chain covering every release made, no error, and every
promotion but the first rebuilt on top of another team's (it lost the race and joined it).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from registry.store.heads import register_head
from registry.store.lease import EXPIRES_AT, HOLDER, LOCK_MODEL, TICKET_SOURCE, LeaseError, hold
from registry.store.releases import bootstrap_release, get_release, move_alias, production_version, promote_head
from registry.store.tracking import connect, ensure_registered_model
from registry.store.trunks import register_trunk
from tests.registry.store.promotion_worker import MARK
from tests.mlflow_server import mlflow_server

REPO = Path(__file__).resolve().parents[3]
N = 6
ROUNDS = 2
LINE_S = 120  # generous: the first line waits for the platform's import on 2 busy cores


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO)
    return env


class Worker:
    def __init__(self, log_dir: Path, i: int):
        self.err = open(log_dir / f"worker-{i}.err", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.registry.store.promotion_worker"], cwd=REPO, env=_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     bufsize=1)
        self.ready = False
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for text in self.proc.stdout:  # a thread: select() cannot see lines already buffered
            if text.startswith(MARK):
                self.lines.put(text[len(MARK):].strip())
        self.lines.put(None)

    def line(self) -> str:
        """The promoter's next own line (MLflow's run links on stdout are skipped)."""
        try:
            text = self.lines.get(timeout=LINE_S)
        except queue.Empty:
            text = None
        if text is None:
            self.err.seek(0)
            pytest.fail(f"promoter {self.proc.pid} gave no answer (exit {self.proc.poll()}):\n"
                        f"{self.err.read()[-3000:]}")
        return text

    def send(self, job: dict) -> None:
        if not self.ready:
            assert self.line() == "ready"
            self.ready = True
        self.proc.stdin.write(json.dumps(job) + "\n")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.err.close()


@pytest.fixture(scope="module")
def promoters(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("promoters")
    workers = [Worker(log_dir, i) for i in range(N)]
    yield workers
    for w in workers:
        w.close()


@pytest.fixture(scope="module")
def race_server(tmp_path_factory, migrated_db):
    """A real ``mlflow server``, without this process's MLFLOW_* settings."""
    with mlflow_server(tmp_path_factory.mktemp("race-server"), migrated_db, env=_env()) as url:
        yield url


def heads_world(client, trunk, make_result, rounds: int = ROUNDS) -> int:
    """Trunk v1 in production (no heads) and ``rounds`` versions of heads h0..h{N-1}; the base release."""
    tv = register_trunk(client, trunk)
    for r in range(rounds):
        for i in range(N):
            register_head(client, make_result(trunk, f"h{i}", seed=r), trunk_version=tv)
    return bootstrap_release(client, tv).version


def chain(client, stop: int) -> list[int]:
    """Production, then each release's previous_production, back to (not including) ``stop``."""
    found, version = [], production_version(client)
    while version != stop:
        found.append(version)
        version = int(client.get_model_version("release", str(version)).tags["previous_production"])
    return found


def race(promoters, tmp_path, ws, uri, round_no: int, base: int) -> list[dict]:
    go = tmp_path / f"go-{round_no}"
    for i, w in enumerate(promoters):
        w.send({"ws": str(ws), "uri": uri, "head": f"h{i}", "version": round_no, "base": base, "go": str(go)})
    for w in promoters:
        assert w.line() == "armed"
    go.touch()  # the start barrier: every promoter is waiting for this file
    return [json.loads(w.line()) for w in promoters]


def check_rounds(client, promoters, tmp_path, ws, uri, base: int, store: str) -> None:
    first, started = base, time.monotonic()
    attempted = promoted = 0
    for round_no in range(1, ROUNDS + 1):
        results = race(promoters, tmp_path, ws, uri, round_no, base)
        attempted += len(results)
        assert [r for r in results if not r["ok"]] == []  # no refusal, no error: different heads never conflict
        made = chain(client, base)
        assert sorted(r["release"] for r in results) == sorted(made)  # every promotion is on one unbroken chain
        # Exactly one promoter built on the production they all started from; every other
        # lost the race to it and was rebuilt on top of a newer production.
        assert sum(r["previous"] == base for r in results) == 1
        prod = get_release(client)
        assert prod.heads == {f"h{i}": round_no for i in range(N)}
        promoted += sum(prod.heads[f"h{i}"] == round_no for i in range(N))
        base = prod.version
    all_made = sorted(int(mv.version) for mv in client.search_model_versions("name='release'"))
    assert all_made == sorted(chain(client, first) + [first])  # nothing but the chain was left behind
    assert client.search_model_versions(f"name='{LOCK_MODEL}'") == []  # every ticket released
    print(f"\n{store}: promotions attempted {attempted}, in production {promoted}, lost {attempted - promoted} "
          f"({ROUNDS} rounds of {N} at once, {time.monotonic() - started:.1f}s)")


def test_racing_promoters_on_sqlite_all_reach_production(promoters, client, workspace, trunk_a, make_result,
                                                         tmp_path):
    base = heads_world(client, trunk_a, make_result)
    check_rounds(client, promoters, tmp_path, workspace, None, base, "sqlite")


@pytest.mark.slow  # a server start plus 2 x 6 racing promotions: about 30 s on 2 busy cores
def test_racing_promoters_through_a_tracking_server_all_reach_production(promoters, race_server, tmp_path, trunk_a,
                                                                         make_result):
    ws = tmp_path / "ws"
    client = connect(ws, uri=race_server)
    base = heads_world(client, trunk_a, make_result)
    check_rounds(client, promoters, tmp_path, ws, race_server, base, "server")


def test_a_holder_killed_inside_the_lock_blocks_nobody_and_its_leftovers_are_marked(
        client, workspace, trunk_a, make_result, tmp_path, caplog):
    from registry.reports.report import log_report

    base = heads_world(client, trunk_a, make_result, rounds=1)
    victim = Worker(tmp_path, 99)
    try:
        victim.send({"ws": str(workspace), "uri": None, "head": "h0", "version": 1, "base": base,
                     "go": str(tmp_path / "go"), "die_after_release_version": True})
        assert victim.line() == "armed"
        (tmp_path / "go").touch()
        assert victim.proc.wait(timeout=LINE_S) == -signal.SIGKILL
    finally:
        victim.close()
    # It died holding the lock, its release v2 made but never production, its run RUNNING.
    assert len(client.search_model_versions(f"name='{LOCK_MODEL}'")) == 1  # its ticket, still there
    orphan = client.get_model_version("release", "2")
    assert client.get_run(orphan.run_id).info.status == "RUNNING" and production_version(client) == base

    with caplog.at_level(logging.WARNING, logger="registry"):
        report = log_report(client, workspace)
    assert any("is gone" in r.getMessage() for r in caplog.records)  # reaped as dead, not after its lease
    assert report["leftovers"] == {"killed_runs": [orphan.run_id], "finished_runs": [], "orphan_versions": ["2"],
                                   "serving_markers_moved": []}
    run = client.get_run(orphan.run_id)
    assert run.info.status == "KILLED" and run.data.tags["orphan"] == "true"
    assert client.get_model_version("release", "2").tags["orphan"] == "true"

    made = promote_head(client, "h1", 1)  # nobody is blocked: the dead ticket is gone
    assert made.heads == {"h1": 1}
    assert client.get_model_version("release", str(made.version)).tags["previous_production"] == str(base)
    assert chain(client, base) == [made.version]

    # Moving production to an orphan (as a refresh cascade resuming after a crash does) clears the mark.
    move_alias(client, 2, expected=made.version)
    assert "orphan" not in client.get_model_version("release", "2").tags
    run = client.get_run(orphan.run_id)
    assert run.info.status == "FINISHED" and "orphan" not in run.data.tags


def test_a_vanished_holder_on_another_host_blocks_for_its_lease_only(client, tmp_path):
    # A promoter on another machine that stopped answering cannot be caused here; its
    # ticket is written exactly as that promoter would have written it.
    ensure_registered_model(client, LOCK_MODEL)
    lease_s = 2.0
    stale = client.create_model_version(LOCK_MODEL, source=TICKET_SOURCE, tags={
        HOLDER: "another-machine:4242:17", EXPIRES_AT: f"{time.time() + lease_s:.3f}"})
    started = time.monotonic()
    with hold(client, purpose="test") as lease:
        waited = time.monotonic() - started
    assert [(r.ticket, r.holder) for r in lease.reaped] == [(int(stale.version), "another-machine:4242:17")]
    assert lease.reaped[0].why.startswith("its lease expired")
    assert lease_s - 0.5 <= waited < lease_s + 15
    assert client.search_model_versions(f"name='{LOCK_MODEL}'") == []

    # One that is still within its lease holds the lock: the waiter gives up with a message.
    client.create_model_version(LOCK_MODEL, source=TICKET_SOURCE, tags={
        HOLDER: "another-machine:4243:18", EXPIRES_AT: f"{time.time() + 600:.3f}"})
    with pytest.raises(LeaseError, match=r"waited 0.5s for the promotion lock; ticket release.lock v\d+ "
                                         r"\(another-machine:4243:18, \) still holds it"):
        with hold(client, wait_s=0.5):
            pass


def test_a_job_whose_head_moved_meanwhile_is_refused_and_exits_non_zero(client, workspace, tmp_path, make_result):
    import yaml

    from tests.conftest import SMALL
    from trunk.model import Trunk
    from demo.shapes import generate_shapes

    shapes = generate_shapes(tmp_path / "shapes", n_images=60, n_holdout=0, size=32, seed=0)
    trunk = Trunk("test_resnet", data_config=SMALL)
    tv = register_trunk(client, trunk)
    bootstrap_release(client, tv)
    other = register_head(client, make_result(trunk, "tally"), trunk_version=tv)  # another team's version
    team = tmp_path / "team" / "heads"
    team.mkdir(parents=True)
    (team / "tally.yaml").write_text(yaml.safe_dump({
        "name": "tally", "owner": "tests", "data": {"manifest": str(shapes.manifests["count"])},
        "module": {"_target_": "heads.modules.LinearHead"}, "train": {"epochs": 2}, "gate": {}}))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.registry.store.promotion_tool_driver", str(workspace), "tally", str(other),
         f"workspace={workspace}", "head=tally", f"hydra.searchpath=[file://{team.parent}]", "progress=false",
         "device=cpu"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err[-1] == (f"error: head.tally v2 passed its gate but is not in production: head.tally moved in "
                       f"production from none to v{other} since this job started (release v1 -> v2); v2 was not "
                       f"promoted: compare it with v{other} and promote again if it should replace it")
    assert "not promoted: head.tally moved in production" in proc.stdout
    assert get_release(client).heads == {"tally": other}
