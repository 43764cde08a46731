"""Side-by-side benchmarks of the shared trunk: ratios measured in one run, never timed tests.

Three comparisons back the platform's performance claims (DESIGN.md, issue 3):

1. trunk + N heads in a :class:`~heads.bank.HeadBank` against the bare trunk forward;
2. one shared trunk + 8 heads against 8 separate full models (backbone + classifier each);
3. training a pooled linear head on cached features against training it through the
   frozen trunk, same epochs and images.

Absolute times on a shared machine drift from second to second, so every comparison is
timed *interleaved*: each round runs every contender once on the same unit of work (one
pre-made batch for inference, one whole training run for training), in an order that
rotates between rounds, and a ratio is the median over rounds of the ratio within one
round. Drift then hits both sides of a ratio alike. ``repeats`` counts passes over all
batches, so an inference comparison has ``repeats * n_batches`` rounds.

Pure torch/timm: no MLflow, no files except :func:`write_result`.
"""

from __future__ import annotations

import itertools
import platform
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from heads.bank import HeadBank
from heads.modules import LinearHead, MLPHead
from heads.store import LoadedHead
from trunk.files import write_json_atomic
from trunk.timing import interleaved, times_faster
from trunk.loop import fit
from trunk.model import POOLED, Trunk

# (result key, comparison, bound) per goal of issue 3 section 6.
GOALS = {
    "linear32_vs_trunk": ("<=", 1.05, "trunk + 32 linear heads / bare trunk"),
    "shared8_speedup": (">=", 6.0, "8 separate models / trunk + 8 heads"),
    "cached_training_speedup": (">=", 50.0, "training through frozen trunk / on cached features"),
}


@dataclass(frozen=True)
class BenchTrunk:
    """The random-init trunk a benchmark times (its weights' values do not change its speed).

    Attributes:
        model_name: timm architecture (also of the separate models, where compared).
        image_size: square input side in pixels.
        model_kwargs: extra ``timm.create_model`` arguments.
        seed: the weights (and the benchmark's batches and labels) depend only on it.
        device: where the trunk and everything compared with it run.
    """

    model_name: str = "resnet18"
    image_size: int = 224
    model_kwargs: Mapping[str, Any] | None = None
    seed: int = 0
    device: str | torch.device = "cpu"

    def build(self) -> Trunk:
        """The trunk, in eval mode on :attr:`device`."""
        trunk = Trunk(self.model_name, seed=self.seed, model_kwargs=self.model_kwargs,
                      data_config={"input_size": [3, self.image_size, self.image_size]})
        return trunk.to(torch.device(self.device)).eval()

    def describe(self) -> dict[str, Any]:
        """The keys every result starts with."""
        return {"model": self.model_name, "image_size": self.image_size}


@dataclass(frozen=True)
class HeadMix:
    """Which banks of heads :func:`bench_heads` times against the bare trunk.

    Attributes:
        counts: head counts of the mixed cases (see :func:`make_heads` ``mlp_every``).
        linear_only: head counts of the linear-only cases (32 is the goal's).
        mlp_every: every ``mlp_every``-th head of a mixed case is an MLPHead.
        num_classes: outputs per head.
    """

    counts: Sequence[int] = (1, 8, 32)
    linear_only: Sequence[int] = (32,)
    mlp_every: int = 4
    num_classes: int = 10


def make_batches(
    input_size: Sequence[int], batch_size: int, n_batches: int, *, seed: int = 0, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """Random image batches every contender shares.

    Args:
        input_size: ``(C, H, W)``, usually ``trunk.data_config["input_size"]``.
        batch_size: images per batch.
        n_batches: batches per timed pass.
        seed: the batches depend only on it.
        device: where the batches live (made on the CPU, then moved, so the seed means
            the same tensors on every device).
    """
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, *input_size, generator=gen).to(device) for _ in range(n_batches)]


