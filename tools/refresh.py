"""Refresh the trunk: build a candidate, retrain and gate every production head on it, promote all or nothing.

    python -m tools.refresh candidate=distill
    python -m tools.refresh candidate=multitask multitask.epochs=8
    python -m tools.refresh candidate=timm trunk=local_weights trunk.model_name=resnet18 trunk.weights=/w.safetensors
    python -m tools.refresh                      # the trunk aliased `candidate`; candidate=<N> for a version
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from tools.common import as_list, build_trunk, client, device, num_workers, tool, workspace


def builder(cfg, mlflow_client, ws, dev: str, workers: int):
    """The candidate builder the config asks for, or None to use an existing trunk version."""
    from registry import refresh

    how = str(cfg.candidate)
    augment = OmegaConf.to_container(cfg.augment.ops, resolve=True)
    if how == "multitask":
        m = cfg.multitask
        if m.base not in ("production", "config"):
            raise ValueError(f"field 'multitask.base': '{m.base}' is neither 'production' nor 'config'")
        base = build_trunk(cfg.trunk) if m.base == "config" else None
        return lambda: refresh.multitask_candidate(
            mlflow_client, ws, base=base, epochs=m.epochs, batch_size=m.batch_size, lr=m.lr,
            weight_decay=m.weight_decay, augment_ops=augment, seed=m.seed, device=dev, num_workers=workers,
            progress=cfg.progress)
    if how == "timm":
        return lambda: refresh.timm_candidate(mlflow_client, build_trunk(cfg.trunk))
    if how == "distill":
        d = cfg.distill
        taps = "auto" if str(d.taps) == "auto" else as_list(d.taps)
        return lambda: refresh.distill_candidate(
            mlflow_client, ws, model_name=d.student.model_name,
            model_kwargs=OmegaConf.to_container(d.student.model_kwargs, resolve=True) or {},
            student_seed=d.student.seed, input=d.input, taps=taps, epochs=d.epochs, batch_size=d.batch_size,
            lr=d.lr, weight_decay=d.weight_decay, augment_ops=augment, seed=d.seed, device=dev,
            num_workers=workers, progress=cfg.progress)
    if how == "alias" or how.isdigit():
        return None
    raise ValueError(f"field 'candidate': '{how}' is not one of alias, multitask, timm, distill or a version number")


@tool("refresh")
def main(cfg) -> None:
    from heads.checks.contract import Tolerances
    from registry.jobs.refresh import refresh_job

    ws = workspace(cfg)
    mlflow_client = client(cfg, ws)
    dev, workers = device(cfg), num_workers(cfg)
    build = builder(cfg, mlflow_client, ws, dev, workers)
    c = cfg.contract
    built, result = refresh_job(
        mlflow_client, ws, build=build, candidate="candidate" if build is None and str(cfg.candidate) == "alias"
        else str(cfg.candidate), tolerances=Tolerances(c.tolerance, c.slice_tolerance, c.min_slice_size),
        batch_size=cfg.batch_size, num_workers=workers, device=dev, progress=cfg.progress, promote=cfg.promote,
        cascade=cfg.cascade)
    if built is not None and built.how == "distill":
        f = built.figures
        print(f"student vs teacher: {f.get('speedup_vs_teacher', float('nan')):.2f}x the speed, "
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
