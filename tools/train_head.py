"""Train, evaluate, cost and register one head; promote it if it passes its gate.

    python -m tools.train_head head=colour
    python -m tools.train_head head=damage hydra.searchpath=[file:///teams/cars/conf]

Exit status: 0 when the head reached production (or promote=false, or its gate failed:
the summary says which), 1 when it passed its gate but did not reach production (the
same head moved meanwhile, or production's trunk changed), 2 for a bad config.
"""

from __future__ import annotations

import sys

from tools.common import client, device, head_spec, num_workers, tool, workspace

EXIT_NOT_PROMOTED = 1


@tool("train_head")
def main(cfg) -> None:
    from registry.jobs.train import overlap_line, train_head_job
    from registry.reports.summary import head_job_lines

    ws = workspace(cfg)
    spec = head_spec(cfg)
    job = train_head_job(client(cfg, ws), spec, workspace=ws, trunk_version=cfg.trunk_version,
                         batch_size=cfg.batch_size, num_workers=num_workers(cfg), device=device(cfg),
                         progress=cfg.progress, promote=cfg.promote)
    lines = head_job_lines(job)
    # Right after the figures: how far to trust val_accuracy (the trunk may have trained on val images).
    lines.insert(2, overlap_line(job))
    print("\n".join(lines))
    if job.refused:
        # A passing head that did not reach production is a failed job, not a quiet success.
        print(f"error: head.{spec.name} v{job.version} passed its gate but is not in production: {job.refused}",
              file=sys.stderr)
        sys.exit(EXIT_NOT_PROMOTED)


if __name__ == "__main__":
    main()
