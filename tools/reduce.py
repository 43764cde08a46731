"""Make the trunk cheaper, automatically: search reductions through the cascade, promote the cheapest that passes.

    python -m tools.reduce                                    # the default space (conf/reduce.yaml)
    python -m tools.reduce promote=false                      # propose only
    python -m tools.reduce "space.schemes=[static]" space.students={} cost=gflops
    python -m tools.reduce "+space.students.r18={model_name: resnet18}"   # a smaller timm architecture

Every candidate is a refresh candidate (tools/candidates.py) built or reused by recipe, gated
by the cascade on every production head's contract; see registry/jobs/reduce.py.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from tools.candidates import Context, Distill, Quantize
from tools.common import client, device, num_workers, tool, workspace


def reductions(cfg, ctx: Context) -> list:
    """The configured space as :class:`registry.jobs.reduce.Reduction` s: schemes, students, students x schemes."""
    from registry.jobs.reduce import Reduction

    quantize = OmegaConf.to_container(cfg.quantize, resolve=True)
    distill = OmegaConf.to_container(cfg.distill, resolve=True)
    out = []
    for scheme in cfg.space.schemes:
        build = Quantize(scheme=scheme, **quantize).builder(ctx)
        out.append(Reduction(scheme, build, {"scheme": scheme}))
    for name, student in cfg.space.students.items():
        student = OmegaConf.to_container(student, resolve=True)
        distilled = Distill({**distill, "student": student}).builder(ctx)
        out.append(Reduction(f"student_{name}", distilled, {"student": student}))
        for scheme in cfg.space.student_schemes:
            # The student is built (or reused, same recipe) first, then quantized in turn.
            def both(distilled=distilled, scheme=scheme):
                return Quantize(scheme=scheme, source=distilled().version, **quantize).builder(ctx)()

            out.append(Reduction(f"student_{name}-{scheme}", both, {"student": student, "scheme": scheme}))
    return out


@tool("reduce")
def main(cfg) -> None:
    from heads.checks.contract import Tolerances
    from registry.jobs.cascade import Parallel
    from registry.jobs.reduce import search_reductions

    ws = workspace(cfg)
    mlflow_client = client(cfg, ws)
    dev, workers = device(cfg), num_workers(cfg)
    ctx = Context(cfg, mlflow_client, ws, dev, workers)
    c, p = cfg.contract, cfg.parallel
    result = search_reductions(
        mlflow_client, ws, reductions(cfg, ctx), tolerances=Tolerances(c.tolerance, c.slice_tolerance, c.min_slice_size),
        promote=cfg.promote, cost_key=cfg.cost, batch_size=cfg.batch_size, num_workers=workers, device=dev,
        progress=cfg.progress, parallel=Parallel(p.backend, p.workers, p.threads, p.address), echo=print)
    print()
    print(result.report["text"])
    print(f"report: {result.report['markdown']}  {result.report['png']}  (MLflow experiment 'reductions', "
          f"run {result.report['run_id']})")
    if result.chosen is None or result.refused:
        sys.exit(1)


if __name__ == "__main__":
    main()
