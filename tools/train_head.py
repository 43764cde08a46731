"""Train, evaluate, cost and register one head; promote it if it passes its gate.

    python -m tools.train_head head=colour
    python -m tools.train_head head=damage hydra.searchpath=[file:///teams/cars/conf]
"""

from __future__ import annotations

from tools.common import client, device, head_spec, tool, workspace


@tool("train_head")
def main(cfg) -> None:
    from registry.jobs.train import train_head_job
    from registry.reports.summary import head_job_lines

    ws = workspace(cfg)
    spec = head_spec(cfg.head, ws)
    job = train_head_job(client(cfg, ws), spec, workspace=ws, trunk_version=cfg.trunk_version,
                         batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device(cfg),
                         progress=cfg.progress, promote=cfg.promote)
    print("\n".join(head_job_lines(job)))


if __name__ == "__main__":
    main()
