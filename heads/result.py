"""What training one head produces: the module and everything the registry records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from heads.monitor.reference import HeadReference
from heads.spec import HeadSpec


@dataclass
class HeadResult:
    """A trained, evaluated and costed head.

    Attributes:
        spec: the validated head config it was trained from.
        module: the trained head in eval mode.
        classes: label names; output index i means ``classes[i]``.
        in_features: width of the tap it reads.
        trunk_id: the trunk whose features it was trained on.
        data_sha: hash of the labelled data (paths' content hashes, labels, splits).
        metrics: at least ``val_accuracy``, ``val_macro_f1``, ``params``,
            ``added_gflops``, ``added_ms_per_image`` (DESIGN's MLflow metric names).
        per_class_recall: ``{class: recall}`` on the validation split.
        slice_accuracy: ``{slice: {"accuracy": float, "n": int}}`` when the data has slices.
        confusion: validation confusion matrix, rows = true class, columns = predicted.
        artifacts: files to log beside the model (confusion matrix PNG, history, ...).
        history: one dict per epoch (``epoch``, ``train_loss``, ``val_accuracy``, ...).
        module_kwargs: the module's full constructor arguments when they differ from the
            config's ``module`` entries (a branch's trunk-derived ``model_name``, ``tap``,
            ``model_kwargs``); None means the config's entries are the whole story.
        val_paths: the validation images the figures were computed on, in row order
            (unreadable ones left out), so the same predictions can be scored again on a
            subset (e.g. the images the trunk never trained on) without retraining.
        val_labels: their true class indices, in the same order.
        val_predictions: the head's predicted class indices, in the same order.
        val_logits: float32 ``(N_val, K)`` CPU tensor of the head's validation logits, rows in
            the same order (``val_predictions`` is their argmax); the baseline of its
            monitoring reference. None for a result not built by the training functions.
        reference: the head's monitoring reference (its validation predictions and its
            training features' statistics at its tap), built by the training job and stored
            with the version at registration; None: registered without one.
        tags: extra version tags for the registry (e.g. ``trunk_trained_on``).
    """

    spec: HeadSpec
    module: nn.Module
    classes: list[str]
    in_features: int
    trunk_id: str
    data_sha: str
    metrics: dict[str, float]
    per_class_recall: dict[str, float] = field(default_factory=dict)
    slice_accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    module_kwargs: dict[str, Any] | None = None
    val_paths: list[str] = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)
    val_predictions: list[int] = field(default_factory=list)
    val_logits: Tensor | None = None
    reference: HeadReference | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tap(self) -> str:
        return self.spec.tap

    def meta(self) -> dict[str, Any]:
        """The ``head.json`` contents for :func:`heads.store.save_head`."""
        module_cfg = {k: v for k, v in self.spec.module.items() if not k.startswith("_")}
        if self.module_kwargs is not None:
            module_cfg = dict(self.module_kwargs)
        return {
            "name": self.spec.name,
            "owner": self.spec.owner,
            "tap": self.spec.tap,
            "target": self.spec.module["_target_"],
            "kwargs": module_cfg,
            "in_features": self.in_features,
            "num_classes": len(self.classes),
            "classes": list(self.classes),
            "trunk_id": self.trunk_id,
            "config_sha": self.spec.config_sha,
            "data_sha": self.data_sha,
        }
