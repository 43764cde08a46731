"""Quantized trunks against their fp32 source: speed, serving weight bytes, feature drift, one run.

Every contender runs the very same batches, interleaved round by round
(:func:`trunk.timing.interleaved`), so a busy machine slows all alike and the ratios hold
when the absolute images/s do not. Weights are random (speed does not depend on them);
static int8 calibrates on random normal pixels, which is what normalised images look like
to the first convolution. The drift figures (max abs difference and cosine of ``pooled``
against fp32) therefore check the mechanism, not accuracy on real images: the refresh
cascade measures that, head by head.

Goals on a CPU: int8 ``static`` at least 2x the fp32 images/s; serving weights at most
1/3 of fp32's bytes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from trunk.model import POOLED, Trunk, TrunkError
from trunk.quantize import INT8_SCHEMES, quantize_trunk
from trunk.speed import trunk_size, weight_bytes
from trunk.timing import interleaved, spread

CPU_SCHEMES = ("static", "dynamic", "weight_only")
GPU_SCHEMES = ("float16", "bfloat16", "weight_only")
GOAL_SPEEDUP = 2.0
GOAL_SIZE_RATIO = 1 / 3


def run_quantize_benchmark(model: str = "resnet50", image_size: int = 224, batch_size: int = 8, n_batches: int = 4,
                           repeats: int = 5, warmup: int = 1, schemes: Sequence[str] | None = None,
                           calibration: int = 32, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """fp32 against each scheme on the same batches.

    Args:
        model: timm model name (random init).
        image_size: square input side.
        batch_size, n_batches: one timed unit is a pass over ``n_batches`` batches.
        repeats: timed rounds (each runs every contender once, in rotating order).
        warmup: untimed rounds first.
        schemes: the schemes to compare; None: static, dynamic, weight_only on a CPU,
            float16, bfloat16, weight_only on a GPU. A scheme the family cannot take is
            reported as refused, with its one-line reason.
        calibration: random images static int8 calibrates on.
        seed: weights, calibration images and batches.
        device: where fp32 and 16-bit run; int8 runs on the CPU (its kernels exist only there).

    Returns:
        ``model``, ``image_size``, ``batch_size``, ``n_batches``, ``repeats``, ``threads``,
        ``device``, ``gflops``, ``fp32`` (``images_per_s``, ``weight_bytes``) and ``schemes``:
        per scheme ``images_per_s``, ``speedup`` (fp32 median / its median) with
        ``speedup_q1``/``_q3`` (per-round ratios), ``weight_bytes``, ``size_ratio``,
        ``stored_bytes``, ``max_abs_diff``, ``cosine_mean``, ``cosine_min``, ``build_s``,
        ``device``; or ``refused`` (the reason).
    """
    dev = torch.device(device)
    schemes = list(schemes) if schemes is not None else list(GPU_SCHEMES if dev.type == "cuda" else CPU_SCHEMES)
    source = Trunk(model, seed=seed, data_config={"input_size": [3, image_size, image_size], "crop_pct": 1.0})
    gen = torch.Generator().manual_seed(seed)
    calib = torch.randn(calibration, 3, image_size, image_size, generator=gen)
    batches = [torch.randn(batch_size, 3, image_size, image_size, generator=gen) for _ in range(n_batches)]
    contenders: dict[str, Trunk] = {"fp32": source.to(dev)}
    result: dict[str, Any] = {"model": model, "image_size": image_size, "batch_size": batch_size,
                              "n_batches": n_batches, "repeats": repeats, "threads": torch.get_num_threads(),
                              "device": str(dev), "gflops": trunk_size(source)["gflops"], "schemes": {}}
    for scheme in schemes:
        started = time.perf_counter()
        try:
            q = quantize_trunk(source, scheme, calibration=calib)
        except TrunkError as e:
            result["schemes"][scheme] = {"refused": str(e)}
            continue
        contenders[scheme] = q.to(dev)
        result["schemes"][scheme] = {"build_s": round(time.perf_counter() - started, 2),
                                     "device": "cpu" if scheme in INT8_SCHEMES else str(dev)}
    on_dev = [b.to(dev) for b in batches]

    def one_pass(trunk: Trunk):
        return lambda: [trunk(b, [POOLED]) for b in on_dev]

    with torch.inference_mode():
        reference = torch.cat([source(b, [POOLED])[POOLED].float().cpu() for b in on_dev])
        times = interleaved({name: one_pass(t) for name, t in contenders.items()}, warmup=warmup, repeats=repeats,
                            device=dev)
        images = batch_size * n_batches
        fp32_ms = spread(times["fp32"])["median"]
        result["fp32"] = {"images_per_s": images / (fp32_ms / 1000), "weight_bytes": weight_bytes(source)}
        for name, trunk in contenders.items():
            if name == "fp32":
                continue
            ms = spread(times[name])["median"]
            ratios = spread([a / b for a, b in zip(times["fp32"], times[name])])
            pooled = torch.cat([trunk(b, [POOLED])[POOLED].float().cpu() for b in on_dev])
            cos = torch.nn.functional.cosine_similarity(pooled, reference)
            result["schemes"][name].update({
                "images_per_s": images / (ms / 1000), "speedup": fp32_ms / ms, "speedup_q1": ratios["q1"],
                "speedup_q3": ratios["q3"], "weight_bytes": weight_bytes(trunk),
                "size_ratio": weight_bytes(trunk) / result["fp32"]["weight_bytes"],
                "stored_bytes": trunk.stored_weight_bytes(),
                "max_abs_diff": float((pooled - reference).abs().max()), "cosine_mean": float(cos.mean()),
                "cosine_min": float(cos.min())})
    return result


def format_quantize_table(result: dict[str, Any]) -> str:
    """The result as a text table, with the goals and whether each scheme met them."""
    f = result["fp32"]
    lines = [f"{result['model']} {result['image_size']}px, batch {result['batch_size']} x {result['n_batches']}, "
             f"{result['repeats']} interleaved rounds, {result['threads']} threads, {result['device']}, "
             f"{result['gflops']:.2f} GFLOPs/image (float architecture)",
             f"{'scheme':<12}{'images/s':>10}{'vs fp32':>18}{'weight MB':>11}{'size':>7}{'stored MB':>11}"
             f"{'max|d|':>9}{'cos mean':>10}{'cos min':>9}",
             f"{'fp32':<12}{f['images_per_s']:>10.1f}{'1.00x':>18}{f['weight_bytes'] / 1e6:>11.1f}{'1.00':>7}"
             f"{f['weight_bytes'] / 1e6:>11.1f}{'-':>9}{'-':>10}{'-':>9}"]
    for name, s in result["schemes"].items():
        if "refused" in s:
            lines.append(f"{name:<12}refused: {s['refused']}")
            continue
        ratio = f"{s['speedup']:.2f}x [{s['speedup_q1']:.2f}-{s['speedup_q3']:.2f}]"
        lines.append(f"{name:<12}{s['images_per_s']:>10.1f}{ratio:>18}{s['weight_bytes'] / 1e6:>11.1f}"
                     f"{s['size_ratio']:>7.2f}{s['stored_bytes'] / 1e6:>11.1f}{s['max_abs_diff']:>9.3g}"
                     f"{s['cosine_mean']:>10.4f}{s['cosine_min']:>9.4f}")
    static = result["schemes"].get("static", {})
    if "speedup" in static:
        lines.append(f"goals: static int8 >= {GOAL_SPEEDUP:.0f}x fp32 images/s: {static['speedup']:.2f}x "
                     f"({'met' if static['speedup'] >= GOAL_SPEEDUP else 'NOT met'}); serving weights <= 1/3 of "
                     f"fp32: {static['size_ratio']:.2f} ({'met' if static['size_ratio'] <= GOAL_SIZE_RATIO else 'NOT met'})")
    lines.append("stored MB: what the saved trunk holds (the fp32 reference that branch heads copy included; "
                 "weight_only stores int8 only)")
    return "\n".join(lines)
