"""Round trips of the registry's operations through a real ``mlflow server`` do not grow with the head count.

The benchmark's own counting (:func:`benchmarks.roundtrips.count_requests`: every HTTP
request is still sent) at 3 and 12 heads in production; exact counts vary with MLflow's
version, so the test asserts equality across head counts and a loose upper bound, and
that artifact transfers stay within one request per head file.
"""

from __future__ import annotations

import pytest

from benchmarks.roundtrips import OPERATIONS, run_roundtrip_benchmark

# Operations that move no head files: their count is the same at any head count.
FLAT = ("promote_api", "resolve_head")


@pytest.mark.slow  # two servers, 15 heads registered, each operation once: about a minute on 2 busy cores
def test_round_trips_do_not_grow_with_heads(tmp_path):
    result = run_roundtrip_benchmark((3, 12), root=tmp_path)
    small, large = result["counts"][3], result["counts"][12]
    assert set(small) == set(OPERATIONS)
    # Promotion's registry calls are the same at 3 and 12 heads; its artifact requests are the
    # release model's files: per head, one download and one upload of each of its two files.
    assert small["promote"]["api"] == large["promote"]["api"] <= 60
    assert large["promote"]["artifacts"] - small["promote"]["artifacts"] == 9 * 4
    assert small["resolve_head"]["total"] == large["resolve_head"]["total"] <= 4
    # Loading a release downloads each head's two files, nothing per head besides.
    assert small["load_release"]["api"] == large["load_release"]["api"] <= 4
    assert large["load_release"]["artifacts"] - small["load_release"]["artifacts"] <= 9 * 3
