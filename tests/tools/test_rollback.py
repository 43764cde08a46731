"""tools.rollback: production goes back one release per run; refusals are one line, exit status 2.

The registry state is built in-process with the registry tests' fixtures (a pre-migrated
SQLite store, a tiny trunk, fabricated heads); the tool runs once as the README runs it
(a subprocess) and otherwise from its composed config, which is the same code path.
"""

from __future__ import annotations

import sys

import pytest
from hydra import compose, initialize_config_dir

from registry.store.heads import register_head
from registry.store.releases import bootstrap_release, get_release, promote_head
from registry.store.trunks import register_trunk
from tests.registry.conftest import client, make_result, migrated_db, trunk_a, workspace  # noqa: F401 (fixtures)
from tests.tools.test_tools import run_tool
from tools.common import CONF_DIR


@pytest.fixture
def history(client, trunk_a, make_result):  # noqa: F811
    """Production v1 (no heads) -> v2 (colour v1) -> v3 (+shape v1) -> v4 (shape v2)."""
    tv = register_trunk(client, trunk_a)
    register_head(client, make_result(trunk_a, "colour"), trunk_version=tv)
    register_head(client, make_result(trunk_a, "shape", classes=("circle", "square")), trunk_version=tv)
    register_head(client, make_result(trunk_a, "shape", classes=("circle", "square"), seed=1), trunk_version=tv)
    bootstrap_release(client, tv)
    promote_head(client, "colour", 1)
    promote_head(client, "shape", 1)
    promote_head(client, "shape", 2)
    return tv


def rollback_in_process(ws, *overrides: str) -> None:
    from tools.common import composition_error_line
    from tools.rollback import main

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="rollback", overrides=[f"workspace={ws}", *overrides])
    except Exception as e:  # what the tool prints when Hydra refuses the command line
        print(f"error: {composition_error_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    main(cfg)  # Hydra hands a composed config straight to the tool, error handling included


def test_rollback_tool_goes_back_one_release_per_run(client, history, workspace, capsys):  # noqa: F811
    proc = run_tool("rollback", f"workspace={workspace}")
    assert proc.stdout.strip() == f"production: release v4 -> v3 (trunk v{history}; heads colour v1, shape v1)"
    assert get_release(client).version == 3

    rollback_in_process(workspace)
    assert capsys.readouterr().out.strip() == f"production: release v3 -> v2 (trunk v{history}; heads colour v1)"
    rollback_in_process(workspace, "to=4")
    assert capsys.readouterr().out.strip() == (f"production: release v2 -> v4 (trunk v{history}; heads colour v1, "
                                               f"shape v2)")
    assert get_release(client).version == 4


def test_rollback_tool_refusals_are_one_line(client, history, workspace, capsys):  # noqa: F811
    for to, message in (("4", "error: release v4 is production already; name another version to roll back to"),
                        ("9", "error: release v9 does not exist in the registry"),
                        ("latest", "error: Error merging override to=latest: field 'to': Value 'latest' of type "
                                   "'str' could not be converted to Integer")):
        with pytest.raises(SystemExit) as info:
            rollback_in_process(workspace, f"to={to}")
        assert info.value.code == 2
        assert capsys.readouterr().err.strip() == message
    assert get_release(client).version == 4
