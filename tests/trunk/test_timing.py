"""trunk.timing: contenders timed in turns on the same work."""

import pytest

from trunk.timing import interleaved


def test_interleaved_warms_up_then_rotates_the_order():
    calls: list[str] = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved(contenders, warmup=1, repeats=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert set(times) == set("abc")
    assert all(len(v) == 3 and all(isinstance(t, float) for t in v) for v in times.values())
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        interleaved(contenders, warmup=0, repeats=0)
