"""A bulk-classification job in its own process, for crash and race tests.

    python -m tests.heads.classify.driver <manifest.txt> <output> [--kill POINT:N] [--workers W]
        [--batch-delay S] [--sync DIR --parties P]
    python -m tests.heads.classify.driver --serve

Prints ``ready`` once torch, timm and the models are loaded (so a test can aim its SIGKILL
at the job itself, not at the imports), then runs :func:`heads.classify.engine.classify` and
prints one JSON line: this process's commits, the shards it computed (assembled) and the
job summary.

``--batch-delay S`` sleeps S seconds after each batch (a slow job, so that two overlap).
``--sync DIR --parties P``: after its first shard claim the process waits (up to two
minutes) until P processes have claimed one (a file each in DIR), so that each of P jobs
racing on one folder holds a shard before any computes: each computes some, by construction.

``--serve`` starts a fork server instead (:func:`serve`): it imports torch, timm and the
platform once, then forks one fresh child per job it is asked for, so that a test killing
and restarting a job twenty times pays those imports once, not twenty times. Each job is
still its own process, started as the job would be (its own arguments, output files and
monkeypatches, its models loaded after the fork), killed with a real SIGKILL; only the
interpreter's start-up is shared.

``--kill POINT:N`` makes the process SIGKILL itself the N-th time it reaches POINT, a
real kill at a place a timer rarely hits:

- ``write``: halfway through writing a temp file (half a Parquet file on disk);
- ``link``: temp file written and fsynced, not yet linked to its final name;
- ``linked``: linked, the folder not yet fsynced;
- ``batch``: after the N-th batch's rows are assembled;
- ``claimed``: right after the N-th shard claim, before that shard is computed.

Claim files are written through the same code as commits; ``write``, ``link`` and
``linked`` count commits only, so they aim at the same files as before claims existed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from heads.bank import HeadBank
from heads.modules import LinearHead, MLPHead
from heads.store import LoadedHead
from tests.tools.toolserver import as_child, fork_server

SMALL = {"input_size": [3, 32, 32], "crop_pct": 1.0}
RELEASE = {"name": "release", "version": "7", "trunk_version": "2", "heads": {"colour": "1", "shape": "4"}}


def make_bank(trunk) -> HeadBank:
    """Two fixed heads with seeded random weights (a linear and an MLP) on ``pooled``."""
    width = trunk.tap("pooled").channels
    torch.manual_seed(0)
    modules = {"shape": (LinearHead(width, 4), 4), "colour": (MLPHead(width, 3, hidden=8), 3)}
    heads = {}
    for name, (module, n) in modules.items():
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.5)
        heads[name] = LoadedHead(module.eval(), {"name": name, "tap": "pooled", "classes": [f"{name}{i}" for i in range(n)]})
    return HeadBank(heads)


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _is_claim(path) -> bool:
    return ".claim-" in os.path.basename(str(path))


def _after_claim(hook) -> None:
    """Call ``hook(k)`` each time this process newly claims shard k."""
    from heads.classify.output import ShardClaims

    real_take = ShardClaims.take

    def take(self, k):
        new = k not in self.held
        got = real_take(self, k)
        if got and new:
            hook(k)
        return got

    ShardClaims.take = take


def _barrier(directory: Path, parties: int) -> None:
    """After this process's first claim, wait until ``parties`` processes have made one."""
    first = []

    def arrived(k: int) -> None:
        if first:
            return
        first.append(k)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / str(os.getpid())).write_text(str(k))
        deadline = time.monotonic() + 120
        while len(list(directory.iterdir())) < parties and time.monotonic() < deadline:
            time.sleep(0.02)

    _after_claim(arrived)


