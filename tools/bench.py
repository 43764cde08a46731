"""Benchmark the shared trunk: ratios measured side by side in one run, table + JSON.

    python -m tools.bench
    python -m tools.bench model=resnet50 device=cuda batch_size=64 repeats=20
    python -m tools.bench suite=pipeline
    python -m tools.bench suite=streaming   (streamed inputs against the input list: peak RSS, images/s)
    python -m tools.bench suite=bank model=resnet50   (trunk + 256 heads of 1000 classes vs multiply-adds)
    python -m tools.bench suite=cache        (training on 1M cached rows: peak RSS; hashing cold vs warm)
    python -m tools.bench suite=roundtrips   (tracking-server requests per registry operation, 10 vs 300 heads)
    python -m tools.bench suite=promotion    (16 processes x 4 heads promoting through a real mlflow server)
    python -m tools.bench suite=cascade      (the refresh cascade over N heads, one at a time vs in parallel)
    python -m tools.bench suite=quantize model=resnet50   (fp32 vs int8 static / dynamic / weight-only trunks)
    python -m tools.bench suite=cache_precision   (feature cache int8 vs fp16: bytes per row, linear-probe accuracy)
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
    if cfg.suite in SUITES:  # the schema allows heads or one of these
        return SUITES[cfg.suite](cfg)
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


def run_bank(cfg: DictConfig) -> dict:
    """Run :func:`benchmarks.bank.run_bank_benchmark` with the settings under ``bank``."""
    from benchmarks.bank import format_bank_table, run_bank_benchmark

    b = cfg.bank
    result = run_bank_benchmark(bench_trunk(cfg), n_heads=b.n_heads, num_classes=b.num_classes,
                                batch_sizes=list(b.batch_sizes), weight_dtypes=list(b.weight_dtypes), n_mlp=b.n_mlp,
                                mlp_hidden=b.mlp_hidden, warmup=cfg.warmup, repeats=b.repeats)
    return _publish(cfg, result, format_bank_table(result), f"{result['device']}-bank.json")


def run_cache(cfg: DictConfig) -> dict:
    """Run :func:`benchmarks.cache.run_cache_benchmark` and :func:`~benchmarks.cache.run_hash_benchmark`."""
    from benchmarks.cache import format_cache_table, run_cache_benchmark, run_hash_benchmark

    c = cfg.cache
    result = run_cache_benchmark(tuple(c.rows), dim=c.dim, epochs=c.epochs, batch_size=c.batch_size,
                                 dtype=c.dtype, threads=cfg.threads, workdir=c.workdir)
    result["hashing"] = run_hash_benchmark(c.hash_files, workdir=c.workdir and str(Path(c.workdir) / "hashing"))
    h = result["hashing"]
    table = (format_cache_table(result) + f"\ncontent hashes of {h['files']} files: cold {h['cold']['seconds']} s "
             f"({h['cold']['hashed']} read), warm {h['warm']['seconds']} s ({h['warm']['hashed']} read)")
    return _publish(cfg, result, table, "cpu-cache.json")


def run_roundtrips(cfg: DictConfig) -> dict:
    """Run :func:`benchmarks.roundtrips.run_roundtrip_benchmark` for ``roundtrips.head_counts``."""
    from benchmarks.roundtrips import format_roundtrip_table, run_roundtrip_benchmark

    result = run_roundtrip_benchmark(list(cfg.roundtrips.head_counts), root=cfg.roundtrips.workdir)
    return _publish(cfg, result, format_roundtrip_table(result), "roundtrips.json")


def run_promotion(cfg: DictConfig) -> dict:
    """Run :func:`benchmarks.promotion.run_promotion_benchmark` with the settings under ``promotion``."""
    from benchmarks.promotion import format_promotion_table, run_promotion_benchmark

    p = cfg.promotion
    result = run_promotion_benchmark(p.processes, p.heads_per_process, list(p.preload), root=p.workdir)
    return _publish(cfg, result, format_promotion_table(result), "promotion.json")


def run_cascade(cfg: DictConfig) -> dict:
    """Run :func:`benchmarks.cascade.run_cascade_benchmark` with the settings under ``cascade``."""
    from benchmarks.cascade import format_cascade_table, run_cascade_benchmark

    c = cfg.cascade
    result = run_cascade_benchmark(c.n_heads, list(c.workers), root=c.root, backend=c.backend, n_images=c.n_images,
                                   image_size=c.image_size, head_epochs=c.head_epochs, mlp_every=c.mlp_every,
                                   branch_every=c.branch_every, seed=cfg.seed, progress=cfg.progress)
    return _publish(cfg, result, format_cascade_table(result), "cpu-cascade.json")


def run_quantize(cfg: DictConfig) -> dict:
    """Run :func:`benchmarks.quantize.run_quantize_benchmark` (model, image_size from the root) with ``quantize.*``."""
    from benchmarks.quantize import format_quantize_table, run_quantize_benchmark

    q = cfg.quantize
    result = run_quantize_benchmark(cfg.model, image_size=cfg.image_size, batch_size=q.batch_size,
                                    n_batches=q.n_batches, repeats=q.repeats, warmup=cfg.warmup,
                                    schemes=None if q.schemes is None else list(q.schemes),
                                    calibration=q.calibration, seed=cfg.seed, device=device(cfg))
    return _publish(cfg, result, format_quantize_table(result), f"{result['device']}-quantize.json")


def run_cache_precision(cfg: DictConfig) -> dict:
    """Run :func:`benchmarks.cache_precision.run_cache_precision_benchmark` with ``cache_precision.*``."""
    from benchmarks.cache_precision import format_cache_precision_table, run_cache_precision_benchmark

    c = cfg.cache_precision
    result = run_cache_precision_benchmark(c.workdir, n_images=c.n_images, size=c.size, seed=cfg.seed,
                                           heads=list(c.heads), model=c.model)
    return _publish(cfg, result, format_cache_precision_table(result), "cpu-cache-precision.json")


SUITES = {"pipeline": run_pipeline, "streaming": run_streaming, "bank": run_bank, "cache": run_cache,
          "roundtrips": run_roundtrips, "promotion": run_promotion, "cascade": run_cascade, "quantize": run_quantize,
          "cache_precision": run_cache_precision}


def _publish(cfg: DictConfig, result: dict, table: str, default_name: str) -> dict:
    """Stamp the result with how to reproduce it, write its JSON, print its table."""
    from benchmarks.heads import write_result

    result["command"] = " ".join(["python -m tools.bench", *_overrides()])
    result["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = write_result(result, cfg.output or Path(cfg.workspace) / "bench" / default_name)
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
