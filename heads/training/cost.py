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
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from heads.store import LoadedHead

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


def measure_in_bank(
    name: str,
    heads: Mapping[str, LoadedHead],
    features: Mapping[str, torch.Tensor],
    *,
    repeats: int = 30,
    device: str | torch.device = "cpu",
) -> float:
    """Milliseconds per image that head ``name`` adds inside a bank of ``heads``.

    The release's real mix matters: a linear head on a tap that other linear heads read
    joins their fused matrix product and adds almost nothing, while a branch or MLP head
    runs on its own. Two banks, with and without the head, run on the same trunk
    features, interleaved round by round (:func:`trunk.timing.interleaved`); the result
    is the median per-round difference over the batch size, floored at zero because a
    fused head can cost less than the timing noise.

    Args:
        name: the head to cost; a key of ``heads``.
        heads: every head of the bank, this one included.
        features: ``{tap: (B, ...) tensor}`` from ``Trunk.forward`` on real images,
            covering every head's tap.
        repeats: timed rounds.
        device: where to run.
    """
    from heads.bank import HeadBank
    from trunk.timing import interleaved

    if name not in heads:
        raise ValueError(f"head '{name}' is not among the bank's heads ({', '.join(sorted(heads))})")
    with_head = HeadBank(heads).to(device)
    others = {k: v for k, v in heads.items() if k != name}
    without = HeadBank(others).to(device) if others else None
    feats = {k: v.to(device) for k, v in features.items()}
    batch = next(iter(feats.values())).shape[0]
    with torch.inference_mode():
        times = interleaved({"with": lambda: with_head(feats), "without": lambda: without(feats) if without else None},
                            warmup=WARMUP, repeats=repeats, device=device)
    diffs = [a - b for a, b in zip(times["with"], times["without"])]
    return max(0.0, statistics.median(diffs)) / batch
