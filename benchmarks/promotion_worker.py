"""One promoter process of the promotion benchmark (:mod:`benchmarks.promotion`).

    python -m benchmarks.promotion_worker

Reads one JSON job from stdin: ``{"ws", "uri", "heads": [[name, version], ...], "go"}``. It
connects, prints ``armed``, waits until the file ``go`` exists (the start barrier shared by
every promoter), promotes its heads one after another with
:func:`registry.store.releases.promote_head` and prints one JSON line:
``{"promotions": [{"head", "version", "ok", "seconds", "release", "error"}], "rebuilt": n}``
(``rebuilt``: promotions that lost the race and were rebuilt on a newer production).
Its own lines start with ``@@ `` (MLflow prints run links to stdout).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

MARK = "@@ "


def say(text: str) -> None:
    print(f"{MARK}{text}", flush=True)


class _Rebuilds(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "rebuilding on top of it" in record.getMessage():
            self.count += 1


def main() -> None:
    from registry.store.releases import ReleaseError, promote_head
    from registry.store.tracking import connect

    job = json.loads(sys.stdin.readline())
    rebuilds = _Rebuilds()
    releases_log = logging.getLogger("registry.store.releases")
    releases_log.addHandler(rebuilds)
    releases_log.setLevel(logging.INFO)
    client = connect(job["ws"], uri=job["uri"])
    say("armed")
    while not os.path.exists(job["go"]):
        time.sleep(0.005)
    out = []
    for name, version in job["heads"]:
        started = time.perf_counter()
        try:
            made = promote_head(client, name, int(version))
            out.append({"head": name, "version": int(version), "ok": True, "release": made.version,
                        "seconds": time.perf_counter() - started, "error": None})
        except ReleaseError as e:
            out.append({"head": name, "version": int(version), "ok": False, "release": None,
                        "seconds": time.perf_counter() - started, "error": str(e)})
    say(json.dumps({"promotions": out, "rebuilt": rebuilds.count}))


if __name__ == "__main__":
    main()
