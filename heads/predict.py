"""One batch through the trunk and every head: the per-batch work of bulk classification.

Both engines (the local loader and Ray Data's actor pool) call the same two pieces:
:class:`BatchPredictor` turns a pixel batch into labels and scores, and :func:`batch_rows`
lines those up with the batch's inputs, good and bad, into output columns.

On CUDA the trunk runs in channels_last memory format under bf16 autocast (heads too:
they are a fraction of the work and autocast keeps their matmuls in bf16); scores come
back as float32. On the CPU everything stays float32, bit for bit what evaluation saw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from heads.bank import HeadBank
from trunk.loader import DecodedBatch

Predictions = dict[str, tuple[list[str], list[float]]]


class BatchPredictor:
    """The trunk once per batch, then every head of a bank, on one device.

    Args:
        trunk: a :class:`trunk.model.Trunk`; moved to ``device`` and put in eval mode.
        bank: the heads; moved alike.
        device: where to run.
        amp: bf16 autocast + channels_last; None means "on CUDA only".
    """

    def __init__(self, trunk, bank: HeadBank, device: torch.device, amp: bool | None = None) -> None:
        self.device = torch.device(device)
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        self.trunk = trunk.to(self.device).eval()
        self.bank = bank.to(self.device).eval()
        if self.amp:
            self.trunk.to(memory_format=torch.channels_last)
        self.taps = list(bank.taps)
        self.names = list(bank.names)

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def __call__(self, pixels: torch.Tensor) -> Predictions:
        """``{head: (labels, scores)}`` for each row of ``pixels`` (``(n, C, H, W)``, n may be 0)."""
        if pixels.shape[0] == 0:
            return {name: ([], []) for name in self.names}
        x = pixels.to(self.device, non_blocking=True)
        if self.amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            features = self.trunk(x, self.taps)
            predicted = self.bank.predict(features)
        return {name: (labels, scores.float().cpu().tolist()) for name, (labels, scores) in predicted.items()}


def empty_columns(head_names: Sequence[str]) -> dict[str, list[Any]]:
    """Output columns with no rows, in the order of the output schema."""
    columns: dict[str, list[Any]] = {"path": [], "sha256": [], "error": []}
    for name in sorted(head_names):
        columns[f"{name}_label"] = []
        columns[f"{name}_score"] = []
    return columns


def batch_rows(batch: DecodedBatch, predictions: Predictions, columns: dict[str, list[Any]]) -> None:
    """Append one row per input of ``batch`` to ``columns``; failed inputs get nulls for every head.

    Args:
        batch: the decoded batch.
        predictions: :class:`BatchPredictor`'s output for ``batch.pixels``.
        columns: from :func:`empty_columns`, extended in place.
    """
    ok = batch.ok
    row_of = {pos: row for row, pos in enumerate(ok)}
    columns["path"] += batch.paths
    columns["sha256"] += batch.shas
    columns["error"] += batch.errors
    for name, (labels, scores) in predictions.items():
        if len(labels) != len(ok):
            raise RuntimeError(f"head '{name}' returned {len(labels)} rows for {len(ok)} decoded images")
        label_col, score_col = columns[f"{name}_label"], columns[f"{name}_score"]
        for pos in range(len(batch)):
            row = row_of.get(pos)
            label_col.append(None if row is None else labels[row])
            score_col.append(None if row is None else scores[row])
