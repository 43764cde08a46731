"""Many teams promoting at once through a real tracking server (issue 13): lost heads, errors, throughput.

A real ``mlflow server`` on 127.0.0.1 (:mod:`benchmarks.server`, its own process group,
stopped at the end) holds one trunk. For each preload level, production is first topped up
to that many heads (registered and put in one release), then ``processes`` promoter
processes (:mod:`benchmarks.promotion_worker`), each with ``heads_per_process`` freshly
registered heads, are released together by a start file and promote their heads one after
another with :func:`registry.store.releases.promote_head` (lease lock plus compare-and-swap;
a promotion that lost the race is rebuilt on the newer production).

Per level: heads lost (promoted but not in the final production; goal 0), errors (goal 0),
rebuilt promotions (lost a race, joined the newer production), promotions per second, and
seconds per promotion (the wall time over the promotions: they are serialized by the lock),
so the growth with the heads already in production shows.

    python -m tools.bench suite=promotion promotion.processes=16 promotion.heads_per_process=4 promotion.preload=[0,100,300]
"""

from __future__ import annotations

import contextlib
import json
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.promotion_worker import MARK
from benchmarks.roundtrips import bench_trunk, register_heads
from benchmarks.server import mlflow_server, server_env

REPO = Path(__file__).resolve().parents[1]
LINE_S = 900.0


class BenchmarkError(RuntimeError):
    """A promoter process died or did not answer."""


