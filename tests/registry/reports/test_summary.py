"""registry.reports.summary: step lines are logged always and shown only when the caller asks."""

import logging

from registry.reports.summary import narrator


def test_narrator_logs_every_line_and_echoes_only_when_asked(caplog):
    shown: list[str] = []
    logger = logging.getLogger("vtp.test.narrator")
    with caplog.at_level(logging.INFO, logger="vtp.test.narrator"):
        narrator(logger, shown.append)("[1/2] shown and logged")
        narrator(logger, None)("[2/2] logged only")
    assert shown == ["[1/2] shown and logged"]
    assert [r.getMessage() for r in caplog.records] == ["[1/2] shown and logged", "[2/2] logged only"]
