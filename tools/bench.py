"""Benchmark the shared trunk: ratios measured side by side in one run, table + JSON.

    python -m tools.bench
    python -m tools.bench model=resnet50 device=cuda batch_size=64 repeats=20
    python -m tools.bench suite=pipeline
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tools.common import as_list, device, num_workers, tool


def run(cfg: DictConfig) -> dict:
    """Run the configured suite, print its table, write its JSON."""
    import torch

    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    if cfg.suite == "pipeline":
        return run_pipeline(cfg)
    if cfg.suite != "heads":
        raise ValueError(f"field 'suite': '{cfg.suite}' is not one of: heads, pipeline")
    from benchmarks.heads import format_table, run_benchmark

    dev = device(cfg)
    result = run_benchmark(
        str(cfg.model), image_size=int(cfg.image_size), batch_size=int(cfg.batch_size),
        n_batches=int(cfg.n_batches), warmup=int(cfg.warmup), repeats=int(cfg.repeats),
        separate_repeats=int(cfg.separate_repeats), train_repeats=int(cfg.train_repeats),
        head_counts=[int(n) for n in as_list(cfg.head_counts)],
        linear_only=[int(n) for n in as_list(cfg.linear_only)], mlp_every=int(cfg.mlp_every),
        num_classes=int(cfg.num_classes), n_models=int(cfg.n_models), train_epochs=int(cfg.train_epochs),
        device=dev, seed=int(cfg.seed), model_kwargs=OmegaConf.to_container(cfg.model_kwargs, resolve=True),
    )
    return _publish(cfg, result, format_table(result), f"{result['device']}.json")


def run_pipeline(cfg: DictConfig) -> dict:
    """Run :func:`benchmarks.pipeline.run_pipeline_benchmark`, print its table, write its JSON."""
    from benchmarks.pipeline import format_pipeline_table, run_pipeline_benchmark

    p = cfg.pipeline
    result = run_pipeline_benchmark(
        str(cfg.model), image_size=int(cfg.image_size), n_images=int(p.n_images),
        photo_size=tuple(int(v) for v in p.photo_size), batch_size=int(p.batch_size),
        num_workers=num_workers(p), n_heads=int(p.n_heads), warmup=int(cfg.warmup), repeats=int(p.repeats),
        device=device(cfg), seed=int(cfg.seed), images_dir=p.images_dir,
        model_kwargs=OmegaConf.to_container(cfg.model_kwargs, resolve=True),
    )
    return _publish(cfg, result, format_pipeline_table(result), f"{result['device']}-pipeline.json")


def _publish(cfg: DictConfig, result: dict, table: str, default_name: str) -> dict:
    """Stamp the result with how to reproduce it, write its JSON, print its table."""
    from benchmarks.heads import write_result

    result["command"] = " ".join(["python -m tools.bench", *_overrides()])
    result["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = write_result(result, cfg.output or Path("bench") / default_name)
    print(table)
    print(f"wrote {path}")
    return result


def _overrides() -> list[str]:
    """The command line's overrides, so the JSON says how to reproduce it; none when composed in a test."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@tool("bench")
def main(cfg: DictConfig) -> dict:
    return run(cfg)


if __name__ == "__main__":
    main()
