"""Run the refresh cascade on a workspace and SIGKILL this process at a chosen point.

    python -m tests.registry.jobs.cascade_driver <workspace> head:1|release-version|alias|pool:1

``head:N``: right after the N-th retrained head version is registered; ``release-version``:
right after the new ``release`` version exists, before production moves; ``alias``: right
after production moved, before the cascade cleans up; ``pool:N``: a cascade on a pool of two
worker processes, killed as soon as N heads have finished (the others still in flight).
Each line the cascade echoes is printed and flushed, so the parent sees how far it got.
"""

from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def print_line(line: str) -> None:
    print(line, flush=True)


def main(ws: str, point: str) -> None:
    from mlflow import MlflowClient

    import registry.jobs.cascade as cascade
    from registry.store.tracking import connect
    from registry.store.workspace import Workspace

    if point.startswith("head:"):
        limit, calls = int(point.split(":")[1]), []
        original = cascade.register_head

        def register_then_die(*args, **kwargs):
            version = original(*args, **kwargs)
            calls.append(version)
            if len(calls) >= limit:
                die()
            return version

        cascade.register_head = register_then_die
    elif point == "release-version":
        create = MlflowClient.create_model_version

        def create_then_die(self, name, *args, **kwargs):
            mv = create(self, name, *args, **kwargs)
            if name == "release":
                die()
            return mv

        MlflowClient.create_model_version = create_then_die
    elif point == "alias":
        set_alias = MlflowClient.set_registered_model_alias

        def set_then_die(self, name, alias, version):
            set_alias(self, name, alias, version)
            if name == "release":
                die()

        MlflowClient.set_registered_model_alias = set_then_die
    elif not point.startswith("pool:"):
        raise SystemExit(f"unknown kill point {point}")
    parallel = cascade.Parallel()
    echo = print_line
    if point.startswith("pool:"):
        # The workers are other processes: the kill comes from the parent's progress lines.
        parallel = cascade.Parallel("process", workers=2, threads=1)
        finished = f"  [{int(point.split(':')[1])}/"

        def echo(line: str) -> None:
            print_line(line)
            if line.startswith(finished):
                die()

    cascade.run_cascade(connect(ws), Workspace.at(ws), progress=False, parallel=parallel, echo=echo)
    print("finished without being killed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
