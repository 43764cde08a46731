"""Print the production report: a summary, the heads that need attention first, and where the full table is.

    python -m tools.report                     # attention sections limited to attention_rows (conf/report.yaml)
    python -m tools.report full=true           # also print the full leaderboard and dependency tables

The full table (every head) is always written as CSV and Markdown under
``<workspace>/reports/<time>/`` and logged with the summary, the dependencies and an
accuracy-vs-cost PNG to the MLflow experiment ``reports`` (also as the MLflow table
``leaderboard.json``).
"""

from __future__ import annotations

from tools.common import client, tool, workspace


@tool("report")
def main(cfg) -> None:
    from registry.reports.report import log_report
    from registry.reports.summary import report_lines

    ws = workspace(cfg)
    report = log_report(client(cfg, ws), ws.root)
    print("\n".join(report_lines(report, limit=cfg.attention_rows, full=cfg.full)))


if __name__ == "__main__":
    main()
