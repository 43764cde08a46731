"""Train the trunk multi-task on the labelled data of one or more head configs; register it.

    python -m tools.train_trunk tasks=[shape,colour] train.epochs=10
    python -m tools.train_trunk tasks=[shape] trunk=local_weights trunk.model_name=resnet18 trunk.weights=/w.safetensors

Data-parallel: the same command under torchrun, one process per GPU (NCCL) or per group of
CPU cores (gloo); the launcher decides how many. Rank 0 registers and prints; the trunk is
the one a single process trains, up to float summation order (trunk.distributed).

    torchrun --nproc_per_node=2 -m tools.train_trunk tasks=[shape,colour] device=cpu
"""

from __future__ import annotations

from omegaconf import OmegaConf

from tools.common import build_trunk, client, device, named_head, num_workers, tool, workspace
from trunk import distributed


@tool("train_trunk")
def main(cfg) -> None:
    from registry.jobs.train_trunk import train_trunk_job

    ws = workspace(cfg)
    specs = [named_head(name, ws) for name in cfg.tasks]
    t = cfg.train
    with distributed.launched(device(cfg), timeout_s=cfg.distributed_timeout_s) as dev:
        # Only rank 0 opens the store: N processes must not race to create or migrate it.
        job = train_trunk_job(client(cfg, ws) if distributed.is_main() else None, build_trunk(cfg.trunk), specs,
                              workspace=ws, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                              weight_decay=t.weight_decay,
                              augment_ops=OmegaConf.to_container(cfg.augment.ops, resolve=True), seed=t.seed,
                              device=dev, num_workers=num_workers(cfg), progress=cfg.progress, adopt=cfg.adopt,
                              retrain=cfg.retrain)
    if job is None:  # another rank of a data-parallel run: rank 0 reports
        return
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in sorted(job.metrics.items()))
    print(f"trunk v{job.version} ({job.trunk.model_name}, trunk_id {job.trunk.trunk_id}): {job.status}")
    print(f"  {metrics}")
    for row in job.history:  # empty when a trunk trained before was reused
        print(f"  epoch {row['epoch']}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                       if k.startswith("val_accuracy_")))
    names = [s.name for s in specs]
    if any(f"val_accuracy_{n}" in job.metrics for n in names):
        print("  val accuracy (each head's val split; no val or golden image of any head was trained on): "
              + "  ".join(f"{n} {job.metrics[f'val_accuracy_{n}']:.3f}" for n in names
                          if f"val_accuracy_{n}" in job.metrics))
    if "excluded_eval_images" in job.metrics:
        print(f"  kept out of training: {int(job.metrics['excluded_eval_images'])} images that are a head's "
              f"validation or golden images")


if __name__ == "__main__":
    main()
