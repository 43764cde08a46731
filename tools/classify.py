"""Classify a folder or manifest with every head of release@production; write Parquet.

    python -m tools.classify input=/data/new_images output=/data/predictions/2026-11-23
"""

from __future__ import annotations

from tools.common import client, device, tool, workspace


@tool("classify")
def main(cfg) -> None:
    from registry.jobs import classify_job
    from registry.summary import classify_lines

    ws = workspace(cfg)
    success = classify_job(client(cfg, ws), cfg.input, cfg.output, batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers, device=device(cfg), progress=cfg.progress,
                           rows_per_shard=cfg.rows_per_shard)
    print("\n".join(classify_lines(success, str(cfg.output))))


if __name__ == "__main__":
    main()