class _Promoter:
    def __init__(self, log_dir: Path, i: int) -> None:
        self.err = open(log_dir / f"promoter-{i}.err", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.promotion_worker"], cwd=REPO,
                                     env=server_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for text in self.proc.stdout:
            if text.startswith(MARK):
                self.lines.put(text[len(MARK):].strip())
        self.lines.put(None)

    def line(self) -> str | None:
        """Its next own line; None when it died or stayed silent for :data:`LINE_S`."""
        try:
            return self.lines.get(timeout=LINE_S)
        except queue.Empty:
            return None

    def why(self) -> str:
        self.err.seek(0)
        return f"promoter {self.proc.pid} (exit {self.proc.poll()}): {self.err.read()[-1500:]}"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.err.close()


def _top_up(client, trunk, trunk_version: int, level: int, serial: int) -> int:
    """Bring production to at least ``level`` heads (new ``pre*`` heads, one release); its head count."""
    from registry.store.releases import create_release, get_release

    current = get_release(client)
    short = level - len(current.heads)
    if short <= 0:
        return len(current.heads)
    added = register_heads(client, trunk, trunk_version, [f"pre{serial}x{i:03d}" for i in range(short)])
    made = create_release(client, trunk_version, {**current.heads, **added}, expected_production=current.version,
                          note=f"benchmark preload to {level} heads")
    return len(made.heads)


def _phase(url: str, ws: Path, client, trunk, trunk_version: int, processes: int, heads_per_process: int,
           tag: str, log_dir: Path) -> dict[str, Any]:
    from registry.store.releases import get_release

    promoters = [_Promoter(log_dir, i) for i in range(processes)]  # importing while the heads register
    try:
        jobs = []
        for p in range(processes):
            names = [f"{tag}w{p:02d}h{j}" for j in range(heads_per_process)]
            jobs.append(sorted(register_heads(client, trunk, trunk_version, names).items()))
        at_start = len(get_release(client).heads)
        go = log_dir / f"go-{tag}"
        for promoter, heads in zip(promoters, jobs):
            promoter.proc.stdin.write(json.dumps({"ws": str(ws), "uri": url, "heads": heads, "go": str(go)}) + "\n")
        for promoter in promoters:
            if promoter.line() != "armed":
                raise BenchmarkError(promoter.why())
        started = time.perf_counter()
        go.touch()
        results, crashed = [], []
        for promoter in promoters:
            text = promoter.line()
            if text is None:
                crashed.append(promoter.why())
            else:
                results.append(json.loads(text))
        wall = time.perf_counter() - started
    finally:
        for promoter in promoters:
            promoter.close()
    promotions = [p for r in results for p in r["promotions"]]
    final = get_release(client).heads
    wanted = {name: version for heads in jobs for name, version in heads}
    lost = sorted(n for n, v in wanted.items() if final.get(n) != v)
    latencies = [p["seconds"] for p in promotions if p["ok"]]
    done = len(latencies)
    return {
        "heads_at_start": at_start, "heads_at_end": len(final), "promotions": len(wanted), "succeeded": done,
        "lost": len(lost), "lost_heads": lost[:20],
        "errors": sum(not p["ok"] for p in promotions) + len(crashed) * heads_per_process,
        "error_messages": [p["error"] for p in promotions if not p["ok"]][:5] + crashed[:3],
        "rebuilt": sum(r["rebuilt"] for r in results), "wall_s": round(wall, 2),
        "promotions_per_s": round(done / wall, 3) if wall > 0 else None,
        "s_per_promotion": round(wall / done, 3) if done else None,
        "median_latency_s": round(statistics.median(latencies), 3) if latencies else None,
        "max_latency_s": round(max(latencies), 3) if latencies else None,
    }


def run_promotion_benchmark(processes: int = 16, heads_per_process: int = 4, preload: Sequence[int] = (0, 100, 300),
                            *, root: str | Path | None = None) -> dict[str, Any]:
    """Race ``processes`` promoters of ``heads_per_process`` heads each, at each preload level.

    Levels run in ascending order on one server; a level's production holds at least that
    many heads before its race (plus the earlier races' heads).

    Returns:
        ``{"processes", "heads_per_process", "phases": [{"preload", "heads_at_start", "heads_at_end",
        "promotions", "succeeded", "lost", "lost_heads", "errors", "error_messages", "rebuilt",
        "wall_s", "promotions_per_s", "s_per_promotion", "median_latency_s", "max_latency_s"}],
        "lost", "errors", "setup_s"}`` (``lost`` and ``errors`` summed over the phases; goal 0).
    """
    from registry.store.releases import bootstrap_release
    from registry.store.tracking import connect
    from registry.store.trunks import register_trunk

    phases = []
    setup = 0.0
    with contextlib.ExitStack() as stack:
        base = Path(root) if root is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="promotion-bench-")))
        url = stack.enter_context(mlflow_server(base / "server"))
        ws = base / "ws"
        client = connect(ws, uri=url)
        trunk = bench_trunk()
        tv = register_trunk(client, trunk)
        bootstrap_release(client, tv)
        for k, level in enumerate(sorted(int(x) for x in preload)):
            started = time.perf_counter()
            _top_up(client, trunk, tv, level, k)
            setup += time.perf_counter() - started
            phase = _phase(url, ws, client, trunk, tv, int(processes), int(heads_per_process), f"p{k}",
                           base)
            phases.append({"preload": level, **phase})
    return {"processes": int(processes), "heads_per_process": int(heads_per_process), "phases": phases,
            "lost": sum(p["lost"] for p in phases), "errors": sum(p["errors"] for p in phases),
            "setup_s": round(setup, 1)}


def format_promotion_table(result: Mapping[str, Any]) -> str:
    """One row per preload level: heads at start, lost, errors, rebuilt, promotions/s, s per promotion."""
    header = ["preload", "heads at start", "promotions", "lost", "errors", "rebuilt", "promotions/s",
              "s/promotion", "median latency s", "max latency s"]
    rows = [[str(p["preload"]), str(p["heads_at_start"]), str(p["promotions"]), str(p["lost"]), str(p["errors"]),
             str(p["rebuilt"]), str(p["promotions_per_s"]), str(p["s_per_promotion"]), str(p["median_latency_s"]),
             str(p["max_latency_s"])] for p in result["phases"]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    title = f"{result['processes']} processes x {result['heads_per_process']} heads, real mlflow server"
    return "\n".join([title, *("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])])
