"""Hundreds of heads on one trunk: measured cost against what multiply-add counts predict.

Issue 13's goal: trunk + 256 pooled heads of 1000 classes within 1.05x of the ratio the
multiply-adds predict, ``(trunk MACs + head MACs) / trunk MACs`` with head MACs ``D *
sum C`` per image. Those heads are 2 GB of float32 weights, and a bank reads every weight
once per batch: at batch 8 a 4 GMAC product that must stream 2 GB runs at memory
bandwidth, far below the rate of the trunk's convolutions, so the measured ratio
overshoots the prediction. Larger batches reuse each weight read for more images;
bfloat16 and float16 weights halve the bytes (and run on AMX/AVX512-BF16/FP16 where the
CPU has them), int8 weights with per-row scales quarter them (run by the quantized CPU
engine, :class:`heads.bank._Int8Matrix`); all are timed side by side here, and each
reduced bank's logits are compared with the float32 bank's on the same features (top-1
agreement, largest logit difference).

Per batch size, one interleaved set of rounds on the same batches
(:func:`benchmarks.heads.per_batch`): the bare trunk, trunk + bank for each weight dtype,
and each bank alone on the trunk's pooled features (its ms and weight GB/s show the
bandwidth). Ratios are medians of per-round ratios (:func:`benchmarks.heads.paired_ratio`).
Then ``n_mlp`` MLP heads: one grouped bank against the same heads run one by one.

Pure torch/timm: no MLflow; write results with :func:`benchmarks.heads.write_result`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.heads import BenchTrunk, environment, make_batches, make_heads, paired_ratio, per_batch
from heads.bank import HeadBank, resolve_weight_dtype
from trunk.model import POOLED, Trunk
from trunk.speed import trunk_size
from trunk.timing import interleaved, times_faster

GOAL = 1.05


def bank_macs(bank: HeadBank, width: int) -> int:
    """Multiply-adds per image of a bank of pooled heads, counted as the trunk's are (FlopCounterMode / 2)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        device = next(iter(bank.buffers()), torch.zeros(0)).device
        bank({POOLED: torch.zeros(1, width, device=device)})
    return counter.get_total_flops() // 2


def predicted_ratio(trunk_macs: float, head_macs: float) -> float:
    """Time(trunk + heads) / time(trunk) if time were proportional to multiply-adds."""
    return (trunk_macs + head_macs) / trunk_macs


def _weight_bytes(bank: HeadBank) -> int:
    return bank.weight_bytes()


