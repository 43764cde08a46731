"""The platform end to end on a synthetic data set it generates: the README's main command.

    python -m tools.demo                      # workspace ./workspace
    python -m tools.demo workspace=/tmp/vtp data.n_images=6000
"""

from __future__ import annotations

from omegaconf import OmegaConf

from tools.common import build_trunk, client, device, head_dirs, num_workers, tool, workspace


@tool("demo")
def main(cfg) -> None:
    from registry.jobs.demo import format_demo, run_demo
    from registry.store.tracking import tracking_uri

    ws = workspace(cfg)
    result = run_demo(client(cfg, ws), ws, base=build_trunk(cfg.trunk), head_dirs=head_dirs(),
                      data=OmegaConf.to_container(cfg.data, resolve=True), trunk_tasks=list(cfg.trunk_tasks),
                      head_names=list(cfg.heads), train=OmegaConf.to_container(cfg.train, resolve=True),
                      augment_ops=OmegaConf.to_container(cfg.augment.ops, resolve=True), device=device(cfg),
                      batch_size=cfg.batch_size, num_workers=num_workers(cfg), progress=cfg.progress, echo=print)
    print("\n".join(format_demo(result, ws, cfg.tracking.get("uri") or tracking_uri(ws.root))))


if __name__ == "__main__":
    main()
