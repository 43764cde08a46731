"""Run the refresh cascade on a workspace and SIGKILL this process at a chosen point.

    python -m tests.registry.jobs.cascade_driver <workspace> head:1|release-version|alias

``head:N``: right after the N-th retrained head version is registered; ``release-version``:
right after the new ``release`` version exists, before production moves; ``alias``: right
after production moved, before the cascade cleans up. Each line the cascade echoes is
printed and flushed, so the parent sees how far it got.
"""

from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


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
    else:
        raise SystemExit(f"unknown kill point {point}")
    cascade.run_cascade(connect(ws), Workspace.at(ws), progress=False, echo=lambda line: print(line, flush=True))
    print("finished without being killed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
