"""trunk.timing: contenders timed in turns on the same work."""

import pytest

from trunk.timing import interleaved, speed_phrase, spread, times_faster


def test_interleaved_warms_up_then_rotates_the_order():
    calls: list[str] = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved(contenders, warmup=1, repeats=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert set(times) == set("abc")
    assert all(len(v) == 3 and all(isinstance(t, float) for t in v) for v in times.values())
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        interleaved(contenders, warmup=0, repeats=0)


def test_warmup_lasts_at_least_warmup_s():
    import time

    starts: list[float] = []

    def work():
        starts.append(time.perf_counter())
        time.sleep(0.005)

    interleaved({"a": work}, warmup=1, repeats=2, warmup_s=0.05)
    # The timed calls are the last two; the first of them starts after 0.05 s of warm-up.
    assert len(starts) >= 2 + 2 and starts[-2] - starts[0] >= 0.05


def test_speed_is_worded_in_one_direction_from_the_times_shown():
    # The cascade's own figures: 4.020 -> 4.577 ms per image is slower, whatever else was measured.
    assert speed_phrase("candidate trunk", 4.020, 4.577) == "candidate trunk is 1.14x slower"
    assert speed_phrase("candidate trunk", 4.577, 4.020) == "candidate trunk is 1.14x faster"
    assert speed_phrase("candidate trunk", 4.0, 4.001) == "candidate trunk runs at the same speed"
    assert speed_phrase("candidate trunk", 4.0, 0.0) == "candidate trunk: speed not measured"
    assert times_faster(0.88) == "1.14x slower" and times_faster(8.0) == "8.00x faster"
    assert times_faster(float("nan")) == "unmeasured"


def test_spread_of_repeats():
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {"median": 3.0, "q1": 2.0, "q3": 4.0, "iqr": 2.0, "min": 1.0, "max": 5.0, "n": 5}
    assert spread([7.0])["iqr"] == 0.0
    with pytest.raises(ValueError, match="no measurements"):
        spread([])
