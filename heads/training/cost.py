"""What a head adds to the shared trunk's cost: parameters, FLOPs and time per image.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix
products and convolutions (2 FLOPs per multiply-add) and ignores cheap element-wise ops
such as activations and bias adds; for heads those are a rounding error. Time is
measured under the process's current torch thread settings, as the head would run.

Time is measured after a warm-up of at least :data:`WARMUP` calls and :data:`WARMUP_S`
seconds (a head's first calls pay for lazy initialisation and allocator growth, which
used to land in the figure), as the median of :data:`REPEATS` or more timed calls, and is
reported with its spread (``added_ms_per_image_spread``: the interquartile range per
image). A figure not above its spread is below timing noise (:func:`below_noise`, and
:func:`format_ms` says so in reports).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from heads.store import LoadedHead
from trunk import timing
from trunk.timing import spread

WARMUP = 3
# Seconds of untimed calls first, whatever one call costs (see trunk.timing.interleaved).
WARMUP_S = 0.2
REPEATS = 30


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
        repeats: timed passes, after the warm-up; the median is reported.

    Returns:
        ``{"params": int, "added_gflops": float, "added_ms_per_image": float,
        "added_ms_per_image_spread": float}`` (the spread: interquartile range of the
        timed passes, per image).
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
        times = timing.interleaved({"head": lambda: probe(x)}, warmup=WARMUP, repeats=repeats, device=device,
                                   warmup_s=WARMUP_S)["head"]
    ms = spread(times)
    return {
        "params": int(params),
        "added_gflops": float(gflops),
        "added_ms_per_image": ms["median"] / batch_size,
        "added_ms_per_image_spread": ms["iqr"] / batch_size,
    }


def bank_cost(
    name: str,
    heads: Mapping[str, LoadedHead],
    features: Mapping[str, torch.Tensor],
    *,
    repeats: int = REPEATS,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Milliseconds per image that head ``name`` adds inside a bank of ``heads``, with its spread.

    The release's real mix matters: a linear head on a tap that other linear heads read
    joins their fused matrix product and adds almost nothing, an MLP head joins its tap's
    group of like-sized MLPs, while a branch head runs its own later layers. Two banks, with and without the head, run on the same trunk
    features, interleaved round by round (:func:`trunk.timing.interleaved`) after a
    warm-up of at least :data:`WARMUP` rounds and :data:`WARMUP_S` seconds; the figure
    is the median per-round difference over the batch size, floored at zero because a
    fused head can cost less than the timing noise.

    Args:
        name: the head to cost; a key of ``heads``.
        heads: every head of the bank, this one included.
        features: ``{tap: (B, ...) tensor}`` from ``Trunk.forward`` on real images,
            covering every head's tap.
        repeats: timed rounds.
        device: where to run.

    Returns:
        ``{"added_ms_per_image", "added_ms_per_image_spread" (interquartile range of the
        per-round differences, per image), "rounds", "batch"}``.
    """
    from heads.bank import HeadBank

    if name not in heads:
        raise ValueError(f"head '{name}' is not among the bank's heads ({', '.join(sorted(heads))})")
    with_head = HeadBank(heads).to(device)
    others = {k: v for k, v in heads.items() if k != name}
    without = HeadBank(others).to(device) if others else None
    feats = {k: v.to(device) for k, v in features.items()}
    batch = next(iter(feats.values())).shape[0]
    with torch.inference_mode():
        times = timing.interleaved({"with": lambda: with_head(feats),
                                    "without": lambda: without(feats) if without else None},
                                   warmup=WARMUP, repeats=repeats, device=device, warmup_s=WARMUP_S)
    diffs = spread([a - b for a, b in zip(times["with"], times["without"])])
    return {"added_ms_per_image": max(0.0, diffs["median"]) / batch,
            "added_ms_per_image_spread": diffs["iqr"] / batch, "rounds": float(repeats), "batch": float(batch)}


def below_noise(ms: float | None, spread_ms: float | None) -> bool:
    """Whether a cost figure is not above its own timing spread (so it cannot be told from zero)."""
    return ms is not None and spread_ms is not None and ms <= spread_ms


def format_ms(ms: float | None, spread_ms: float | None = None, fmt: str = "{:.4f}") -> str:
    """A cost in ms per image for a report: with its spread, or marked as below timing noise.

    Returns:
        ``"-"`` when not measured; ``"< 0.05 (below timing noise)"`` when the figure is
        not above its spread; ``"0.5500 (IQR 0.0200)"`` otherwise; the bare figure when
        no spread was recorded (versions measured before spreads were).
    """
    if ms is None:
        return "-"
    if spread_ms is None:
        return fmt.format(ms)
    if below_noise(ms, spread_ms):
        return f"< {spread_ms:.2g} (below timing noise)" if spread_ms > 0 else "0 (below timing noise)"
    return f"{fmt.format(ms)} (IQR {fmt.format(spread_ms)})"
