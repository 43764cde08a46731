"""A head's or a release's drift across classification jobs; recommends (and with retrain=true starts) retraining.

    python -m tools.monitor head=colour
    python -m tools.monitor release=production last=5
    python -m tools.monitor head=colour retrain=true

Reads the MLflow experiment ``monitoring`` (one run per ``tools.classify`` job), prints one
row per job and head (verdict, label PSI, feature p-value, low-confidence share), writes a
time-series PNG per head into ``output`` (default ``<workspace>/monitor``), and recommends
retraining every head whose verdict was ``drift`` in each of its last ``last`` jobs. With
``retrain=true`` it runs ``tools.train_head``'s job (train, gate, register, promote) for each
of them on the labelled data its head config names (conf/heads/<name>.yaml: refresh that
data first): input drift means the images changed, so the head needs fresh labels, not the
trunk-refresh cascade, which retrains heads on the data they already had.
"""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

from tools.common import (
    client,
    device,
    head_spec,
    named_head,
    num_workers,
    tool,
    workspace,
)


def _num(x, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


@tool("monitor")
def main(cfg) -> None:
    from datetime import datetime

    from registry.jobs.monitor import head_points, history, recommendations
    from registry.reports.drift import plot_history
    from registry.store.releases import PRODUCTION, production_version

    ws = workspace(cfg)
    mlflow = client(cfg, ws)
    release = None
    if cfg.release is not None:
        release = production_version(mlflow) if str(cfg.release) == PRODUCTION else int(cfg.release)
        if release is None:
            raise SystemExit("error: field 'release': there is no production release")
    head = str(cfg.head["name"]) if cfg.head is not None else None
    runs = history(mlflow, head=head, release=release)
    what = f"head {head}" if head else f"release v{release}"
    if not runs:
        print(f"no monitoring runs for {what} (tools.classify logs one per job, with monitor=true)")
        return
    heads = sorted({h for r in runs for h in r["heads"]})
    folder = Path(cfg.output) if cfg.output else Path(ws.root) / "monitor"
    header = (f"  {'time (UTC)':<17} {'head':<12} {'ver':>4} {'verdict':<7} {'label PSI':>9} {'feature p':>9} "
              f"{'low conf':>8}  output")
    lines = [f"drift of {what} across {len(runs)} jobs (MLflow experiment 'monitoring'):", header]
    for r in runs:
        when = datetime.fromtimestamp(r["time"], tz=UTC).strftime("%Y-%m-%d %H:%M")
        for h, f in sorted(r["heads"].items()):
            lines.append(f"  {when:<17} {h:<12} {f.get('version') or '-'!s:>4} {f['verdict']:<7} "
                         f"{_num(f.get('label_psi')):>9} {_num(f.get('feature_p'), '{:.2g}'):>9} "
                         f"{_num(f.get('low_confidence_share'), '{:.1%}'):>8}  {r['tags'].get('output', '')}")
    for h in heads:
        png = plot_history(head_points(runs, h), h, folder / f"history-{h}.png")
        lines.append(f"  plot: {png}")
    flagged = recommendations(runs, last=cfg.last)
    if not flagged:
        lines.append(f"no head drifted in each of its last {cfg.last} jobs: no retraining recommended")
    for h in sorted(flagged):
        lines.append(f"RETRAIN {h}: drift in each of its last {cfg.last} jobs (runs {', '.join(flagged[h])}); "
                     f"refresh its labelled data and run python -m tools.train_head head={h}"
                     + ("" if cfg.retrain else ", or rerun this with retrain=true"))
    print("\n".join(lines))
    if not (cfg.retrain and flagged):
        return
    from registry.jobs.train import train_head_job
    from registry.reports.summary import head_job_lines

    for h in sorted(flagged):
        print(f"retraining {h}: tools.train_head's job on the data its config names (train, gate, register, promote)")
        spec = head_spec(cfg) if h == head else named_head(h, ws)
        job = train_head_job(mlflow, spec, workspace=ws,
                             batch_size=cfg.batch_size, num_workers=num_workers(cfg), device=device(cfg),
                             progress=cfg.progress, promote=True)
        print("\n".join(head_job_lines(job)))


if __name__ == "__main__":
    main()