def make_heads(
    n: int,
    in_features: int,
    *,
    mlp_every: int = 4,
    num_classes: int = 10,
    hidden: int = 256,
    tap: str = POOLED,
    seed: int = 0,
) -> dict[str, LoadedHead]:
    """``n`` randomly initialised heads on one tap, every ``mlp_every``-th one an MLPHead.

    Args:
        n: number of heads.
        in_features: width of the tap.
        mlp_every: 4 gives 3/4 LinearHead and 1/4 MLPHead; 0 gives linear heads only.
        num_classes: outputs per head.
        hidden: MLP hidden width.
        tap: the tap every head reads.
        seed: the weights depend only on it.
    """
    heads: dict[str, LoadedHead] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(n):
            is_mlp = mlp_every > 0 and i % mlp_every == mlp_every - 1
            module = (MLPHead(in_features, num_classes, hidden=hidden) if is_mlp
                      else LinearHead(in_features, num_classes))
            name = f"head_{i:03d}"
            classes = [f"c{j}" for j in range(num_classes)]
            heads[name] = LoadedHead(module=module.eval(), meta={"name": name, "tap": tap, "classes": classes})
    return heads


def per_batch(
    contenders: Mapping[str, Callable[[torch.Tensor], Any]], batches: Sequence[torch.Tensor]
) -> dict[str, Callable[[], Any]]:
    """Make ``fn(batch)`` contenders into :func:`interleaved`'s ``fn()``, one batch per call.

    Each contender walks the batches in order on its own counter; as :func:`interleaved`
    calls every contender equally often, round ``i`` gives all of them the same batch.
    A round is then one batch long, so drift has less time to favour one contender.
    """
    if not batches:
        raise ValueError("need at least one batch")

    def cycling(fn: Callable[[torch.Tensor], Any]) -> Callable[[], Any]:
        calls = itertools.count()
        return lambda: fn(batches[next(calls) % len(batches)])

    return {name: cycling(fn) for name, fn in contenders.items()}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of per-round ratios: robust to drift that hits one whole round."""
    return float(statistics.median(n / d for n, d in zip(numerator, denominator)))


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _time_inference(contenders: Mapping[str, Callable[[torch.Tensor], None]], batches: Sequence[torch.Tensor],
                    warmup: int, repeats: int, device: str | torch.device) -> dict[str, list[float]]:
    """Interleaved ms per batch of each forward-only contender: ``warmup`` and ``repeats`` passes over ``batches``."""
    with torch.inference_mode():
        return interleaved(per_batch(contenders, batches), warmup=warmup * len(batches),
                           repeats=repeats * len(batches), device=device)


def bench_heads(
    trunk: Trunk,
    batches: Sequence[torch.Tensor],
    *,
    mix: HeadMix = HeadMix(),
    warmup: int = 1,
    repeats: int = 5,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Trunk + N heads in one HeadBank against the bare trunk forward on the same batches.

    Args:
        trunk: the trunk, already on ``device``.
        batches: from :func:`make_batches`.
        mix: the banks of heads to time.
        warmup: untimed passes per contender.
        repeats: timed passes per contender.
        device: where trunk and batches live.

    Returns:
        ``{"trunk_ms": ms per batch, "cases": [{"case", "n_heads", "n_linear", "n_mlp",
        "ms", "ratio"}, ...]}``; ``ratio`` is time(trunk + heads) / time(trunk).
    """
    width = trunk.tap(POOLED).channels
    specs = [(n, mix.mlp_every) for n in mix.counts] + [(n, 0) for n in mix.linear_only]
    banks: dict[str, HeadBank] = {}
    meta: dict[str, dict[str, int]] = {}
    for n, every in specs:
        heads = make_heads(n, width, mlp_every=every, num_classes=mix.num_classes, seed=n)
        n_mlp = sum(isinstance(h.module, MLPHead) for h in heads.values())
        case = f"trunk+{n} {'mixed' if every else 'linear'}"
        banks[case] = HeadBank(heads).to(device)
        meta[case] = {"n_heads": n, "n_linear": n - n_mlp, "n_mlp": n_mlp}

    def bare(x: torch.Tensor) -> None:
        trunk(x, [POOLED])

    def with_bank(bank: HeadBank) -> Callable[[torch.Tensor], None]:
        return lambda x: bank(trunk(x, bank.taps))

    contenders = {"trunk": bare, **{case: with_bank(b) for case, b in banks.items()}}
    times = _time_inference(contenders, batches, warmup, repeats, device)
    return {
        "trunk_ms": _median(times["trunk"]),
        "cases": [{"case": case, **meta[case], "ms": _median(times[case]),
                   "ratio": paired_ratio(times[case], times["trunk"])} for case in banks],
    }