def agreement(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """``(top-1 agreement in %, max abs logit difference)`` of two banks' outputs over all heads and rows."""
    same = total = 0
    diff = 0.0
    for name, ref in reference.items():
        out = other[name].float()
        same += int((out.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0]
        diff = max(diff, float((out - ref.float()).abs().max()))
    return 100.0 * same / total if total else float("nan"), diff


def _time(contenders: Mapping[str, Callable[[torch.Tensor], Any]], batches: Sequence[torch.Tensor], warmup: int,
          repeats: int, device: torch.device) -> dict[str, list[float]]:
    with torch.inference_mode():
        return interleaved(per_batch(contenders, batches), warmup=warmup * len(batches),
                           repeats=repeats * len(batches), device=device)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _bank_rows(trunk: Trunk, banks: Mapping[str, HeadBank], batches: Sequence[torch.Tensor], *, predicted: float,
               warmup: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """Bare trunk, trunk + each bank and each bank alone, interleaved on the same batches."""
    with torch.inference_mode():
        pooled = {id(x): {POOLED: trunk(x, [POOLED])[POOLED]} for x in batches}

    def bare(x: torch.Tensor) -> None:
        trunk(x, [POOLED])

    def with_bank(bank: HeadBank) -> Callable[[torch.Tensor], None]:
        return lambda x: bank(trunk(x, bank.taps))

    def alone(bank: HeadBank) -> Callable[[torch.Tensor], None]:
        return lambda x: bank(pooled[id(x)])

    # Agreement with float32 on the same features, before the timing (no timing effect).
    agree: dict[str, tuple[float, float] | None] = {dtype: None for dtype in banks}
    if "float32" in banks:
        with torch.inference_mode():
            for dtype, bank in banks.items():
                pairs = [agreement(banks["float32"](f), bank(f)) for f in pooled.values()]
                agree[dtype] = (statistics.fmean(p[0] for p in pairs), max(p[1] for p in pairs))
    contenders: dict[str, Callable[[torch.Tensor], None]] = {"trunk": bare}
    for dtype, bank in banks.items():
        contenders[f"trunk+bank {dtype}"] = with_bank(bank)
        contenders[f"bank {dtype}"] = alone(bank)
    times = _time(contenders, batches, warmup, repeats, device)
    rows = []
    for dtype, bank in banks.items():
        ratio = paired_ratio(times[f"trunk+bank {dtype}"], times["trunk"])
        heads_ms = _median(times[f"bank {dtype}"])
        weight_bytes = _weight_bytes(bank)
        rows.append({
            "batch_size": len(batches[0]), "weight_dtype": dtype,
            "trunk_ms": _median(times["trunk"]), "ms": _median(times[f"trunk+bank {dtype}"]),
            "ratio": ratio, "predicted": predicted, "vs_predicted": ratio / predicted,
            "passed": ratio / predicted <= GOAL,
            "heads_ms": heads_ms, "weight_gb": weight_bytes / 1e9,
            "heads_gb_per_s": weight_bytes / 1e9 / (heads_ms / 1000.0) if heads_ms > 0 else float("inf"),
            "top1_agree_pct": agree[dtype][0] if agree[dtype] else None,
            "max_logit_diff": agree[dtype][1] if agree[dtype] else None,
        })
    return rows


def _mlp_row(heads: Mapping[str, Any], features: Sequence[torch.Tensor], *, warmup: int, repeats: int,
             device: torch.device) -> dict[str, Any]:
    """The MLP heads grouped in one bank against the same modules called one by one."""
    bank = HeadBank(heads).to(device)
    modules: list[nn.Module] = [h.module.to(device).eval() for h in heads.values()]

    def grouped(x: torch.Tensor) -> None:
        bank({POOLED: x})

    def one_by_one(x: torch.Tensor) -> None:
        for module in modules:
            module(x)

    times = _time({"grouped": grouped, "one_by_one": one_by_one}, features, warmup, repeats, device)
    speedup = paired_ratio(times["one_by_one"], times["grouped"])
    return {"batch_size": len(features[0]), "n_mlp": len(modules), "grouped_ms": _median(times["grouped"]),
            "one_by_one_ms": _median(times["one_by_one"]), "speedup": speedup}


def run_bank_benchmark(
    trunk: BenchTrunk,
    *,
    n_heads: int = 256,
    num_classes: int = 1000,
    batch_sizes: Sequence[int] = (8, 64),
    weight_dtypes: Sequence[str] = ("float32", "bfloat16", "float16", "int8"),
    n_mlp: int = 64,
    mlp_hidden: int = 256,
    warmup: int = 1,
    repeats: int = 5,
    n_batches: int = 1,
) -> dict[str, Any]:
    """Trunk + ``n_heads`` pooled linear heads against the bare trunk, and grouped MLP heads against one by one.

    Args:
        trunk: the trunk's architecture, input side, seed and device.
        n_heads: linear heads on ``pooled``.
        num_classes: classes of every head (linear and MLP).
        batch_sizes: images per batch; each is its own set of rounds.
        weight_dtypes: bank ``weight_dtype`` names to time (``"float32"``, ``"bfloat16"``,
            ``"float16"``, ``"int8"``); with ``float32`` among them, each is also compared
            with it.
        n_mlp: MLP heads of the grouped-against-one-by-one comparison (0: skip it).
        mlp_hidden: their hidden width.
        warmup: untimed passes per contender.
        repeats: timed passes (of ``n_batches`` batches) per contender.
        n_batches: batches per pass.

    Returns:
        A JSON-able dict: the trunk's description and environment, ``trunk_gmacs`` and
        ``head_gmacs`` per image, ``predicted`` (the MAC ratio), ``rows`` (per batch size
        and weight dtype: ``trunk_ms``, ``ms``, ``ratio``, ``predicted``, ``vs_predicted``,
        ``passed`` (``vs_predicted <= GOAL``), ``heads_ms``, ``weight_gb``,
        ``heads_gb_per_s``, ``top1_agree_pct`` and ``max_logit_diff`` against the float32
        bank on the same pooled features, None without one) and ``mlp`` (per batch size: ``grouped_ms``, ``one_by_one_ms``,
        ``speedup``: one-by-one time / grouped time, i.e. the images/s ratio).
    """
    dtypes = {name: resolve_weight_dtype(name) for name in weight_dtypes}
    device = torch.device(trunk.device)
    model = trunk.build()
    width = model.tap(POOLED).channels
    trunk_macs = trunk_size(model)["gflops"] * 1e9 / 2
    heads = make_heads(n_heads, width, mlp_every=0, num_classes=num_classes, seed=trunk.seed)
    banks = {name: HeadBank(heads, weight_dtype=dtype).to(device) for name, dtype in dtypes.items()}
    del heads  # the banks hold their own copies: a 256 x 1000-class set is 2 GB of float32
    # The quantized engine's int8 ops are not counted by FlopCounterMode: count on a float bank.
    counted = next((bank for name, bank in banks.items() if dtypes[name] != torch.int8), None)
    head_macs = bank_macs(counted, width) if counted is not None else width * n_heads * num_classes
    predicted = predicted_ratio(trunk_macs, head_macs)
    rows: list[dict[str, Any]] = []
    mlp: list[dict[str, Any]] = []
    mlp_heads = make_heads(n_mlp, width, mlp_every=1, num_classes=num_classes, hidden=mlp_hidden,
                           seed=trunk.seed + 1) if n_mlp else {}
    for batch_size in batch_sizes:
        batches = make_batches(model.data_config["input_size"], batch_size, n_batches, seed=trunk.seed,
                               device=device)
        if banks:
            rows += _bank_rows(model, banks, batches, predicted=predicted, warmup=warmup, repeats=repeats,
                               device=device)
        if mlp_heads:
            with torch.inference_mode():
                features = [model(x, [POOLED])[POOLED] for x in batches]
            mlp.append(_mlp_row(mlp_heads, features, warmup=warmup, repeats=repeats, device=device))
    return {
        **trunk.describe(),
        **environment(device),
        "n_heads": n_heads,
        "num_classes": num_classes,
        "width": width,
        "n_mlp": n_mlp,
        "mlp_hidden": mlp_hidden,
        "warmup": warmup,
        "repeats": repeats,
        "n_batches": n_batches,
        "trunk_gmacs": trunk_macs / 1e9,
        "head_gmacs": head_macs / 1e9,
        "predicted": predicted,
        "goal": GOAL,
        "rows": rows,
        "mlp": mlp,
    }


def format_bank_table(result: Mapping[str, Any]) -> str:
    """A readable summary of :func:`run_bank_benchmark`'s result."""
    lines = [
        f"{result['model']} @ {result['image_size']}px, {result['device']} ({result['device_name']}, "
        f"{result['threads']} threads), torch {result['torch']}, timm {result['timm']}",
        f"trunk + {result['n_heads']} pooled linear heads of {result['num_classes']} classes (width "
        f"{result['width']}): trunk {result['trunk_gmacs']:.3f} GMACs/image, heads {result['head_gmacs']:.3f}, "
        f"predicted ratio {result['predicted']:.3f}",
        "",
        f"{'batch':>5} {'weights':<9}{'trunk ms':>10}{'+heads ms':>11}{'ratio':>8}{'pred':>8}"
        f"{'meas/pred':>10}{'heads ms':>10}{'GB':>7}{'GB/s':>7}{'top1 %':>8}{'max|d|':>8}  goal <= {result['goal']}",
    ]
    for r in result["rows"]:
        agree = r.get("top1_agree_pct")
        diff = r.get("max_logit_diff")
        lines.append(
            f"{r['batch_size']:>5} {r['weight_dtype']:<9}{r['trunk_ms']:>10.1f}{r['ms']:>11.1f}{r['ratio']:>8.3f}"
            f"{r['predicted']:>8.3f}{r['vs_predicted']:>10.3f}{r['heads_ms']:>10.1f}{r['weight_gb']:>7.3f}"
            f"{r['heads_gb_per_s']:>7.1f}{'-' if agree is None else f'{agree:.2f}':>8}"
            f"{'-' if diff is None else f'{diff:.4f}':>8}  {'PASS' if r['passed'] else 'FAIL'}")
    lines.append("top1 %, max|d|: top-1 agreement with the float32 bank and its largest logit difference, "
                 "on the same pooled features")
    if result["mlp"]:
        lines += ["", f"{result['n_mlp']} MLP heads (hidden {result['mlp_hidden']}, {result['num_classes']} classes) "
                      "on pooled features, grouped vs one by one:",
                  f"{'batch':>5}{'grouped ms':>12}{'one by one ms':>15}  images/s"]
        for m in result["mlp"]:
            lines.append(f"{m['batch_size']:>5}{m['grouped_ms']:>12.2f}{m['one_by_one_ms']:>15.2f}  "
                         f"{m['speedup']:.2f}x (grouped {times_faster(m['speedup'])})")
    return "\n".join(lines)
