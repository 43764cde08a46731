"""Timing that survives a busy machine: contenders interleaved round by round.

Absolute times on a shared machine drift from second to second; running every contender
once per round, in a rotating order, makes drift hit all of them alike, so differences
and ratios taken within a round are steady even when the times are not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
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
) -> dict[str, list[float]]:
    """Time each contender once per repeat, interleaved, in milliseconds.

    Args:
        contenders: ``{name: fn}``; ``fn()`` does one complete unit of work (e.g. one pass
            over every batch) and is called with nothing else running in between.
        warmup: untimed calls of each contender first (allocator, caches, cuDNN choices).
        repeats: timed calls of each contender.
        device: synchronised before and after each call when it is a GPU.

    Returns:
        ``{name: [ms of repeat 0, ms of repeat 1, ...]}``; index ``i`` of every list comes
        from the same round.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    sync(device)
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
