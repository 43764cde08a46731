"""What a head adds to the shared trunk's cost: parameters, FLOPs and time per image.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix
products and convolutions (2 FLOPs per multiply-add) and ignores cheap element-wise ops
such as activations and bias adds; for heads those are a rounding error. Time is
measured under the process's current torch thread settings, as the head would run.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

WARMUP = 3


def measure_cost(
    module: nn.Module,
    in_features: int | Sequence[int],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    repeats: int = 20,
) -> dict[str, float]:
    """Parameters, GFLOPs per image and milliseconds per image of a head.

    The module itself is left untouched: a copy is measured, in eval mode.

    Args:
        module: the head.
        in_features: the width of its input vector, or the per-image input shape
            (e.g. ``(C, H, W)`` for a head on a feature map).
        device: where to time it.
        batch_size: images per timed forward pass.
        repeats: timed passes; the median is reported.

    Returns:
        ``{"params": int, "added_gflops": float, "added_ms_per_image": float}``.
    """
    shape = (in_features,) if isinstance(in_features, int) else tuple(in_features)
    params = sum(p.numel() for p in module.parameters())
    probe = copy.deepcopy(module).to(device).eval()

    with torch.inference_mode():
        # One image: the count is per image already, no division by batch size needed.
        counter = FlopCounterMode(display=False)
        with counter:
            probe(torch.zeros(1, *shape, device=device))
        gflops = counter.get_total_flops() / 1e9

        x = torch.randn(batch_size, *shape, device=device)
        is_cuda = torch.device(device).type == "cuda"
        times = []
        for i in range(WARMUP + repeats):
            if is_cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            probe(x)
            if is_cuda:
                torch.cuda.synchronize(device)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
    return {
        "params": int(params),
        "added_gflops": float(gflops),
        "added_ms_per_image": statistics.median(times) * 1000.0 / batch_size,
    }