class _FullModel(nn.Module):
    """What a team would deploy without the platform: its own backbone and classifier."""

    def __init__(self, model_name: str, num_classes: int, model_kwargs: Mapping[str, Any], seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **dict(model_kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def bench_separate(
    trunk: Trunk,
    batches: Sequence[torch.Tensor],
    *,
    n_models: int = 8,
    mix: HeadMix = HeadMix(),
    warmup: int = 1,
    repeats: int = 5,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """One shared trunk + ``n_models`` heads against ``n_models`` separate full models.

    The separate models are independent timm models of the trunk's architecture, each with
    its own classifier, random init (their weights do not change their speed).

    Args:
        trunk: the shared trunk, already on ``device``; its architecture is copied.
        batches: from :func:`make_batches`.
        n_models: separate models, and heads on the shared trunk.
        mix: ``mlp_every``: the shared trunk's heads (see :func:`make_heads`); ``num_classes``:
            outputs per head and per model (its head counts are not used here).
        warmup: untimed passes per contender.
        repeats: timed passes per contender.
        device: where everything runs.

    Returns:
        ``{"n_models", "shared_ms", "separate_ms", "speedup"}``: ms per batch, and
        time(separate) / time(shared).
    """
    heads = make_heads(n_models, trunk.tap(POOLED).channels, mlp_every=mix.mlp_every, num_classes=mix.num_classes,
                       seed=1000 + n_models)
    bank = HeadBank(heads).to(device)
    models = [_FullModel(trunk.model_name, mix.num_classes, trunk.model_kwargs, seed=i).to(device).eval()
              for i in range(n_models)]

    def shared(x: torch.Tensor) -> None:
        bank(trunk(x, bank.taps))

    def separate(x: torch.Tensor) -> None:
        for model in models:
            model(x)

    times = _time_inference({"shared": shared, "separate": separate}, batches, warmup, repeats, device)
    return {
        "n_models": n_models,
        "shared_ms": _median(times["shared"]),
        "separate_ms": _median(times["separate"]),
        "speedup": paired_ratio(times["separate"], times["shared"]),
    }


def train_linear_head(
    width: int,
    num_classes: int,
    steps: Sequence[tuple[Callable[[], torch.Tensor], torch.Tensor]],
    epochs: int,
    *,
    lr: float = 1e-3,
    seed: int = 0,
) -> LinearHead:
    """Train a fresh LinearHead: the loop both training contenders share.

    Only where features come from differs between them, so that is a callable per step.

    Args:
        width: feature width.
        num_classes: outputs.
        steps: ``[(features_fn, labels), ...]`` per batch; ``features_fn()`` gives the
            batch's ``(B, width)`` features (a cached tensor, or a frozen trunk pass).
        epochs: passes over ``steps``.
        lr: AdamW learning rate.
        seed: the head's initial weights depend only on it.

    Returns:
        The trained head, in train mode, on the labels' device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearHead(width, num_classes)
    device = steps[0][1].device
    head = head.to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)

    def loss_fn(step: tuple[Callable[[], torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, int]:
        features, labels = step
        return nn.functional.cross_entropy(head(features()), labels), len(labels)

    fit(head, steps, loss_fn, optimizer=optimizer, epochs=epochs, device=device, desc="benchmark head")
    return head


def bench_training(
    trunk: Trunk,
    batches: Sequence[torch.Tensor],
    *,
    epochs: int = 3,
    num_classes: int = 10,
    lr: float = 1e-3,
    warmup: int = 1,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Training a pooled LinearHead on cached features against training it through the frozen trunk.

    Both train a fresh head with the same loop, epochs, batches and labels. The cached side
    reads a feature tensor computed once beforehand, as the feature cache provides it; the
    other runs the frozen trunk (no gradients) on every batch of every epoch. The one-off
    extraction is timed too and reported beside the ratio, so the amortised cost is visible.

    Args:
        trunk: the frozen trunk, already on ``device``.
        batches: the training images, from :func:`make_batches`.
        epochs: passes over the batches per training run.
        num_classes: outputs of the head; labels are random.
        lr: AdamW learning rate.
        warmup: untimed runs per contender.
        repeats: timed runs per contender.
        device: where everything runs.
        seed: labels and head init depend only on it.

    Returns:
        ``{"epochs", "n_images", "cached_ms", "through_trunk_ms", "extract_ms", "speedup"}``:
        ms per complete training run (all epochs), ms of one extraction pass, and
        time(through trunk) / time(cached).
    """
    width = trunk.tap(POOLED).channels
    gen = torch.Generator().manual_seed(seed)
    labels = [torch.randint(0, num_classes, (len(x),), generator=gen).to(device) for x in batches]

    def extract() -> list[torch.Tensor]:
        # no_grad, not inference_mode: inference tensors cannot be saved for the head's backward.
        with torch.no_grad():
            return [trunk(x, [POOLED])[POOLED] for x in batches]

    cached = extract()

    def frozen_features(x: torch.Tensor) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return trunk(x, [POOLED])[POOLED]
        return run

    cached_steps = [((lambda f=f: f), y) for f, y in zip(cached, labels)]
    trunk_steps = [(frozen_features(x), y) for x, y in zip(batches, labels)]
    times = interleaved({
        "cached": lambda: train_linear_head(width, num_classes, cached_steps, epochs, lr=lr, seed=seed),
        "through_trunk": lambda: train_linear_head(width, num_classes, trunk_steps, epochs, lr=lr, seed=seed),
        "extract": extract,
    }, warmup=warmup, repeats=repeats, device=device)
    return {
        "epochs": epochs,
        "n_images": sum(len(x) for x in batches),
        "cached_ms": _median(times["cached"]),
        "through_trunk_ms": _median(times["through_trunk"]),
        "extract_ms": _median(times["extract"]),
        "speedup": paired_ratio(times["through_trunk"], times["cached"]),
    }


def check_goals(cases: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's goals against measured ratios: ``{goal: {what, value, op, bound, passed}}``."""
    linear32 = next((c["ratio"] for c in cases["heads"]["cases"] if c["n_mlp"] == 0 and c["n_heads"] == 32), None)
    values = {
        "linear32_vs_trunk": linear32,
        "shared8_speedup": cases["separate"]["speedup"] if cases["separate"]["n_models"] == 8 else None,
        "cached_training_speedup": cases["training"]["speedup"],
    }
    goals = {}
    for key, (op, bound, what) in GOALS.items():
        value = values[key]
        passed = None if value is None else (value <= bound if op == "<=" else value >= bound)
        goals[key] = {"what": what, "value": value, "op": op, "bound": bound, "passed": passed}
    return goals


def environment(device: torch.device) -> dict[str, Any]:
    """Where a benchmark ran: device type and name, torch threads, torch and timm versions."""
    return {"device": device.type, "device_name": _device_name(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() often says only "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_benchmark(
    setup: BenchTrunk = BenchTrunk(),
    *,
    mix: HeadMix = HeadMix(),
    batch_size: int = 4,
    n_batches: int = 2,
    warmup: int = 1,
    repeats: int = 15,
    separate_repeats: int = 5,
    n_models: int = 8,
    train_epochs: int = 3,
    train_repeats: int = 5,
) -> dict[str, Any]:
    """All three comparisons on one random-init trunk; a JSON-able result with goals.

    Args:
        setup: the trunk (and separate models') architecture, input side, seed and
            device; batches and labels depend only on the seed too.
        mix: the trunk + N heads cases (:func:`bench_heads`); its ``mlp_every`` and
            ``num_classes`` also shape the separate-models and training comparisons.
        batch_size: images per batch.
        n_batches: batches per timed pass.
        warmup: untimed passes per contender.
        repeats: timed passes per contender for trunk + N heads.
        separate_repeats: timed passes per contender for the separate-models comparison
            (the slowest: every pass runs ``n_models + 1`` backbones).
        n_models: separate full models (and heads on the shared trunk) to compare.
        train_epochs: epochs of each head training run.
        train_repeats: timed runs per training contender.
    """
    device = torch.device(setup.device)
    trunk = setup.build()
    batches = make_batches(trunk.data_config["input_size"], batch_size, n_batches, seed=setup.seed, device=device)
    common = {"warmup": warmup, "device": device}
    cases = {
        "heads": bench_heads(trunk, batches, mix=mix, repeats=repeats, **common),
        "separate": bench_separate(trunk, batches, n_models=n_models, mix=mix, repeats=separate_repeats, **common),
        "training": bench_training(trunk, batches, epochs=train_epochs, repeats=train_repeats, seed=setup.seed,
                                   num_classes=mix.num_classes, **common),
    }
    return {
        **setup.describe(),
        **environment(device),
        "batch_size": batch_size,
        "n_batches": n_batches,
        "warmup": warmup,
        "repeats": repeats,
        "separate_repeats": separate_repeats,
        "train_repeats": train_repeats,
        "cases": cases,
        "goals": check_goals(cases),
    }


def format_table(result: Mapping[str, Any]) -> str:
    """A readable summary of :func:`run_benchmark`'s result."""
    cases = result["cases"]
    heads, sep, train = cases["heads"], cases["separate"], cases["training"]
    lines = [
        f"{result['model']} @ {result['image_size']}px, batch {result['batch_size']} x {result['n_batches']}, "
        f"{result['device']} ({result['device_name']}, {result['threads']} threads), "
        f"torch {result['torch']}, timm {result['timm']}",
        "",
        f"{'case':<28}{'ms/batch':>12}{'ratio':>10}",
        f"{'bare trunk':<28}{heads['trunk_ms']:>12.2f}{1.0:>10.3f}",
    ]
    for c in heads["cases"]:
        label = f"{c['case']} ({c['n_linear']}L/{c['n_mlp']}M)"
        lines.append(f"{label:<28}{c['ms']:>12.2f}{c['ratio']:>10.3f}")
    lines += [
        "",
        f"{'shared trunk + ' + str(sep['n_models']) + ' heads':<28}{sep['shared_ms']:>12.2f}",
        f"{str(sep['n_models']) + ' separate models':<28}{sep['separate_ms']:>12.2f}"
        f"  shared trunk {times_faster(sep['speedup'])}",
        "",
        f"head training, {train['epochs']} epochs x {train['n_images']} images (ms per run):",
        f"{'  on cached features':<28}{train['cached_ms']:>12.2f}",
        f"{'  through frozen trunk':<28}{train['through_trunk_ms']:>12.2f}"
        f"  cached {times_faster(train['speedup'], 1)}",
        f"{'  (one-off extraction)':<28}{train['extract_ms']:>12.2f}",
        "",
        "goals:",
    ]
    for goal in result["goals"].values():
        value = "n/a" if goal["value"] is None else f"{goal['value']:.3f}"
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[goal["passed"]]
        lines.append(f"  {goal['what']}: {value} {goal['op']} {goal['bound']}  {verdict}")
    return "\n".join(lines)


def write_result(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write the result as indented JSON, creating the folder; atomic (:func:`trunk.files.write_json_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result, indent=2)
    return path
