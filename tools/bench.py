"""Benchmark the shared trunk: ratios measured side by side in one run, table + JSON.

    python -m tools.bench
    python -m tools.bench model=resnet50 device=cuda batch_size=64 repeats=20
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tools.common import as_list, device, tool


def run(cfg: DictConfig) -> dict:
    """Run :func:`heads.benchmark.run_benchmark` as configured, print the table, write the JSON."""
    import torch

    from heads.benchmark import format_table, run_benchmark, write_result

    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
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
    result["command"] = " ".join(["python -m tools.bench", *_overrides()])
    result["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = write_result(result, cfg.output or Path("bench") / f"{result['device']}.json")
    print(format_table(result))
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
