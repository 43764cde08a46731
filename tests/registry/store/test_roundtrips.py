"""Round trips of the registry's operations through a real ``mlflow server`` do not grow with the head count.

The benchmark's own counting (:func:`benchmarks.roundtrips.count_requests`: every HTTP
request is still sent) at 3 and 12 heads in production; exact counts vary with MLflow's
version, so the test asserts equality across head counts and a loose upper bound.
"""

from __future__ import annotations

import pytest

from benchmarks.roundtrips import OPERATIONS, run_roundtrip_benchmark


@pytest.mark.slow  # two servers, 15 heads registered, each operation once: about a minute on 2 busy cores
def test_round_trips_do_not_grow_with_heads(tmp_path):
    result = run_roundtrip_benchmark((3, 12), root=tmp_path)
    small, large = result["counts"][3], result["counts"][12]
    assert set(small) == set(OPERATIONS)
    # A promotion builds the new release from production's heads pack (two downloads) and the
    # promoted head's two files, and uploads the new model's files (its pack is two): the same
    # registry calls and artifact requests at 3 and 12 heads.
    assert small["promote"]["api"] == large["promote"]["api"] <= 60
    assert small["promote"]["artifacts"] == large["promote"]["artifacts"] <= 30
    assert small["resolve_head"]["total"] == large["resolve_head"]["total"] <= 4
    # Loading a release, as a pyfunc model or as a job's trunk and heads, reads the one pack.
    assert small["load_release"]["api"] == large["load_release"]["api"] <= 4
    assert small["load_release"]["artifacts"] == large["load_release"]["artifacts"] <= 30
    assert small["job_load"]["total"] == large["job_load"]["total"] <= 20
    assert all(result["independent"][op] for op in ("promote", "load_release", "job_load", "resolve_head"))
