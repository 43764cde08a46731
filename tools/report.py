"""Print the production leaderboard and the heads' trunk dependencies; log both and a PNG to MLflow.

    python -m tools.report
"""

from __future__ import annotations

from tools.common import client, tool, workspace


@tool("report")
def main(cfg) -> None:
    from registry.reports.report import log_report

    ws = workspace(cfg)
    report = log_report(client(cfg, ws), ws.root)
    print(report["table"])
    print()
    print(report["dependencies_text"])
    print()
    print(f"plot: {report['png']}  (MLflow experiment 'reports', run {report['run_id']})")


if __name__ == "__main__":
    main()
