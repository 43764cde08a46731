"""The refresh cascade over many heads, one at a time against a process pool: wall time side by side.

Issue 13: a cascade over hundreds of heads retrains them in parallel. This benchmark builds
(or finds) a workspace of ``n_heads`` production heads (:func:`benchmarks.workspace.build_workspace`),
then runs :func:`registry.jobs.cascade.run_cascade` once per entry of ``workers``: ``1`` is the
serial cascade (today's in-process path), ``N > 1`` a pool of ``N`` worker processes
(``backend="process"``, or ``ray``). Every run gets a fresh candidate trunk (``test_resnet``
at a new seed, the production trunk's data config), so each one trains and registers its
own head versions and extracts its own candidate features: the same work every time, none
of it reused from the run before. ``promote=False``: production stays where it is, so every
run cascades against the same release.

Each run is timed whole (``run_cascade`` wall time: features, training, checks, report), and
the ratio is serial seconds over parallel seconds. One run per setting, in sequence: on a
shared machine the figures drift; the per-head seconds help read them. A pool on a machine
with C cores can at best be C times faster than serial, less what starting its workers
(importing torch, timm and MLflow: seconds each) and the parent's own work cost.

    python -m tools.bench suite=cascade cascade.n_heads=100 cascade.workers=[1,2] cascade.root=/tmp/cascade-bench
    python -m tools.bench suite=cascade cascade.n_heads=8 cascade.n_images=200 cascade.image_size=32   # a quick look
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.workspace import build_workspace
from registry.jobs.cascade import Parallel, available_cores, run_cascade
from registry.store.tracking import connect
from registry.store.trunks import load_trunk, register_trunk, trunk_versions
from registry.store.workspace import Workspace
from trunk.model import Trunk

# Candidate trunk seeds start here (the workspace's own trunk has seed `seed`).
CANDIDATE_SEED = 1000


def _candidate(client: Any, production: Trunk, seed: int) -> int:
    trunk = Trunk(production.model_name, seed=seed, data_config=production.data_config,
                  model_kwargs=production.model_kwargs)
    return register_trunk(client, trunk, description=f"benchmarks.cascade: candidate, seed {seed}")


def run_cascade_benchmark(n_heads: int = 100, workers: Sequence[int] = (1, 2), *, root: str | Path | None = None,
                          backend: str = "process", n_images: int = 600, image_size: int = 64, head_epochs: int = 5,
                          mlp_every: int = 10, branch_every: int = 100, seed: int = 0,
                          progress: bool = True) -> dict[str, Any]:
    """Time the cascade over ``n_heads`` heads serially and on worker pools, each on a fresh candidate.

    Args:
        n_heads: production heads in the workspace.
        workers: one cascade per entry: ``1`` serial (in-process), ``N`` ``backend`` with ``N`` workers.
        root: the workspace folder (reused when built before with the same arguments);
            None: a temporary one, removed at the end.
        backend: ``process`` or ``ray`` for the parallel runs.
        n_images, image_size, head_epochs, mlp_every, branch_every, seed: the workspace
            (:func:`benchmarks.workspace.build_workspace`).
        progress: print the workspace build's progress and one line per cascade.

    Returns:
        ``settings``, ``cores``, ``build_seconds``, ``runs`` (per entry of ``workers``:
        ``workers``, ``backend``, ``threads``, ``seconds``, ``seconds_per_head``, ``trained``,
        ``failed``, ``candidate_version``) and ``speedup`` (``{workers: serial seconds / these}``,
        when a serial run is among them).
    """
    if not workers or any(int(w) < 1 for w in workers):
        raise ValueError(f"field 'workers': give counts of at least 1, got {list(workers)}")
    if backend not in ("process", "ray"):
        raise ValueError(f"field 'backend': '{backend}' is not one of: process, ray")
    with tempfile.TemporaryDirectory(prefix="cascade-bench-") as tmp:
        folder = Path(root) if root is not None else Path(tmp) / "workspace"
        t = time.perf_counter()
        ws = build_workspace(folder, n_heads, mlp_every=mlp_every, branch_every=branch_every, n_images=n_images,
                             image_size=image_size, head_epochs=head_epochs, seed=seed, progress=progress)
        build_seconds = time.perf_counter() - t
        workspace = Workspace.at(ws.root)
        client = connect(workspace.root, ws.tracking_uri)
        production = load_trunk(client, ws.trunk_version)
        runs = []
        for w in (int(w) for w in workers):
            parallel = Parallel() if w == 1 else Parallel(backend, workers=w)
            # A seed no trunk here has had (each run adds one): a fresh trunk_id, so nothing is reused,
            # also when the benchmark runs again on the same workspace.
            tv = _candidate(client, production, CANDIDATE_SEED + seed + len(trunk_versions(client)))
            t = time.perf_counter()
            result = run_cascade(client, workspace, candidate=tv, progress=False, promote=False, parallel=parallel,
                                 echo=None)
            seconds = time.perf_counter() - t
            statuses = [o.status for o in result.outcomes.values()]
            runs.append({"workers": w, "backend": parallel.backend,
                         "threads": parallel.torch_threads(parallel.pool_size(len(statuses))) if w > 1 else None,
                         "seconds": seconds, "seconds_per_head": seconds / max(1, len(statuses)),
                         "heads": len(statuses), "trained": statuses.count("trained"),
                         "reused": statuses.count("reused"), "failed": statuses.count("failed"),
                         "candidate_version": tv})
            if progress:
                print(f"cascade, {parallel.backend} x{w}: {len(statuses)} heads in {seconds:.1f} s", flush=True)
    serial = next((r["seconds"] for r in runs if r["workers"] == 1), None)
    return {
        "settings": {"n_heads": n_heads, "workers": [int(w) for w in workers], "backend": backend,
                     "n_images": n_images, "image_size": image_size, "head_epochs": head_epochs,
                     "mlp_every": mlp_every, "branch_every": branch_every, "seed": seed},
        "cores": available_cores(),
        "machine": platform.platform(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": build_seconds,
        "heads_in_release": runs[0]["heads"],
        "runs": runs,
        "speedup": {} if serial is None else {r["workers"]: serial / r["seconds"] for r in runs if r["workers"] > 1},
    }


def format_cascade_table(result: dict[str, Any]) -> str:
    """The runs as a small table: setting, wall time, per head, heads trained, speed-up over serial."""
    lines = [f"cascade over {result['heads_in_release']} heads ({result['cores']} cores; one run each, "
             f"in sequence, on a shared machine)",
             f"{'run':<14} {'wall s':>8} {'s/head':>8} {'trained':>8} {'failed':>7} {'vs serial':>10}"]
    for r in result["runs"]:
        name = "serial" if r["workers"] == 1 else f"{r['backend']} x{r['workers']}"
        ratio = result["speedup"].get(r["workers"])
        lines.append(f"{name:<14} {r['seconds']:>8.1f} {r['seconds_per_head']:>8.2f} {r['trained']:>8} "
                     f"{r['failed']:>7} {'-' if ratio is None else f'{ratio:.2f}x':>10}")
    return "\n".join(lines)
