"""Refresh the trunk: build a candidate, retrain and gate every production head on it, promote all or nothing.

    python -m tools.refresh candidate=distill
    python -m tools.refresh candidate=multitask multitask.epochs=8
    python -m tools.refresh candidate=timm trunk=local_weights trunk.model_name=resnet18 trunk.weights=/w.safetensors
    python -m tools.refresh                      # the trunk aliased `candidate`
    python -m tools.refresh candidate=3          # trunk version 3 (= candidate=version candidate.version=3)
    python -m tools.refresh parallel.backend=process parallel.workers=4   # heads retrained 4 at a time

Data-parallel: candidate=distill and candidate=multitask train under torchrun (gloo on CPU,
NCCL on GPUs, trunk.distributed); rank 0 registers the candidate and runs the cascade.

    torchrun --nproc_per_node=2 -m tools.refresh candidate=distill device=cpu
"""

from __future__ import annotations

import sys

from tools.candidates import Context, Distill, Multitask, build_candidate
from tools.common import client, device, num_workers, tool, workspace
from trunk import distributed


def numbered_candidate(args: list[str]) -> list[str]:
    """``candidate=3`` (a trunk version) as Hydra can read it: ``candidate=version candidate.version=3``.

    ``candidate`` is a config group, and a group's option is a file name, never a number.
    """
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key == "candidate" and value.isdigit():
            out += ["candidate=version", f"candidate.version={value}"]
        else:
            out.append(arg)
    return out


@tool("refresh", rewrite_args=numbered_candidate)
def main(cfg) -> None:
    from heads.checks.contract import Tolerances
    from registry.jobs.cascade import Parallel
    from registry.jobs.refresh import refresh_job

    ws = workspace(cfg)
    candidate = build_candidate(cfg)  # the `candidate` config group's option, instantiated
    c, p = cfg.contract, cfg.parallel
    with distributed.launched(device(cfg), timeout_s=cfg.distributed_timeout_s) as dev:
        main = distributed.is_main()
        if distributed.current() is not None and not isinstance(candidate, (Distill, Multitask)):
            raise ValueError("field 'candidate': only candidate=distill and candidate=multitask train, so only they "
                             "run under torchrun; run this one as a single process")
        if not main:  # rank 0 opens (and migrates) the store first; the others then only read it
            distributed.broadcast_int(None)
        mlflow_client = client(cfg, ws)
        if main:
            distributed.broadcast_int(0)
        workers = num_workers(cfg)
        build = candidate.builder(Context(cfg, mlflow_client, ws, dev, workers))
        made = build() if build is not None else None  # every rank trains; rank 0 registers
    if not main:  # rank 0 reports and runs the cascade, alone, after the ranks have parted
        return
    built, result = refresh_job(
        mlflow_client, ws, build=None if build is None else (lambda: made), candidate=candidate.name,
        tolerances=Tolerances(c.tolerance, c.slice_tolerance, c.min_slice_size), batch_size=cfg.batch_size,
        num_workers=workers, device=dev, progress=cfg.progress, promote=cfg.promote, cascade=cfg.cascade,
        parallel=Parallel(p.backend, p.workers, p.threads, p.address), echo=print)
    if built is not None and built.how == "distill":
        f = built.figures
        from trunk.timing import times_faster

        print(f"student vs teacher: {times_faster(f.get('speedup_vs_teacher', float('nan')))}, "
              f"{f.get('flops_ratio_vs_teacher', float('nan')):.2f}x fewer GFLOPs (same batches, one run); "
              f"pooled cosine {f.get('cosine_pooled', float('nan')):.3f}")
    if result is None:
        return
    print()
    print(result.report["text"])
    print(f"report: {result.report['markdown']}  {result.report['png']}  (MLflow experiment 'cascades', "
          f"run {result.report['run_id']})")
    if result.promoted is not None:
        print(f"PROMOTED: production is release v{result.promoted.version} (trunk v{result.candidate_version}); "
              f"undo with python -m tools.rollback")
    elif result.refused:
        print(f"NOT PROMOTED: {result.refused}")
        sys.exit(1)
    elif not result.passed:
        print(f"BLOCKED by {', '.join(result.blocked)}: production stays release v{result.production.version}")
        sys.exit(1)
    else:
        print(f"every head passed; promote=false, so production stays release v{result.production.version}")


if __name__ == "__main__":
    main()
