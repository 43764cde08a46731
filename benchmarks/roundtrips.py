"""Tracking-server round trips of the registry's operations, counted for real (issue 13).

A real ``mlflow server`` on 127.0.0.1 (:mod:`benchmarks.server`) holds one trunk and a
production release of ``n`` registered heads (:func:`register_heads`, shared with the
tests); each operation then runs through a fresh client while :func:`count_requests`
counts the HTTP requests it sends. That is instrumentation, not a mock: every request
still goes to the server. Counted per operation:

- ``promote``: :func:`registry.store.releases.promote_head` of a new version of one head;
- ``load_release``: :func:`registry.serving.load_release` of ``production`` (download and load);
- ``job_load``: what a classification job loads: :func:`registry.store.releases.load_release`
  of :func:`registry.store.releases.get_release` (the trunk and every head, verified);
- ``report``: :func:`registry.reports.report.log_report`, and its parts ``production_table``
  and ``head_dependencies``;
- ``resolve_head``: the production version of one head
  (``get_release(client).heads[name]``, as the tools resolve it).

Requests are split into ``api`` (registry and tracking REST calls) and ``artifacts``
(``mlflow-artifacts`` downloads, uploads and listings). A count independent of ``n`` is
the goal. A release model keeps every head in one pack (:mod:`registry.serving.pack`), so
a promotion downloads production's pack and the promoted head's two files and uploads the
new model's files, and loading a release downloads one pack, whatever ``n``. What stays
proportional to ``n`` is a release built with no earlier release holding its heads (the
first one, or a refresh cascade's, whose heads are all new versions): each head's two files
are downloaded once (MLflow has no batch download), outside these operations.

    python -m tools.bench suite=roundtrips roundtrips.head_counts=[10,300]
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests.adapters
import torch

OPERATIONS = ("promote", "load_release", "job_load", "report", "production_table", "head_dependencies",
              "resolve_head")
SMALL_TRUNK = {"input_size": [3, 32, 32], "crop_pct": 1.0}


@dataclass
class RequestLog:
    """HTTP requests sent while :func:`count_requests` was active.

    Attributes:
        requests: ``(method, path)`` of each, in order.
    """

    requests: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.requests)

    def kinds(self) -> dict[str, int]:
        """``{"api": n, "artifacts": n}``: REST calls and artifact transfers."""
        out = Counter("artifacts" if "/mlflow-artifacts/" in path else "api" for _, path in self.requests)
        return {"api": out.get("api", 0), "artifacts": out.get("artifacts", 0)}

    def endpoints(self) -> dict[str, int]:
        """``{"GET registered-models/get": n, ...}``; artifact paths are cut to their kind."""
        out: Counter[str] = Counter()
        for method, path in self.requests:
            if "/mlflow-artifacts/artifacts/" in path:
                out[f"{method} artifact file"] += 1
            elif "/mlflow-artifacts/artifacts" in path:
                out[f"{method} artifact list"] += 1
            else:
                out[f"{method} {path.split('/mlflow/', 1)[-1]}"] += 1
        return dict(sorted(out.items()))


_lock = threading.Lock()
_active: list[RequestLog] = []
_original_send = requests.adapters.HTTPAdapter.send


def _counting_send(self, request, *args, **kwargs):
    from urllib.parse import urlsplit

    with _lock:
        for log in _active:
            log.requests.append((request.method, urlsplit(request.url).path))
    return _original_send(self, request, *args, **kwargs)


@contextlib.contextmanager
def count_requests() -> Iterator[RequestLog]:
    """Count every HTTP request this process sends (MLflow's REST client goes through ``requests``).

    The requests are sent as usual; only their method and path are recorded. Nested and
    concurrent uses each see every request made while they are active.
    """
    log = RequestLog()
    with _lock:
        _active.append(log)
        requests.adapters.HTTPAdapter.send = _counting_send
    try:
        yield log
    finally:
        with _lock:
            _active.remove(log)
            if not _active:
                requests.adapters.HTTPAdapter.send = _original_send


def head_result(trunk, name: str, *, seed: int = 0, classes: Sequence[str] = ("a", "b", "c"),
                owner: str = "bench", val_accuracy: float = 0.9):
    """A real, tiny :class:`heads.result.HeadResult`: a seeded linear head on the trunk's pooled tap."""
    from heads.modules import LinearHead
    from heads.result import HeadResult
    from heads.spec import validate

    config = {"name": name, "owner": owner, "data": {"root": f"/nonexistent/{name}"}, "attach": {"tap": "pooled"},
              "module": {"_target_": "heads.modules.LinearHead", "dropout": 0.0}, "train": {"epochs": 1},
              "gate": {"min_val_accuracy": 0.5}, "description": f"{name} (benchmark head)"}
    spec = validate(config, source=f"{name}.yaml", expected_name=name)
    in_features = trunk.tap("pooled").channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = LinearHead(in_features=in_features, num_classes=len(classes)).eval()
    k = len(classes)
    return HeadResult(
        spec=spec, module=module, classes=list(classes), in_features=in_features, trunk_id=trunk.trunk_id,
        data_sha="d" * 16,
        metrics={"val_accuracy": val_accuracy, "val_macro_f1": val_accuracy - 0.02,
                 "params": float(sum(p.numel() for p in module.parameters())),
                 "added_gflops": 2 * in_features * k / 1e9, "added_ms_per_image": 0.004},
        per_class_recall={c: 0.9 for c in classes}, slice_accuracy={}, confusion=[])


def bench_trunk():
    """The benchmarks' trunk: timm's tiny ``test_resnet`` at 32 px, random weights (seed 0)."""
    from trunk.model import Trunk

    return Trunk("test_resnet", data_config=SMALL_TRUNK)


def register_heads(client, trunk, trunk_version: int, names: Sequence[str], *, seed: int = 0) -> dict[str, int]:
    """Register one version of each named head on ``trunk`` v<trunk_version>; ``{name: version}``."""
    from registry.store.heads import register_head

    return {name: register_head(client, head_result(trunk, name, seed=seed), trunk_version=trunk_version)
            for name in names}


def head_names(n: int, prefix: str = "h") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(int(n))]


