"""Benchmark the shared trunk: ratios measured side by side in one run, table + JSON.

    python -m tools.bench
    python -m tools.bench model=resnet50 device=cuda batch_size=64 repeats=20
    python -m tools.bench suite=pipeline
    python -m tools.bench suite=streaming   (streamed inputs against the input list: peak RSS, images/s)
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tools.common import device, num_workers, tool


def run(cfg: DictConfig) -> dict:
    """Run the configured suite, print its table, write its JSON."""
    import torch

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.suite == "pipeline":  # the schema allows heads, pipeline or streaming
        return run_pipeline(cfg)
    if cfg.suite == "streaming":
        return run_streaming(cfg)
    from benchmarks.heads import HeadMix, format_table, run_benchmark

    mix = HeadMix(counts=list(cfg.head_counts), linear_only=list(cfg.linear_only), mlp_every=cfg.mlp_every,
                  num_classes=cfg.num_classes)
    result = run_benchmark(
        bench_trunk(cfg), mix=mix, batch_size=cfg.batch_size, n_batches=cfg.n_batches, warmup=cfg.warmup,
        repeats=cfg.repeats, separate_repeats=cfg.separate_repeats, n_models=cfg.n_models,
        train_epochs=cfg.train_epochs, train_repeats=cfg.train_repeats,
    )
    return _publish(cfg, result, format_table(result), f"{result['device']}.json")


def bench_trunk(cfg: DictConfig):
    """The benchmarked trunk's settings (shared by both suites)."""
    from benchmarks.heads import BenchTrunk

    return BenchTrunk(cfg.model, image_size=cfg.image_size,
                      model_kwargs=OmegaConf.to_container(cfg.model_kwargs, resolve=True), seed=cfg.seed,
                      device=device(cfg))


def run_pipeline(cfg: DictConfig) -> dict:
    """Run :func:`benchmarks.pipeline.run_pipeline_benchmark`, print its table, write its JSON."""
    from benchmarks.pipeline import format_pipeline_table, run_pipeline_benchmark

    p = cfg.pipeline
    result = run_pipeline_benchmark(
        bench_trunk(cfg), n_images=p.n_images, photo_size=tuple(p.photo_size), batch_size=p.batch_size,
        num_workers=num_workers(p), n_heads=p.n_heads, warmup=cfg.warmup, repeats=p.repeats,
        images_dir=p.images_dir,
    )
    return _publish(cfg, result, format_pipeline_table(result), f"{result['device']}-pipeline.json")


def run_streaming(cfg: DictConfig) -> dict:
    """Run :func:`benchmarks.streaming.run_streaming_benchmark` with the settings under ``streaming``."""
    from benchmarks.streaming import format_streaming_table, run_streaming_benchmark

    s = cfg.streaming
    result = run_streaming_benchmark(list(s.images), list(s.lines), batch_size=s.batch_size,
                                     num_workers=s.num_workers, workdir=s.workdir)
    return _publish(cfg, result, format_streaming_table(result), "cpu-streaming.json")


def _publish(cfg: DictConfig, result: dict, table: str, default_name: str) -> dict:
    """Stamp the result with how to reproduce it, write its JSON, print its table."""
    from benchmarks.heads import write_result

    result["command"] = " ".join(["python -m tools.bench", *_overrides()])
    result["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = write_result(result, cfg.output or Path(cfg.workspace) / "benchmarks" / default_name)
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
