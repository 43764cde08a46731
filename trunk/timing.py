"""Timing that survives a busy machine: contenders interleaved round by round.

Absolute times on a shared machine drift from second to second; running every contender
once per round, in a rotating order, makes drift hit all of them alike, so differences
and ratios taken within a round are steady even when the times are not.

Every figure a report states comes with its spread (:func:`spread`), and speed is always
worded one way (:func:`times_faster`, :func:`speed_phrase`): "1.14x slower" or "1.12x
faster", computed from the very times shown beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    contenders: Mapping[str, Callable[[], Any]],
    *,
    warmup: int,
    repeats: int,
    device: str | torch.device = "cpu",
    warmup_s: float = 0.0,
) -> dict[str, list[float]]:
    """Time each contender once per repeat, interleaved, in milliseconds.

    Args:
        contenders: ``{name: fn}``; ``fn()`` does one complete unit of work (e.g. one pass
            over every batch) and is called with nothing else running in between.
        warmup: untimed calls of each contender first (allocator, caches, cuDNN choices).
        repeats: timed calls of each contender.
        device: synchronised before and after each call when it is a GPU.
        warmup_s: keep warming up (whole rounds) until at least this many seconds have
            passed. Lazy initialisation, allocator growth and CPU clock ramp-up can span
            more than a fixed number of calls; a floor in time covers them whatever the
            cost of one call.

    Returns:
        ``{name: [ms of repeat 0, ms of repeat 1, ...]}``; index ``i`` of every list comes
        from the same round.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    names = list(contenders)
    started, rounds = time.perf_counter(), 0
    while rounds < warmup or time.perf_counter() - started < warmup_s:
        for name in names:
            contenders[name]()
        sync(device)
        rounds += 1
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        # Rotate the order so no contender always runs first (cold) or right after the heaviest.
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            contenders[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and range of repeated measurements.

    Returns:
        ``{"median", "q1", "q3", "iqr", "min", "max", "n"}``; quartiles by
        :func:`statistics.quantiles` (inclusive method), equal to the value when there is one.
    """
    if not values:
        raise ValueError("spread of no measurements")
    values = [float(v) for v in values]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": min(values), "max": max(values), "n": len(values)}


def times_faster(ratio: float, digits: int = 2) -> str:
    """A speed ratio in words, one direction everywhere.

    Args:
        ratio: reference time / candidate time (above 1: the candidate takes less time).
        digits: decimals shown.

    Returns:
        ``"1.12x faster"``, ``"1.14x slower"`` (the factor is always at least 1, so the
        word alone gives the direction), or ``"the same speed"`` when the rounded factor is 1.
    """
    if not 0 < ratio < float("inf"):
        return "unmeasured"
    factor = ratio if ratio >= 1 else 1 / ratio
    if round(factor, digits) == 1:
        return "the same speed"
    return f"{factor:.{digits}f}x {'faster' if ratio > 1 else 'slower'}"


def speed_phrase(subject: str, reference_ms: float, candidate_ms: float, digits: int = 2) -> str:
    """``"<subject> is 1.14x slower"``, from the two times the sentence sits beside.

    Args:
        subject: what is compared with the reference (``"candidate trunk"``).
        reference_ms: the reference's time (any unit, the same for both).
        candidate_ms: the subject's time.
    """
    ratio = reference_ms / candidate_ms if candidate_ms > 0 else float("inf")
    word = times_faster(ratio, digits)
    if word == "unmeasured":
        return f"{subject}: speed not measured"
    return f"{subject} is {word}" if word != "the same speed" else f"{subject} runs at the same speed"
