"""Golden sets: images a head must always get right, whatever the trunk.

A head's config may name one in ``gate.golden``: a CSV or Parquet file with ``path`` and
``label`` columns (relative paths are relative to the file). The refresh cascade runs the
retrained head on every golden image through the candidate trunk; one wrong label, or one
image that no longer decodes, blocks the refresh.

Rows may point only inside the golden file's data folder, the head's own data folders and
``data.allow_roots`` (the rule of :mod:`heads.training.data`, on real paths); any other row is
refused, naming the file, row and column, before the image is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from heads.bank import HeadBank
from heads.checks.contract import GoldenResult
from heads.checks.heldout import read_label_file
from heads.predict import BatchPredictor
from heads.spec import HeadConfigError
from heads.store import LoadedHead
from heads.training.data import manifest_folder
from trunk.loader import iter_decoded
from trunk.preprocess import eval_transform

FIELD = "gate.golden"


def read_golden(path: str | Path, classes: list[str], source: str,
                allow_roots: list[str | Path] | tuple = ()) -> list[tuple[str, str]]:
    """``[(absolute path, required label)]`` from a golden file.

    Args:
        path: the CSV or Parquet file.
        classes: the head's classes; every required label must be one of them.
        source: the head config's name, for messages.
        allow_roots: folders rows may point into besides the golden file's data folder
            (the head's :func:`heads.training.data.data_roots`).

    Raises:
        HeadConfigError: the file is missing, unreadable, lacks a column, has an empty
            cell, a label the head does not know or a path outside the allowed folders
            (naming the file, row and field).
    """
    roots = [manifest_folder(path), *(Path(os.path.abspath(r)) for r in allow_roots)]
    # The one reader of labelled files (held-out sets and classify labels files use it too).
    rows = read_label_file(path, {"label": list(classes)}, roots=roots, unique=False,
                           fail=lambda message: HeadConfigError(source, FIELD, message))
    return [(row.path, row.labels["label"]) for row in rows]


def check_golden(trunk, name: str, head: LoadedHead, items: list[tuple[str, str]], *, source: str,
                 device: str | torch.device = "cpu", batch_size: int = 64) -> GoldenResult:
    """Run one head on its golden images through ``trunk``; list every miss.

    Args:
        trunk: the trunk the head was trained on.
        name: the head's name.
        head: the trained head.
        items: from :func:`read_golden`.
        source: the golden file, for the report.
        device: where to run.
        batch_size: images per forward pass.
    """
    predictor = BatchPredictor(trunk, HeadBank({name: head}), torch.device(device), amp=False)
    wrong: list[tuple[str, str, str]] = []
    required = dict(items)
    for batch in iter_decoded([p for p, _ in items], eval_transform(trunk.data_config), batch_size=batch_size):
        labels, _ = predictor(batch.pixels)[name]
        row_of = {pos: row for row, pos in enumerate(batch.ok)}
        for pos, path in enumerate(batch.paths):
            got = labels[row_of[pos]] if pos in row_of else f"error: {batch.errors[pos]}"
            if got != required[path]:
                wrong.append((path, required[path], got))
    return GoldenResult(source=str(source), total=len(items), wrong=wrong)
