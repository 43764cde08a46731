"""Fit one head end to end on features already extracted: build, train, evaluate, cost, save."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from heads.training.cost import measure_cost
from heads.training.data import LabelledData
from heads.training.evaluate import evaluate, plot_confusion
from heads.result import HeadResult
from heads.spec import HeadSpec
from heads.store import build_module, save_head
from heads.training.train import TrainSettings, predict_logits, train_on_features
from trunk.files import write_json_atomic
from trunk.loop import seeded_rng

CONFUSION_FILE = "confusion.png"
HISTORY_FILE = "history.json"
HEAD_DIR = "head"


def fit_head(
    spec: HeadSpec,
    data: LabelledData,
    train_x: Tensor,
    val_x: Tensor,
    *,
    trunk_id: str,
    out_dir: Path,
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> HeadResult:
    """Train, evaluate and cost one head, and save it under ``out_dir``.

    Writes ``out_dir/confusion.png``, ``out_dir/history.json`` and the head itself in
    ``out_dir/head`` (:func:`heads.store.save_head`'s layout).

    Args:
        spec: the head config (module, train settings, gate).
        data: its labelled data; ``train_x``/``val_x`` rows follow ``data.train``/``data.val``.
        train_x: ``(len(data.train), in_features)`` features of the head's tap: a tensor, or a
            :class:`trunk.cache.CachedRows` view (``FeatureCache.rows``), which reads each
            batch from the cache's shards, so a million-row set trains in bounded memory
            with the same result as the loaded tensor.
        val_x: ``(len(data.val), in_features)`` features (a tensor or a view).
        trunk_id: the trunk the features came from.
        out_dir: folder for the artifacts (created).
        device: where to train and time the head.
        progress: show a progress bar over epochs.
        on_epoch: receives each epoch's history row as soon as it is made
            (:func:`heads.training.train.train_on_features`).

    Returns:
        The trained head (on CPU, eval mode) with its metrics and artifacts.

    Raises:
        ValueError: features that do not line up with the data.
    """
    if len(train_x) != len(data.train) or len(val_x) != len(data.val):
        raise ValueError(f"{spec.source}: features do not match the data: {len(train_x)} train rows for "
                         f"{len(data.train)} examples, {len(val_x)} val rows for {len(data.val)} examples")
    train_y = torch.tensor([s.label for s in data.train], dtype=torch.long)
    val_y = torch.tensor([s.label for s in data.val], dtype=torch.long)
    in_features = int(train_x.shape[1])
    target = spec.module["_target_"]
    kwargs = {k: v for k, v in spec.module.items() if not k.startswith("_")}
    t = spec.train

    # Initial weights come from the head's own seed, without disturbing the caller's RNG.
    with seeded_rng(t["seed"], device):
        module = build_module(target, kwargs, in_features=in_features, num_classes=len(data.classes))
    outcome = train_on_features(module, train_x, train_y, val_x, val_y, TrainSettings.from_config(t),
                                device=device, progress=progress, on_epoch=on_epoch)
    logits = predict_logits(module, val_x, device)
    cost = measure_cost(module, in_features, device=device)
    return finish_head(
        spec, data, module.cpu().eval(), logits, val_y, [s.slice for s in data.val], cost,
        history=outcome.history, in_features=in_features, trunk_id=trunk_id, out_dir=out_dir,
        metrics={"best_epoch": outcome.best_epoch, "epochs_run": outcome.epochs_run,
                 "train_size": len(data.train), "val_size": len(data.val)},
        val_paths=[s.path for s in data.val],
    )


def finish_head(
    spec: HeadSpec,
    data: LabelledData,
    module: torch.nn.Module,
    logits: Tensor,
    val_y: Tensor,
    val_slices: list[str | None],
    cost: dict[str, float],
    *,
    history: list[dict],
    in_features: int,
    trunk_id: str,
    out_dir: Path,
    metrics: dict[str, float],
    module_kwargs: dict | None = None,
    val_paths: list[str] | None = None,
) -> HeadResult:
    """Evaluate a trained head on its validation logits, write its files, return its result.

    Shared by heads on features and branch heads: ``out_dir/confusion.png``,
    ``out_dir/history.json`` and the saved head in ``out_dir/head``.

    Args:
        module: the trained head, on the CPU in eval mode.
        logits: its validation logits, rows in the order of ``val_y`` and ``val_slices``.
        cost: :func:`heads.training.cost.measure_cost`'s figures.
        metrics: more metrics to record beside the evaluation's and the cost's.
        module_kwargs: the full constructor arguments to store, when they are more than
            the config's (a branch's trunk arguments).
        val_paths: the image of each row of ``logits`` (kept on the result, so the same
            predictions can be scored on a subset later: :attr:`HeadResult.val_paths`).
            The logits themselves are kept as :attr:`HeadResult.val_logits`.
    """
    ev = evaluate(logits, val_y, data.classes, slices=val_slices if data.has_slices else None,
                  min_slice_size=spec.gate["min_slice_size"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    confusion_png = plot_confusion(
        ev.confusion, data.classes, out_dir / CONFUSION_FILE,
        title=f"{spec.name}: validation (accuracy {ev.accuracy:.3f}, n={len(val_y)})",
    )
    history_json = out_dir / HISTORY_FILE
    write_json_atomic(history_json, history, indent=1)
    result = HeadResult(
        spec=spec,
        module=module,
        classes=list(data.classes),
        in_features=in_features,
        trunk_id=trunk_id,
        data_sha=data.data_sha,
        metrics={"val_accuracy": ev.accuracy, "val_macro_f1": ev.macro_f1, "params": cost["params"],
                 "added_gflops": cost["added_gflops"], "added_ms_per_image": cost["added_ms_per_image"],
                 **metrics},
        per_class_recall=ev.per_class_recall,
        slice_accuracy={s: {"accuracy": acc, "n": ev.slice_sizes[s]} for s, acc in ev.slice_accuracy.items()},
        confusion=ev.confusion,
        artifacts={"confusion": confusion_png, "history": history_json},
        history=history,
        module_kwargs=module_kwargs,
        val_paths=list(val_paths or []),
        val_labels=val_y.tolist(),
        val_predictions=torch.as_tensor(logits).argmax(1).tolist(),
        # Kept whole (not just the argmax): the monitoring reference needs the scores too.
        val_logits=torch.as_tensor(logits).detach().float().cpu(),
    )
    save_head(out_dir / HEAD_DIR, module, result.meta())
    return result