def _arm(point: str, n: int) -> None:
    """Make the process kill itself the n-th time it reaches ``point``."""
    import heads.classify.engine as classify_mod
    from trunk import files  # where every commit's write and link happen

    seen = Counter()

    def reached(name: str) -> None:
        seen[name] += 1
        if name == point and seen[name] == n:
            _die()

    if point == "write":
        real_write = files._write_synced

        def half_written(path, write):
            import io

            if _is_claim(path):
                return real_write(path, write)

            buf = io.BytesIO()
            write(buf)
            data = buf.getvalue()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                reached("write")
            real_write(path, write)

        files._write_synced = half_written
    elif point in ("link", "linked"):
        real_link = os.link

        class _OS:  # the module's view of os: link() with a kill before or after it
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def link(src, dst):
                if _is_claim(dst):
                    return real_link(src, dst)
                reached("link")
                real_link(src, dst)
                reached("linked")

        files.os = _OS()
    elif point == "batch":
        real_add = classify_mod._Assembler.add

        def add(self, *args, **kwargs):  # whatever the assembler takes (columns, stats, ...)
            out = real_add(self, *args, **kwargs)
            reached("batch")
            return out

        classify_mod._Assembler.add = add
    elif point == "claimed":
        _after_claim(lambda k: reached("claimed"))
    else:
        raise SystemExit(f"unknown kill point '{point}'")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("output")
    parser.add_argument("--kill", default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rows-per-shard", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batch-delay", type=float, default=0.0)
    parser.add_argument("--sync", default=None)
    parser.add_argument("--parties", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    import heads.classify.engine as classify_mod
    import heads.classify.output as shards
    from heads.classify.engine import classify
    from trunk.model import Trunk

    trunk = Trunk("test_resnet", data_config=SMALL)
    bank = make_bank(trunk)
    paths = [line for line in open(args.manifest).read().splitlines() if line]
    computed: list[int] = []
    real_add = classify_mod._Assembler.add

    def add(self, shard, *rest, **kwargs):  # records each shard this process assembles
        whole = real_add(self, shard, *rest, **kwargs)
        if args.batch_delay:
            time.sleep(args.batch_delay)
        if whole is not None:
            computed.append(shard)
        return whole

    classify_mod._Assembler.add = add
    if args.sync:
        _barrier(Path(args.sync), args.parties)
    if args.kill:
        point, n = args.kill.split(":")
        _arm(point, int(n))

    committed: list[str] = []
    real_commit = shards.commit_once

    def counting(directory, name, write, **kw):
        ok = real_commit(directory, name, write, **kw)
        if ok:
            committed.append(name)
        return ok

    shards.commit_once = counting
    print("ready", flush=True)
    summary = classify(trunk, bank, paths, args.output, release={**RELEASE, "trunk_id": trunk.trunk_id},
                       batch_size=args.batch_size, num_workers=args.workers, rows_per_shard=args.rows_per_shard,
                       progress=False)
    print(json.dumps({"committed": committed, "computed": computed, "summary": summary}), flush=True)


def _child(job: dict) -> None:
    """In a forked child: run one job with its own stdout/stderr files, then exit with its status."""
    as_child(job, lambda: main(job["argv"]))


def serve() -> None:
    """A fork server: one JSON request a line on stdin, one JSON reply a line on stdout.

    Requests: ``{"op": "start", "argv": [...], "stdout": path, "stderr": path}`` forks a
    child that runs ``main(argv)`` (reply ``{"pid"}``); ``{"op": "wait", "pid", "timeout"}``
    reaps it (reply ``{"returncode"}``, negative for a signal as with :mod:`subprocess`, or
    ``{"returncode": null}`` if it has not exited within ``timeout`` seconds; 0: just poll).
    On end of input, children still running are killed and reaped.
    """
    torch.set_num_threads(1)
    # What a job imports before it prints ``ready``, nothing more: after ``ready`` a forked job
    # does the same work as a fresh one, so the kills at random moments land alike.
    import heads.classify.engine  # noqa: F401
    import heads.classify.output  # noqa: F401
    import trunk.model  # noqa: F401

    fork_server(_child)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main()
