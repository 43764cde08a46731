"""Feature cache at scale: training a head on N cached rows in bounded memory; hashing with the index.

:func:`run_cache_benchmark` writes a synthetic cache of ``rows`` x ``dim`` (through the
cache's own writer, fp16 by default: ``2 * dim`` bytes a row), then in a fresh subprocess
trains a linear head for ``epochs`` on a :meth:`trunk.cache.FeatureCache.rows` view of it
and reports the child's peak RSS (``ru_maxrss``) and rows/s. Flat peak RSS across row
counts is the goal: the view holds 8 bytes a row plus one batch; the cache's row index
(a Python dict, about 200 bytes a row) is the part that still grows with N.

:func:`run_hash_benchmark` times :class:`trunk.hashindex.ContentHashes` over ``files``
small generated files: cold (every file read and hashed) vs warm (stat only).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from heads.training.train import TrainSettings, train_on_features
from safetensors.torch import load_file
from trunk.cache import FeatureCache
a = json.loads(sys.argv[1])
if a["threads"]:
    torch.set_num_threads(a["threads"])
cache = FeatureCache(a["root"], "bench", "pooled", "p", dtype=a["dtype"])
started = time.perf_counter()
shas = [line for line in open(a["shas"]).read().split()]
labels = load_file(a["labels"])["labels"]  # safetensors: nothing is unpickled
n_val = a["val_rows"]
train_x, val_x = cache.rows(shas[n_val:]), cache.rows(shas[:n_val])
train_y, val_y = labels[n_val:], labels[:n_val]
del shas
indexed = time.perf_counter() - started
module = torch.nn.Linear(a["dim"], a["classes"])
settings = TrainSettings(epochs=a["epochs"], batch_size=a["batch_size"], lr=1e-3, weight_decay=0.0,
                         patience=0, seed=0)
t = time.perf_counter()
outcome = train_on_features(module, train_x, train_y, val_x, val_y, settings)
seconds = time.perf_counter() - t
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "train_seconds": seconds, "index_seconds": indexed,
                  "val_accuracy": outcome.history[-1]["val_accuracy"]}))
"""


def _sha(i: int) -> str:
    return hashlib.sha256(f"row{i}".encode()).hexdigest()


def write_synthetic_cache(root: Path, rows: int, dim: int, classes: int, *, dtype: str = "float16",
                          chunk: int = 4096, seed: int = 0) -> tuple[list[str], Any]:
    """``rows`` class-clustered features written through :meth:`FeatureCache.writer`; ``(shas, labels)``."""
    import torch

    from trunk.cache import FeatureCache

    cache = FeatureCache(root, "bench", "pooled", "p", dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (rows,), generator=g)
    shas = []
    with cache.writer() as w:
        for lo in range(0, rows, chunk):
            y = labels[lo:lo + chunk]
            x = centres[y] * 0.5 + torch.randn(len(y), dim, generator=g)
            batch = [_sha(i) for i in range(lo, lo + len(y))]
            w.add(batch, x)
            shas += batch
    return shas, labels


