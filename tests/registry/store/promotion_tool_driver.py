"""Run ``tools.train_head`` while another team promotes a different version of the same head.

    python -m tests.registry.store.promotion_tool_driver <workspace> <head> <other version> <tool args...>

Right after the job registers its new head version (training done, promotion next), a
second, independent client promotes ``head.<head>`` v<other version>: the real concurrent
promotion that makes this job's promotion lose the race on the same head. The tool then
runs to its end; its exit status is this process's.
"""

from __future__ import annotations

import sys


def main(ws: str, head: str, other_version: int, args: list[str]) -> None:
    import registry.jobs.train as jobs
    from registry.store.releases import promote_head
    from registry.store.tracking import connect

    original = jobs.register_head

    def register_then_race(*a, **kw):
        version = original(*a, **kw)
        promote_head(connect(ws), head, other_version)  # another team, its own client
        return version

    jobs.register_head = register_then_race
    from tools.train_head import main as tool_main

    sys.argv = ["tools.train_head", *args]
    tool_main()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
