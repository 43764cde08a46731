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

from pathlib import Path

from tools.common import client, device, head_spec, named_head, num_workers, tool, workspace


@tool("monitor")
def main(cfg) -> None:
    from registry.jobs.monitor import history, history_lines, retrain
    from registry.jobs.train import train_head_job
    from registry.reports.summary import head_job_lines
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
    folder = Path(cfg.output) if cfg.output else Path(ws.root) / "monitor"
    lines, flagged = history_lines(runs, what, folder, last=cfg.last, retrain_offered=not cfg.retrain)
    print("\n".join(lines))
    if not (cfg.retrain and flagged):
        return

    def train(h: str):
        print(f"retraining {h}: tools.train_head's job on the data its config names (train, gate, register, promote)")
        job = train_head_job(mlflow, head_spec(cfg) if h == head else named_head(h, ws), workspace=ws,
                             batch_size=cfg.batch_size, num_workers=num_workers(cfg), device=device(cfg),
                             progress=cfg.progress, promote=True)
        print("\n".join(head_job_lines(job)))
        return job

    retrain(sorted(flagged), train)


if __name__ == "__main__":
    main()