def run_cache_benchmark(rows: tuple[int, ...] = (100_000, 1_000_000), dim: int = 2048, epochs: int = 1,
                        batch_size: int = 1024, classes: int = 10, dtype: str = "float16",
                        val_fraction: float = 0.01, threads: int | None = None,
                        workdir: str | Path | None = None, keep: bool = False) -> dict[str, Any]:
    """Peak RSS and rows/s of training a linear head on ``rows`` cached rows, one subprocess per size.

    Args:
        rows: row counts to measure, each a fresh cache.
        dim: feature width (a 2048-d tap: ResNet-50's pooled vector).
        epochs: training epochs over the rows.
        batch_size: rows per step.
        classes: classes of the synthetic labels.
        dtype: the cache's storage dtype (``float16``, the default, or ``int8``).
        val_fraction: share of rows held out for the per-epoch validation pass.
        threads: torch threads in the child (None: torch's default).
        workdir: where the caches go (they need ``rows * dim * 2`` bytes at fp16); a temp folder by default.
        keep: keep the caches afterwards.

    Returns:
        ``{"dim", "dtype", "epochs", "batch_size", "results": [{rows, disk_mb, write_seconds,
        peak_rss_mb, train_seconds, rows_per_s, index_seconds, val_accuracy}]}``.
    """
    from safetensors.torch import save_file

    base = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="cache-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    results = []
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        for n in rows:
            root = base / f"rows-{n}"
            shutil.rmtree(root, ignore_errors=True)
            started = time.perf_counter()
            shas, labels = write_synthetic_cache(root, n, dim, classes, dtype=dtype)
            written = time.perf_counter() - started
            (root / "shas.txt").write_text("\n".join(shas))
            save_file({"labels": labels.contiguous()}, root / "labels.safetensors")
            disk = sum(p.stat().st_size for p in root.rglob("shard-*"))
            del shas, labels
            args = {"root": str(root), "shas": str(root / "shas.txt"), "labels": str(root / "labels.safetensors"),
                    "dim": dim, "classes": classes, "epochs": epochs, "batch_size": batch_size, "dtype": dtype,
                    "val_rows": max(1, int(n * val_fraction)), "threads": threads}
            out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                                 env=env, cwd=repo)
            if out.returncode != 0:
                raise RuntimeError(f"cache benchmark child failed for {n} rows: {out.stderr.strip()[-2000:]}")
            child = json.loads(out.stdout.strip().splitlines()[-1])
            trained = (n - args["val_rows"]) * epochs
            results.append({"rows": n, "disk_mb": round(disk / 2**20, 3), "write_seconds": round(written, 2),
                            "peak_rss_mb": round(child["peak_rss_mb"], 1),
                            "train_seconds": round(child["train_seconds"], 2),
                            "rows_per_s": round(trained / child["train_seconds"], 1),
                            "index_seconds": round(child["index_seconds"], 2),
                            "val_accuracy": round(child["val_accuracy"], 4)})
            if not keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not keep and workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    return {"dim": dim, "dtype": dtype, "epochs": epochs, "batch_size": batch_size, "results": results}


def format_cache_table(report: dict[str, Any]) -> str:
    """A Markdown table of :func:`run_cache_benchmark`'s results."""
    lines = [f"Training a linear head on cached {report['dim']}-d rows ({report['dtype']} on disk), "
             f"{report['epochs']} epoch(s), batch {report['batch_size']}",
             "",
             "| rows | disk MB | peak RSS MB | rows/s | train s | index s | val acc |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['rows']:,} | {r['disk_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['rows_per_s']:,.0f} | "
                     f"{r['train_seconds']:.1f} | {r['index_seconds']:.1f} | {r['val_accuracy']:.3f} |")
    return "\n".join(lines)


def run_hash_benchmark(files: int = 20_000, size: int = 4096, workdir: str | Path | None = None) -> dict[str, Any]:
    """Seconds to hash ``files`` generated files of ``size`` bytes: cold index, then warm.

    Files get an mtime well in the past (the index does not trust entries hashed right
    after a write, :data:`trunk.hashindex.RACY_NS`). The cold pass includes saving the index.
    """
    from trunk.hashindex import ContentHashes

    base = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="hash-bench-"))
    try:
        old = (int(time.time()) - 3600) * 10**9
        paths = []
        for i in range(files):
            p = base / "ds" / f"c{i % 100}" / f"{i}.bin"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(os.urandom(size))
            os.utime(p, ns=(old, old))
            paths.append(p)
        timings = {}
        for name in ("cold", "warm"):
            index = ContentHashes(base / "cache")
            t = time.perf_counter()
            for p in paths:
                index.sha(p)
            index.save()
            timings[name] = {"seconds": round(time.perf_counter() - t, 3), "hashed": index.hashed, "hits": index.hits}
        return {"files": files, "bytes_per_file": size, **timings}
    finally:
        shutil.rmtree(base, ignore_errors=True)
