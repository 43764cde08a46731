"""Evaluating a head on its validation split: accuracy, macro-F1, recall, confusion, slices."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Above this many classes the per-cell counts would be unreadable; colour alone remains.
MAX_ANNOTATED_CLASSES = 30


@dataclass
class Evaluation:
    """Validation metrics of one head.

    Attributes:
        accuracy: top-1 accuracy.
        macro_f1: mean F1 over the classes that occur in the labels or the predictions.
        per_class_recall: ``{class: recall}`` for every class with validation examples.
        confusion: ``confusion[true][predicted]`` counts, in ``classes`` order.
        slice_accuracy: ``{slice: accuracy}`` for slices with at least ``min_slice_size``
            examples, sorted by name.
        slice_sizes: ``{slice: examples}`` for the same slices.
    """

    accuracy: float
    macro_f1: float
    per_class_recall: dict[str, float]
    confusion: list[list[int]]
    slice_accuracy: dict[str, float] = field(default_factory=dict)
    slice_sizes: dict[str, int] = field(default_factory=dict)


def evaluate(
    logits_or_preds: Any,
    y: Any,
    classes: Sequence[str],
    slices: Sequence[str | None] | None = None,
    min_slice_size: int = 1,
) -> Evaluation:
    """Score predictions against labels.

    Args:
        logits_or_preds: ``(N, C)`` logits/scores (argmax is taken) or ``(N,)`` class indices.
        y: ``(N,)`` true class indices.
        classes: label names; index i means ``classes[i]``.
        slices: optional per-example slice name; ``None`` entries belong to no slice.
        min_slice_size: slices with fewer examples are left out of the slice figures.

    Returns:
        The metrics.

    Raises:
        ValueError: empty or mismatched inputs, or an index outside ``classes``.
    """
    scores = torch.as_tensor(logits_or_preds)
    preds = scores.argmax(1) if scores.ndim == 2 else scores.long()
    y = torch.as_tensor(y).long()
    n, c = len(y), len(classes)
    if n == 0:
        raise ValueError("nothing to evaluate: no labels")
    if preds.shape != y.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} and labels {tuple(y.shape)} differ in shape")
    if scores.ndim == 2 and scores.shape[1] != c:
        raise ValueError(f"logits have {scores.shape[1]} columns for {c} classes")
    for name, t in (("labels", y), ("predictions", preds)):
        if t.min() < 0 or t.max() >= c:
            raise ValueError(f"{name} must be class indices in [0, {c})")
    confusion = torch.bincount(y * c + preds, minlength=c * c).reshape(c, c)
    tp = confusion.diag().double()
    support = confusion.sum(1).double()
    predicted = confusion.sum(0).double()
    present = (support + predicted) > 0
    # F1 = 2TP / (support + predicted); classes absent from both labels and predictions say nothing.
    f1 = torch.where(present, 2 * tp / (support + predicted).clamp(min=1), torch.zeros_like(tp))
    recall = {classes[i]: (tp[i] / support[i]).item() for i in range(c) if support[i] > 0}

    slice_accuracy: dict[str, float] = {}
    slice_sizes: dict[str, int] = {}
    if slices is not None:
        if len(slices) != n:
            raise ValueError(f"{len(slices)} slice values for {n} examples")
        correct = (preds == y).tolist()
        tally: dict[str, list[int]] = {}
        for s, ok in zip(slices, correct):
            if s is not None:
                t = tally.setdefault(str(s), [0, 0])
                t[0] += int(ok)
                t[1] += 1
        for s in sorted(tally):
            hits, size = tally[s]
            if size >= min_slice_size:
                slice_accuracy[s] = hits / size
                slice_sizes[s] = size

    return Evaluation(
        accuracy=(tp.sum() / n).item(),
        macro_f1=(f1[present].mean()).item(),
        per_class_recall=recall,
        confusion=confusion.tolist(),
        slice_accuracy=slice_accuracy,
        slice_sizes=slice_sizes,
    )


def seen_split_metrics(predictions: Sequence[int], labels: Sequence[int], classes: Sequence[str],
                       seen: Sequence[bool]) -> dict[str, float]:
    """How much of a validation split the trunk trained on, and the same predictions scored on the rest.

    Nothing is retrained or re-run: the head's validation predictions are restricted to
    the rows whose image the trunk never saw.

    Args:
        predictions: the head's predicted class index per validation row.
        labels: the true class index per row.
        classes: label names.
        seen: per row, whether the trunk trained on that image (by content hash).

    Returns:
        ``val_seen_by_trunk`` (rows seen), ``val_seen_share`` (of all rows),
        ``val_unseen_images``, and, when at least one row is unseen,
        ``val_accuracy_unseen`` and ``val_macro_f1_unseen``.

    Raises:
        ValueError: the three sequences differ in length, or are empty.
    """
    if not (len(predictions) == len(labels) == len(seen)) or not len(seen):
        raise ValueError(f"{len(predictions)} predictions, {len(labels)} labels and {len(seen)} seen flags: "
                         f"need the same non-zero number")
    n_seen = sum(bool(s) for s in seen)
    out = {"val_seen_by_trunk": float(n_seen), "val_seen_share": n_seen / len(seen),
           "val_unseen_images": float(len(seen) - n_seen)}
    unseen = [i for i, s in enumerate(seen) if not s]
    if unseen:
        ev = evaluate([predictions[i] for i in unseen], [labels[i] for i in unseen], classes)
        out.update(val_accuracy_unseen=ev.accuracy, val_macro_f1_unseen=ev.macro_f1)
    return out


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, title: str) -> Path:
    """Write a confusion matrix PNG: colour is the row-normalised rate, text the count.

    Args:
        confusion: ``confusion[true][predicted]`` counts.
        classes: label names.
        path: the PNG to write (parent folders are created).
        title: figure title.

    Returns:
        ``path``.
    """
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no shared state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = torch.as_tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    c = len(classes)
    side = min(4.0 + 0.4 * c, 20.0)
    fig = Figure(figsize=(side, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(c), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(c), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if c <= MAX_ANNOTATED_CLASSES:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
