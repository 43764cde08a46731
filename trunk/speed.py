"""Two trunks side by side: time, FLOPs and parameters of their ``pooled`` forward.

Used to tell what a distilled or quantized student buys over its teacher. Both trunks run on the very
same batch, interleaved round by round (:func:`trunk.timing.interleaved`), so load on a
shared machine hits both alike. The stated ``speedup`` is the ratio of the two median
times that are reported beside it (so the sentence and the milliseconds always agree); the
spread of the per-round ratios says how steady it was. FLOPs are counted on one image with
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions, 2 FLOPs
per multiply-add), as :mod:`heads.training.cost` does for heads.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

from trunk.timing import interleaved, spread
from trunk.model import POOLED, Trunk


def _gflops(trunk: Trunk, image: torch.Tensor) -> float:
    # One image: the count is per image already, no division by batch size needed. The float
    # network's pooled forward (what Trunk.forward runs for `pooled`): a quantized trunk's int8
    # kernels are invisible to the counter, and its architecture's FLOPs are the float one's.
    model = trunk.model
    counter = FlopCounterMode(display=False)
    with counter:
        model.forward_head(model.forward_features(image.to(next(model.parameters()).device)), pre_logits=True)
    return counter.get_total_flops() / 1e9


def weight_bytes(trunk: Trunk) -> int:
    """Bytes of the weights the trunk's ``forward`` runs with: every state tensor, at its real size.

    A quantized trunk (:mod:`trunk.quantize`) counts its serving network: int8 values 1 byte
    each, with their scales and zero points; 16-bit ones 2 bytes.
    """
    serving = getattr(trunk, "serving_weight_bytes", None)
    if callable(serving):
        return int(serving())
    return int(sum(t.numel() * t.element_size() for t in trunk.model.state_dict().values()))


def _params(trunk: Trunk) -> int:
    return int(sum(p.numel() for p in trunk.model.parameters()))


def trunk_size(trunk: Trunk) -> dict[str, float]:
    """GFLOPs per image (at the trunk's own input size), parameters and serving weight bytes of one trunk."""
    image = torch.zeros(1, *trunk.data_config["input_size"])
    probe = copy.deepcopy(trunk).cpu().eval()
    with torch.inference_mode():
        gflops = _gflops(probe, image)
    return {"gflops": gflops, "params": _params(trunk), "weight_bytes": weight_bytes(trunk)}


def compare_trunks(
    teacher: Trunk,
    student: Trunk,
    pixels: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    repeats: int = 20,
    warmup: int = 3,
    warmup_s: float = 0.5,
) -> dict[str, float]:
    """Time, FLOPs and parameters of two trunks' ``pooled`` forward on the same batch.

    The trunks themselves are left untouched: copies are measured, in eval mode, under
    the process's current torch thread settings.

    Args:
        teacher: the reference trunk (the numerator of ``speedup`` and ``flops_ratio``).
        student: the trunk compared with it.
        pixels: a preprocessed batch ``(B, 3, H, W)`` both trunks accept.
        device: where to run.
        repeats: timed rounds; each round runs both trunks once, in rotating order.
        warmup: untimed rounds first.
        warmup_s: at least this many seconds of untimed rounds (see :func:`trunk.timing.interleaved`).

    Returns:
        ``teacher_ms_per_image`` and ``student_ms_per_image`` (median round over the batch
        size) with their quartiles ``teacher_ms_per_image_q1`` / ``_q3`` and
        ``student_ms_per_image_q1`` / ``_q3``, ``speedup`` (teacher / student of those two
        medians: above 1 the student is faster), ``speedup_q1`` and ``speedup_q3`` (quartiles
        of the per-round teacher/student ratios, the spread of ``speedup``), ``rounds``,
        ``teacher_gflops`` and ``student_gflops`` (per image), ``flops_ratio``
        (teacher/student), ``teacher_params`` and ``student_params`` (the float architecture's);
        a trunk's serving weight bytes are :func:`weight_bytes`.

    Raises:
        ValueError: ``pixels`` is not a non-empty ``(B, 3, H, W)`` batch.
    """
    if pixels.ndim != 4 or pixels.shape[0] < 1 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be a non-empty (B, 3, H, W) batch, got shape {tuple(pixels.shape)}")
    device = torch.device(device)
    trunks = {name: copy.deepcopy(t).to(device).eval() for name, t in (("teacher", teacher), ("student", student))}
    x = pixels.to(device)
    batch = x.shape[0]
    with torch.inference_mode():
        gflops = {name: _gflops(t, x[:1]) for name, t in trunks.items()}
        # Default arguments bind each trunk now, not the loop variable's last value.
        times = interleaved({name: (lambda t=t: t(x, [POOLED])) for name, t in trunks.items()},
                            warmup=warmup, repeats=repeats, device=device, warmup_s=warmup_s)
    teacher_ms, student_ms = spread(times["teacher"]), spread(times["student"])
    # The ratio stated is the one of the medians stated: a median of per-round ratios can
    # disagree with them (even its direction) when rounds are noisy, so it only gives the spread.
    ratios = spread([a / b for a, b in zip(times["teacher"], times["student"])])
    out: dict[str, float] = {
        "teacher_ms_per_image": teacher_ms["median"] / batch,
        "teacher_ms_per_image_q1": teacher_ms["q1"] / batch,
        "teacher_ms_per_image_q3": teacher_ms["q3"] / batch,
        "student_ms_per_image": student_ms["median"] / batch,
        "student_ms_per_image_q1": student_ms["q1"] / batch,
        "student_ms_per_image_q3": student_ms["q3"] / batch,
        "speedup": teacher_ms["median"] / student_ms["median"] if student_ms["median"] > 0 else float("inf"),
        "speedup_q1": ratios["q1"],
        "speedup_q3": ratios["q3"],
        "rounds": repeats,
        "teacher_gflops": gflops["teacher"],
        "student_gflops": gflops["student"],
        "flops_ratio": gflops["teacher"] / gflops["student"] if gflops["student"] > 0 else float("inf"),
        "teacher_params": _params(teacher),
        "student_params": _params(student),
    }
    return out


def measure_trunks(trunks: Mapping[str, Trunk], pixels: torch.Tensor, *, device: str = "cpu", repeats: int = 20,
                   warmup: int = 3, warmup_s: float = 0.5) -> dict[str, dict[str, float]]:
    """Any number of trunks' ``pooled`` forward on the same batch, interleaved round by round.

    Returns:
        ``{name: {"ms_per_image", "ms_per_image_q1", "ms_per_image_q3", "gflops", "params",
        "bytes"}}``: median time per image and its quartiles, and :func:`trunk_size`'s figures
        (``bytes``: the serving weights).
    """
    dev = torch.device(device)
    copies = {n: copy.deepcopy(t).to(dev).eval() for n, t in trunks.items()}
    x = pixels.to(dev)
    with torch.inference_mode():
        times = interleaved({n: (lambda t=t: t(x, [POOLED])) for n, t in copies.items()}, warmup=warmup,
                            repeats=repeats, device=dev, warmup_s=warmup_s)
    out = {}
    for n, t in trunks.items():
        s = spread(times[n])
        size = trunk_size(t)
        out[n] = {"ms_per_image": s["median"] / x.shape[0], "ms_per_image_q1": s["q1"] / x.shape[0],
                  "ms_per_image_q3": s["q3"] / x.shape[0], "gflops": size["gflops"], "params": size["params"],
                  "bytes": size["weight_bytes"]}
    return out
