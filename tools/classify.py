"""Classify a folder, manifest or fsspec URI with every head of one release; write Parquet.

    python -m tools.classify input=/data/new_images output=/data/predictions/2026-11-23
    python -m tools.classify input=s3://bucket/images.parquet output=/mnt/out backend=ray ray.address=auto
    python -m tools.classify input=/data/heldout output=/data/pred/heldout labels=/data/heldout/labels.csv
"""

from __future__ import annotations

from omegaconf import OmegaConf

from tools.common import client, device, num_workers, tool, workspace


@tool("classify")
def main(cfg) -> None:
    from registry.jobs.classify import classify_job, heldout_lines
    from registry.jobs.monitor import monitor_lines
    from registry.reports.summary import classify_lines

    ws = workspace(cfg)
    ray_options = OmegaConf.to_container(cfg.ray, resolve=True) if cfg.backend == "ray" else None
    success = classify_job(client(cfg, ws), cfg.input, cfg.output, batch_size=cfg.batch_size,
                           num_workers=num_workers(cfg), device=device(cfg), progress=cfg.progress,
                           rows_per_shard=cfg.rows_per_shard, release=cfg.release, backend=cfg.backend,
                           draft=cfg.draft, ray_options=ray_options,
                           allow_foreign_files=cfg.allow_foreign_files, labels=cfg.labels, monitor=cfg.monitor,
                           workspace=ws, head_weights=cfg.head_weights, claim_lease_s=cfg.claim_lease_s)
    lines = classify_lines(success, str(cfg.output))
    if cfg.monitor:
        lines += monitor_lines(success.get("drift"))
    if "heldout" in success:
        lines += heldout_lines(success["heldout"])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