def production_world(client, n_heads: int) -> dict[str, Any]:
    """One trunk and ``n_heads`` registered heads, all in one production release.

    Returns:
        ``{"trunk", "trunk_version", "heads" ({name: version}), "release" (its version)}``.
    """
    from registry.store.releases import bootstrap_release, create_release
    from registry.store.trunks import register_trunk

    trunk = bench_trunk()
    tv = register_trunk(client, trunk)
    base = bootstrap_release(client, tv)
    heads = register_heads(client, trunk, tv, head_names(n_heads))
    release = base if not heads else create_release(client, tv, heads, expected_production=base.version,
                                                    note=f"{n_heads} benchmark heads")
    return {"trunk": trunk, "trunk_version": tv, "heads": heads, "release": release.version}


def count_operations(url: str, workspace: str | Path, world: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The requests each operation sends to the server at ``url``, each through a fresh client.

    Returns:
        ``{operation: {"total", "api", "artifacts", "seconds", "endpoints"}}`` for :data:`OPERATIONS`.
    """
    from registry.reports.report import head_dependencies, log_report, production_table
    from registry.serving import load_release
    from registry.store.releases import get_release, promote_head
    from registry.store.releases import load_release as load_release_components
    from registry.store.tracking import connect

    first = sorted(world["heads"])[0] if world["heads"] else "extra"
    # A new version of one head (a new head when there are none), registered beforehand.
    new_version = register_heads(connect(workspace, uri=url), world["trunk"], world["trunk_version"], [first],
                                 seed=1)[first]
    ops: dict[str, Callable[[Any], Any]] = {
        "promote": lambda c: promote_head(c, first, new_version),
        "load_release": lambda c: load_release("production", tracking_uri=url),
        "job_load": lambda c: load_release_components(c, get_release(c)),
        "report": lambda c: log_report(c, workspace),
        "production_table": lambda c: production_table(c),
        "head_dependencies": lambda c: head_dependencies(c),
        "resolve_head": lambda c: get_release(c).heads.get(first),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, op in ops.items():
        client = connect(workspace, uri=url)  # fresh: nothing cached from the operations before
        started = time.perf_counter()
        with count_requests() as log:
            op(client)
        out[name] = {"total": log.total, **log.kinds(), "seconds": round(time.perf_counter() - started, 3),
                     "endpoints": log.endpoints()}
    return out


def run_roundtrip_benchmark(head_counts: Sequence[int] = (10, 300), *, root: str | Path | None = None
                            ) -> dict[str, Any]:
    """Round trips per registry operation with ``n`` heads in production, for each ``n``.

    Each count gets its own server and store (under ``root``, default a temporary folder).

    Returns:
        ``{"head_counts": [...], "counts": {n: {operation: {...}}}, "setup_s": {n: seconds},
        "independent": {operation: bool}}`` (``independent``: the same total at every ``n``).
    """
    from benchmarks.server import mlflow_server
    from registry.store.tracking import connect

    counts: dict[int, dict[str, dict[str, Any]]] = {}
    setup: dict[int, float] = {}
    with contextlib.ExitStack() as stack:
        base = Path(root) if root is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="roundtrips-")))
        for n in head_counts:
            folder = base / f"heads-{n}"
            url = stack.enter_context(mlflow_server(folder / "server"))
            ws = folder / "ws"
            started = time.perf_counter()
            world = production_world(connect(ws, uri=url), int(n))
            setup[int(n)] = round(time.perf_counter() - started, 1)
            counts[int(n)] = count_operations(url, ws, world)
    ns = [int(n) for n in head_counts]
    independent = {op: len({counts[n][op]["total"] for n in ns}) == 1 for op in OPERATIONS}
    return {"head_counts": ns, "counts": counts, "setup_s": setup, "independent": independent}


def format_roundtrip_table(result: Mapping[str, Any]) -> str:
    """One row per operation: requests (api + artifacts) at each head count."""
    ns = result["head_counts"]
    header = ["operation", *[f"{n} heads (api+artifacts)" for n in ns], "same at every count"]
    rows = []
    for op in OPERATIONS:
        cells = [op]
        for n in ns:
            c = result["counts"][n][op]
            cells.append(f"{c['total']} ({c['api']}+{c['artifacts']})")
        cells.append("yes" if result["independent"][op] else "no")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in [header, *rows])
