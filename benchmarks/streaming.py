"""Streamed inputs against the input list, side by side: peak memory and speed of bulk classification.

Issue 13 (millions of images): a folder walk or manifest of tens of millions of entries must
not be held as one Python list. Two measurements, each contender in a fresh process of its
own so its peak RSS (``ru_maxrss``) is its own:

- ``classify``: :func:`heads.classify.engine.classify` over ``n`` generated tiny PNGs in a
  folder tree (``test_resnet`` at 32 px, 2 heads), once given the list
  (:func:`trunk.images.resolve_inputs`, before) and once the stream
  (:class:`trunk.images.InputStream`, after): images/s and peak RSS;
- ``manifest``: reading a ``.txt`` manifest of ``n`` lines as a list against counting it as a
  stream: seconds and peak RSS; streamed, the peak stays flat from 1M to 10M lines.

    python -m tools.bench suite=streaming                          # 10k, 30k images; 1M, 10M lines
    python -m tools.bench suite=streaming "streaming.images=[10000,100000]"

Writes ``bench/cpu-streaming.json`` (``output=`` to change). ``python -m benchmarks.streaming
--worker ...`` is the child each contender runs in; it is not an entry point of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SMALL = {"input_size": [3, 32, 32], "crop_pct": 1.0}
PER_FOLDER = 1000


def write_tiny_images(root: Path, n: int, *, side: int = 24, seed: int = 0) -> Path:
    """``n`` tiny noisy PNGs, :data:`PER_FOLDER` per sub-folder; reused when already there."""
    done = root / f".done-{n}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / f"d{i // PER_FOLDER:04d}" / f"img{i:07d}.png"
        if i % PER_FOLDER == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path, compress_level=1)
    done.write_text("")
    return root


def write_manifest(path: Path, n: int) -> Path:
    """A ``.txt`` manifest of ``n`` relative paths (the files need not exist to be listed)."""
    if path.exists():
        return path
    with open(path, "w") as f:
        for start in range(0, n, 100000):
            f.write("".join(f"d{i // PER_FOLDER:05d}/img{i:08d}.png\n" for i in range(start, min(n, start + 100000))))
    return path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(kind: str, mode: str, source: str, out: str, batch_size: int, num_workers: int) -> dict[str, Any]:
    """One contender, in this (fresh) process."""
    from trunk.images import InputStream, resolve_inputs

    if kind == "manifest":
        base = _peak_mb()  # the interpreter and imports: the same for both contenders
        start = time.perf_counter()
        n = len(resolve_inputs(source)) if mode == "list" else sum(1 for _ in InputStream(source))
        return {"items": n, "seconds": time.perf_counter() - start, "peak_rss_mb": _peak_mb(),
                "peak_rss_mb_before_job": base}
    import torch

    from benchmarks.heads import make_heads
    from heads.bank import HeadBank
    from heads.classify.engine import classify
    from trunk.model import Trunk

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - num_workers))
    trunk = Trunk("test_resnet", data_config=SMALL)
    bank = HeadBank(make_heads(2, trunk.tap("pooled").channels, mlp_every=0))
    release = {"name": "bench", "version": "1", "trunk_version": "1", "trunk_id": trunk.trunk_id,
               "heads": {n: "1" for n in bank.names}}
    base = _peak_mb()
    start = time.perf_counter()
    inputs = resolve_inputs(source) if mode == "list" else InputStream(source)
    summary = classify(trunk, bank, inputs, out, release=release, batch_size=batch_size, num_workers=num_workers,
                       progress=False, monitor=True)
    seconds = time.perf_counter() - start
    n = summary["counts"]["images"]
    return {"items": n, "seconds": seconds, "images_per_s": n / seconds, "peak_rss_mb": _peak_mb(),
            "peak_rss_mb_before_job": base, "fingerprint": summary["fingerprint"]}


def _spawn(*args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.streaming", "--worker", *args],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {args[:2]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_streaming_benchmark(images: list[int], lines: list[int], *, batch_size: int = 64, num_workers: int = 1,
                            workdir: str | None = None) -> dict[str, Any]:
    """Both measurements, list and stream side by side for every size.

    Args:
        images: folder sizes for ``classify``.
        lines: manifest lengths for ``manifest``.
        batch_size: images per trunk forward.
        num_workers: decoding processes.
        workdir: keep generated files here between runs; None: a temp folder.
    """
    import platform

    import torch

    tmp = tempfile.TemporaryDirectory(prefix="vtp-streaming-") if workdir is None else None
    root = Path(workdir or tmp.name)
    result: dict[str, Any] = {"suite": "streaming", "device": "cpu", "cpu_count": os.cpu_count(),
                              "torch": torch.__version__, "python": platform.python_version(),
                              "batch_size": batch_size, "num_workers": num_workers,
                              "classify": [], "manifest": []}
    try:
        for n in images:
            folder = write_tiny_images(root / f"images-{n}", n)
            row: dict[str, Any] = {"images": n}
            for mode in ("list", "stream"):
                out = root / f"out-{n}-{mode}"
                row[mode] = _spawn("classify", mode, str(folder), str(out), str(batch_size), str(num_workers))
                subprocess.run(["rm", "-rf", str(out)], check=True)
            row["same_fingerprint"] = row["list"].pop("fingerprint") == row["stream"].pop("fingerprint")
            result["classify"].append(row)
        for n in lines:
            manifest = write_manifest(root / f"manifest-{n}.txt", n)
            row = {"lines": n}
            for mode in ("list", "stream"):
                row[mode] = _spawn("manifest", mode, str(manifest), "", "0", "0")
            result["manifest"].append(row)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return result


def format_streaming_table(result: dict[str, Any]) -> str:
    lines = ["classify (tiny PNG folder)     list: img/s  peak MB | stream: img/s  peak MB"]
    for r in result["classify"]:
        lines.append(f"  {r['images']:>10,d} images       {r['list']['images_per_s']:>8.0f} {r['list']['peak_rss_mb']:>8.0f}"
                     f" | {r['stream']['images_per_s']:>12.0f} {r['stream']['peak_rss_mb']:>8.0f}")
    lines.append("manifest (.txt)                list: s      peak MB | stream: s      peak MB")
    for r in result["manifest"]:
        lines.append(f"  {r['lines']:>10,d} lines        {r['list']['seconds']:>8.1f} {r['list']['peak_rss_mb']:>8.0f}"
                     f" | {r['stream']['seconds']:>12.1f} {r['stream']['peak_rss_mb']:>8.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The child process of one contender (:func:`_spawn`): prints its measurement as one JSON line."""
    parser = argparse.ArgumentParser(description="one contender of the streaming benchmark (run by tools.bench)")
    parser.add_argument("--worker", nargs=6, required=True,
                        metavar=("KIND", "MODE", "SOURCE", "OUT", "BATCH", "WORKERS"))
    kind, mode, source, out, batch, workers = parser.parse_args(argv).worker
    print(json.dumps(_worker(kind, mode, source, out, int(batch), int(workers))))


if __name__ == "__main__":
    main()
