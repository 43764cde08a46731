"""A promoter process for the promotion race tests: imports the platform once, then promotes on request.

    python -m tests.registry.store.promotion_worker

Prints ``ready`` once imported (each of its own lines starts with ``@@ ``). Then each stdin line is a JSON job ``{"ws", "uri", "head",
"version", "base", "go"}``: it connects (``uri``: a tracking server, or null for the
workspace's SQLite store), reads release ``base`` (production as this team saw it when
its job began), prints ``armed``, waits until the file ``go`` exists (the start barrier
shared by every promoter), calls :func:`registry.store.releases.promote_head` and prints one
JSON line: ``{"ok": true, "release", "previous"}`` or ``{"ok": false, "error"}``.
An error that is not a :class:`ReleaseError` propagates: the process dies, and the test
sees an unexplained error.

With ``die_after_release_version`` in the job, the process SIGKILLs itself right after
its ``release`` version is created, while it holds the promotion lock.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

MARK = "@@ "


def say(text: str) -> None:
    # MLflow prints its own lines (run links) to stdout through a server: ours are marked.
    print(f"{MARK}{text}", flush=True)


def main() -> None:
    from mlflow import MlflowClient

    from registry.store.releases import ReleaseError, promote_head, read_release
    from registry.store.tracking import connect

    say("ready")
    for line in sys.stdin:
        job = json.loads(line)
        if job.get("die_after_release_version"):
            create = MlflowClient.create_model_version

            def create_then_die(self, name, *args, **kwargs):
                mv = create(self, name, *args, **kwargs)
                if name == "release":
                    os.kill(os.getpid(), signal.SIGKILL)
                return mv

            MlflowClient.create_model_version = create_then_die
        client = connect(job["ws"], uri=job.get("uri"))
        base = read_release(client, job["base"])
        say("armed")
        while not os.path.exists(job["go"]):
            time.sleep(0.002)
        try:
            made = promote_head(client, job["head"], job["version"], started_from=base)
        except ReleaseError as e:
            say(json.dumps({"ok": False, "error": str(e)}))
            continue
        previous = client.get_model_version("release", str(made.version)).tags["previous_production"]
        say(json.dumps({"ok": True, "release": made.version, "previous": int(previous), "heads": made.heads}))


if __name__ == "__main__":
    main()
