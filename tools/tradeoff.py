"""Train one head at several taps; log accuracy vs added cost with the Pareto front; name the cheapest.

    python -m tools.tradeoff head=colour taps=[layer2,layer3,pooled]
"""

from __future__ import annotations

from omegaconf import OmegaConf

from tools.common import client, device, head_spec, num_workers, tool, workspace


@tool("tradeoff")
def main(cfg) -> None:
    from registry.jobs.tradeoff import sweep_taps

    ws = workspace(cfg)
    spec = head_spec(cfg)
    sweep = sweep_taps(client(cfg, ws), spec, list(cfg.taps), workspace=ws, tolerance=cfg.tolerance,
                       trunk_version=cfg.trunk_version, batch_size=cfg.batch_size, num_workers=num_workers(cfg),
                       device=device(cfg), progress=cfg.progress,
                       pooled_train=OmegaConf.to_container(cfg.pooled_train, resolve=True),
                       branch_train=OmegaConf.to_container(cfg.branch_train, resolve=True), echo=print)
    print(sweep.table)
    print(f"plot: {sweep.png}  (MLflow experiment 'reports', run {sweep.run_id})")


if __name__ == "__main__":
    main()
