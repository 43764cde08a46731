"""Feature distillation: teach a smaller trunk to produce a bigger trunk's features.

The student learns to match the teacher's ``pooled`` vector (and, optionally, the maps at
some earlier taps that branch heads read) on unlabelled images. A small learned projector
maps each student feature to the teacher's width (``nn.Linear`` for ``pooled``, a 1x1
convolution for a map), and the loss is the mean squared error between the layer-normed
projection and the layer-normed teacher feature. Layer norm makes the target
scale-free: a teacher whose features are large or offset does not dominate the loss, and
the loss of a perfect match up to scale and offset is 0. The projectors exist only to
shape the student and are thrown away, like the task classifiers of :mod:`trunk.train`.

Matching features is not the same as keeping what the heads read from them: a feature
direction the heads rely on can be small in the layer-normed MSE. So the student can also
learn the heads' outputs (``heads``: :class:`FrozenHead`, plain modules and the tap each
reads; the caller loads them). Each frozen head runs on the teacher's features (the
target distribution) and on the student's projected features (the student's), and the
loss adds ``head_loss_weight * T^2 * KL(teacher || student)`` at temperature ``T``,
averaged over heads (Hinton et al.'s soft targets). A head on ``pooled`` reads the
``pooled`` projection; a branch head reads the 1x1-projected map of its tap (which must be
distilled), resized to the teacher's grid. Heads are deep-copied, frozen and kept in eval
mode: the caller's modules are never changed, and nothing of them is part of the student.

Teacher and student must share one data config, so each step feeds both the very same
augmented batch. The result is a new :class:`~trunk.model.Trunk` (a new ``trunk_id``);
the input student and teacher are left untouched. Images that cannot be decoded are
skipped with a warning and counted; one bad file never stops a run.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trunk import distributed
from trunk.dataset import ImageItem, readable
from trunk.device import resolve_device
from trunk.loop import EpochStats, fit, seeded_rng
from trunk.model import POOLED, Trunk, TrunkError
from trunk.train import TrunkTrainResult, _decodable, check_settings, image_training, trained_trunk


@dataclass(frozen=True)
class FrozenHead:
    """A head whose outputs the student learns: a module that reads one tap of the teacher.

    Attributes:
        name: the head's name (``[a-z0-9_]+`` in the platform; used in metric names).
        module: logits from the tap's features (``(B, C)`` for ``pooled``, the teacher's
            tap map for a branch head). Copied and frozen by :func:`distill_trunk`.
        tap: the teacher tap it reads: ``pooled`` or a distilled map tap.
    """

    name: str
    module: nn.Module
    tap: str


@dataclass
class DistillResult(TrunkTrainResult):
    """What :func:`distill_trunk` gives back: a trained trunk's result, with distillation's figures.

    Attributes:
        trunk: the distilled student (a new object with a new ``trunk_id``).
        history: one dict per epoch: ``epoch``, ``loss``, ``loss_pooled``, ``loss_<tap>``
            per tap, ``cosine_pooled``, ``lr``, ``seconds``; with heads also ``loss_heads``
            (the mean over heads of ``T^2 * KL``, before ``head_loss_weight``),
            ``loss_head_<name>`` and ``agreement_<name>`` (the share of images whose top-1
            class through the head is the teacher's).
        metrics: final figures: ``distill_loss``, ``distill_loss_pooled``,
            ``distill_loss_<tap>``, ``cosine_pooled``, ``n_images``, ``skipped_images``,
            ``distill_seconds``; with heads also ``distill_loss_heads``,
            ``distill_loss_head_<name>`` and ``head_agreement_<name>``.
        skipped: one line per image that could not be decoded (path and reason).
        paths: the images actually distilled on (the decodable ones), in order.
    """


def _collate(items: list[ImageItem]) -> torch.Tensor | None:
    """The readable items' pixels; None when none is readable."""
    items = readable(items)
    return torch.stack([it.pixels for it in items]) if items else None


def _check_pair(teacher: Trunk, student: Trunk, taps: Sequence[str]) -> list[str]:
    """The taps to distill besides ``pooled``, in order, or a one-line error."""
    if student.data_config != teacher.data_config:
        raise ValueError(
            f"field 'data_config': the student's {student.data_config} differs from the teacher's "
            f"{teacher.data_config}; build the student with data_config=teacher.data_config so both "
            f"see the same preprocessed images"
        )
    if isinstance(taps, str):
        raise ValueError(f"field 'taps': expected a list of tap names, got the string {taps!r}")
    taps = list(dict.fromkeys(taps))
    if POOLED in taps:
        raise ValueError(f"field 'taps': '{POOLED}' is always distilled; list only earlier taps such as layer2")
    for role, trunk in (("teacher", teacher), ("student", student)):
        if taps and trunk.token_prefix:
            raise ValueError(
                f"field 'taps': the {role} '{trunk.model_name}' has token taps (B, tokens, C), and only "
                f"map taps (B, C, H, W) can be distilled; use taps=[] to distill '{POOLED}' only"
            )
    shared = [t for t in teacher.taps if t in student.taps and t != POOLED]
    for tap in taps:
        for role, trunk in (("teacher", teacher), ("student", student)):
            try:
                trunk.tap(tap)
            except TrunkError:
                raise TrunkError(
                    f"field 'taps': the {role} '{trunk.model_name}' has no tap '{tap}'; valid taps: "
                    f"{', '.join(shared) or 'none shared by teacher and student'}"
                ) from None
    return taps


def _check_heads(heads: Sequence[FrozenHead], taps: Sequence[str], head_loss_weight: float,
                 temperature: float) -> list[FrozenHead]:
    """The heads as a list, or a one-line error naming the field."""
    if isinstance(heads, FrozenHead):
        raise ValueError("field 'heads': expected a list of FrozenHead, got a single FrozenHead")
    heads = list(heads)
    if not (head_loss_weight >= 0 and math.isfinite(head_loss_weight)):
        raise ValueError(f"field 'head_loss_weight': must be a finite number >= 0, got {head_loss_weight}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"field 'temperature': must be a finite number > 0, got {temperature}")
    seen: set[str] = set()
    for head in heads:
        if not isinstance(head, FrozenHead):
            raise ValueError(f"field 'heads': expected FrozenHead entries, got {type(head).__name__}")
        if head.name in seen:
            raise ValueError(f"field 'heads': head '{head.name}' is given twice")
        seen.add(head.name)
        if head.tap != POOLED and head.tap not in taps:
            raise ValueError(f"field 'heads': head '{head.name}' reads tap '{head.tap}', which is not distilled "
                             f"(taps: {', '.join([POOLED, *taps])}); add it to taps or leave the head out")
    return heads


def head_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` of the softened outputs, averaged over the batch.

    The ``T^2`` keeps the gradient's size about the same whatever the temperature, so the
    weight means the same thing at every ``T``. 0 exactly when the two agree.
    """
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    log_target=True, reduction="batchmean") * (t * t)


def _on_grid(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A student map resized to the teacher's grid (different strides at one tap name)."""
    if projected.shape[-2:] != target.shape[-2:]:
        projected = F.interpolate(projected, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return projected


def _map_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of two ``(B, C, H, W)`` maps, each layer-normed over channels at every position."""
    projected = _on_grid(projected, target)
    channels = target.shape[1]
    a = F.layer_norm(projected.permute(0, 2, 3, 1), (channels,))
    b = F.layer_norm(target.permute(0, 2, 3, 1), (channels,))
    return F.mse_loss(a, b)


def distill_trunk(
    teacher: Trunk,
    student: Trunk,
    paths: Sequence[str],
    *,
    taps: Sequence[str] = (),
    heads: Sequence[FrozenHead] = (),
    head_loss_weight: float = 0.0,
    temperature: float = 1.0,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    augment_ops: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> DistillResult:
    """Train a copy of ``student`` to reproduce ``teacher``'s features on unlabelled images.

    Args:
        teacher: the trunk to imitate; frozen, run in eval mode, not modified.
        student: the starting student; it is not modified. Must have the teacher's data
            config (build it with ``data_config=teacher.data_config``).
        paths: unlabelled image paths (or fsspec URIs).
        taps: earlier map taps to distill as well as ``pooled`` (e.g. ``["layer2"]`` when
            branch heads fork there); both trunks must have each one.
        heads: frozen heads on the teacher's taps whose softened outputs the student learns
            (each reads ``pooled`` or one of ``taps``); copied, never modified. Their
            figures are reported whenever heads are given.
        head_loss_weight: weight of the heads' mean ``T^2 * KL`` in the loss (0: reported,
            not learned; the student is then exactly the feature-only one).
        temperature: softening ``T`` of both distributions.
        epochs: passes over the images.
        seed: seeds projector init, shuffling and augmentation; global RNGs are left as found.
        batch_size, lr, weight_decay, augment_ops, device, num_workers, progress: as for
            :func:`trunk.train.train_trunk`.
        on_epoch: receives each epoch's history row (see :attr:`DistillResult.history`) as
            soon as it is made, so a job can log the curves live.

    Returns:
        The distilled trunk, per-epoch history and final metrics. The loss of a step is the
        ``pooled`` loss plus the mean of the tap losses; ``cosine_pooled`` is the mean cosine
        similarity between the layer-normed projected student and teacher ``pooled`` vectors
        over the last epoch (1: the same features up to scale and offset, 0: unrelated).

    Raises:
        ValueError: mismatched data configs, a token tap, bad settings, a head on a tap
            that is not distilled, or no image could be decoded.
        TrunkError: a tap one of the trunks lacks (a ``ValueError`` too), naming the valid taps.
    """
    check_settings(epochs, batch_size, num_workers)
    taps = _check_pair(teacher, student, taps)
    heads = _check_heads(heads, taps, head_loss_weight, temperature)
    if isinstance(paths, str) or not paths:
        raise ValueError("field 'paths': distill_trunk needs a non-empty list of image paths")
    started = time.perf_counter()
    paths = [str(p) for p in paths]
    # _decodable keeps a label row per path; there are no labels here, only positions.
    paths, _, skipped = _decodable(paths, torch.arange(len(paths)), progress)
    if not paths:
        raise ValueError(f"none of the {len(skipped)} distillation images could be decoded (first: {skipped[0]})")
    dev = resolve_device(device)
    wanted = [POOLED, *taps]

    with seeded_rng(seed, dev):
        # A copy even of the teacher: .to(dev) and .eval() would otherwise change the caller's object.
        frozen = copy.deepcopy(teacher).to(dev).eval().requires_grad_(False)
        model = copy.deepcopy(student).to(dev).train()
        # Lists, not ModuleDicts: tap names like 'stages.2' are not valid module names.
        pooled_proj = nn.Linear(student.tap(POOLED).channels, teacher.tap(POOLED).channels).to(dev)
        tap_projs = nn.ModuleList(
            [nn.Conv2d(student.tap(t).channels, teacher.tap(t).channels, kernel_size=1) for t in taps]
        ).to(dev)
        loader, optimizer, schedule = image_training(
            teacher.data_config, paths, None, _collate, [model, pooled_proj, tap_projs], augment_ops=augment_ops,
            seed=seed, batch_size=batch_size, num_workers=num_workers, lr=lr, weight_decay=weight_decay,
            epochs=epochs, device=dev)
        width = teacher.tap(POOLED).channels
        # Copies (the caller's modules keep their device, mode and weights), out of the
        # optimiser and of fit's train(): batch norm and dropout stay as served.
        frozen_heads = [copy.deepcopy(h.module).to(dev).eval().requires_grad_(False) for h in heads]
        learn_heads = head_loss_weight > 0
        # Sums weighted by images, so a short last batch counts for what it holds; the
        # loop keeps the total loss's.
        names = [*(f"loss_{t}" for t in wanted), "cosine_pooled"]
        if heads:
            names += ["loss_heads", *(f"loss_head_{h.name}" for h in heads), *(f"agreement_{h.name}" for h in heads)]
        sums = {name: 0.0 for name in names}

        def step_loss(x: torch.Tensor | None) -> tuple[torch.Tensor, int] | None:
            if x is None:
                return None
            x = x.to(dev, non_blocking=True)
            with torch.no_grad():
                target = frozen(x, wanted)
            feats = model(x, wanted)
            raw = {POOLED: pooled_proj(feats[POOLED])}
            projected = F.layer_norm(raw[POOLED], (width,))
            goal = F.layer_norm(target[POOLED], (width,))
            pooled_loss = F.mse_loss(projected, goal)
            tap_losses = []
            for t, proj in zip(taps, tap_projs):
                raw[t] = _on_grid(proj(feats[t]), target[t])
                tap_losses.append(_map_loss(raw[t], target[t]))
            loss = (pooled_loss + torch.stack(tap_losses).mean()) if tap_losses else pooled_loss
            b = x.shape[0]
            if heads:
                with torch.enable_grad() if learn_heads else torch.no_grad():
                    kls, agree = [], []
                    for h, module in zip(heads, frozen_heads):
                        with torch.no_grad():
                            goal_logits = module(target[h.tap])
                        logits = module(raw[h.tap])
                        kls.append(head_kl(goal_logits, logits, temperature))
                        agree.append((logits.argmax(1) == goal_logits.argmax(1)).float().mean())
                    head_loss = torch.stack(kls).mean()
                if learn_heads:
                    loss = loss + head_loss_weight * head_loss
                with torch.no_grad():
                    sums["loss_heads"] += float(head_loss.detach()) * b
                    for h, kl, a in zip(heads, kls, agree):
                        sums[f"loss_head_{h.name}"] += float(kl.detach()) * b
                        sums[f"agreement_{h.name}"] += float(a) * b
            with torch.no_grad():
                sums[f"loss_{POOLED}"] += float(pooled_loss.detach()) * b
                for t, tap_loss in zip(taps, tap_losses):
                    sums[f"loss_{t}"] += float(tap_loss.detach()) * b
                sums["cosine_pooled"] += float(F.cosine_similarity(projected, goal, dim=1).sum())
            return loss, b

        def epoch_row(stats: EpochStats) -> dict[str, Any]:
            sums.update(distributed.reduce_sums(sums))  # a data-parallel run's figures are every rank's
            row: dict[str, Any] = {"epoch": stats.epoch, "loss": stats.train_loss}
            row.update({k: v / max(stats.seen, 1) for k, v in sums.items()})
            row.update(lr=optimizer.param_groups[0]["lr"], seconds=stats.seconds)
            sums.update(dict.fromkeys(sums, 0.0))
            return row

        # The teacher stays out of the trained modules: the loop's train() must not touch its batch norm.
        history = fit(nn.ModuleList([model, pooled_proj, tap_projs]), loader, step_loss, optimizer=optimizer,
                      epochs=epochs, device=dev, scheduler=schedule, epoch_row=epoch_row, progress=progress,
                      desc="distill", on_epoch=on_epoch).history

    new = trained_trunk(model, student)
    last = history[-1]
    metrics: dict[str, float] = {"distill_loss": float(last["loss"])}
    for t in wanted:
        metrics[f"distill_loss_{t}"] = float(last[f"loss_{t}"])
    if heads:
        metrics["distill_loss_heads"] = float(last["loss_heads"])
        for h in heads:
            metrics[f"distill_loss_head_{h.name}"] = float(last[f"loss_head_{h.name}"])
            metrics[f"head_agreement_{h.name}"] = float(last[f"agreement_{h.name}"])
    metrics.update(cosine_pooled=float(last["cosine_pooled"]), n_images=float(len(paths)),
                   skipped_images=float(len(skipped)), distill_seconds=time.perf_counter() - started)
    return DistillResult(trunk=new, history=history, metrics=metrics, skipped=skipped, paths=paths)
