"""Held-out scoring: every head on labelled images none of them trained on.

Two ways in, one set of figures (:class:`HeldoutScore`, named as MLflow logs them:
``heldout_accuracy``, ``heldout_macro_f1``, ``heldout_slice_accuracy.<slice>``, ...):

- a *labels file* beside a bulk classification (``tools.classify labels=...``): a CSV or
  Parquet file with a ``path`` column, one column per head name holding that head's
  label (an empty cell: not labelled for that head) and an optional ``slice`` column.
  Relative paths are relative to the file's folder. :func:`read_labels_file` reads it,
  checked against the release's heads before any image is classified, and
  :func:`score_classified` joins it with the job's Parquet output by real path (symlinks
  resolved; fsspec URIs as written), so scoring and the batch job share one inference path.
  The images are never opened here, so a labels file's rows may point anywhere.
- a head config's ``data.heldout`` (the refresh cascade): a CSV or Parquet file with
  ``path``, ``label`` and optional ``slice``; :func:`heldout_metrics` runs the head on
  those images through a trunk. Its rows follow the rule of :mod:`heads.training.data`
  (only inside the file's data folder, the head's own data folders and
  ``data.allow_roots``, on real paths), checked before an image is read.

Every file is read with the platform's one table reader (:func:`trunk.manifest.open_table`)
by :func:`read_label_file`, which golden sets share (:mod:`heads.checks.golden`). A bad row
is one line naming the file, the row (from 1, the CSV header not counted) and the column.
Images that fail to decode are counted (``heldout_errors``), never scored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from heads.bank import HeadBank
from heads.classify.output import SUCCESS_FILE, read_json, shard_name
from heads.predict import BatchPredictor
from heads.spec import HeadConfigError, HeadSpec
from heads.store import LoadedHead
from heads.training.data import data_roots, describe_roots, manifest_folder, outside_roots
from heads.training.evaluate import evaluate, seen_split_metrics
from trunk.loader import iter_decoded
from trunk.manifest import ManifestError, is_uri, open_table
from trunk.preprocess import eval_transform

FIELD = "data.heldout"
SLICE = "slice"
# The prefix of every held-out metric: apart from a head's own val_* figures.
PREFIX = "heldout_"


class LabelsError(ValueError):
    """A labels file is wrong; the message is one line naming the file, row and column."""


@dataclass(frozen=True)
class LabelledRow:
    """One row of a labels file.

    Attributes:
        number: the row's number, from 1 (a CSV header is not counted).
        path: the image's absolute path (``os.path.abspath``), or a URI as written.
        labels: ``{label column: label}`` for the row's non-empty label cells.
        slice: the ``slice`` cell, or None.
    """

    number: int
    path: str
    labels: dict[str, str]
    slice: str | None = None


def read_label_file(path: str | Path, label_columns: Mapping[str, Sequence[str]], *,
                    fail: Callable[[str], Exception], roots: Sequence[Path] | None = None,
                    required: bool = True, unique: bool = True) -> list[LabelledRow]:
    """The rows of a CSV or Parquet file of image paths and labels, checked.

    Args:
        path: the file. Relative ``path`` cells are relative to its folder.
        label_columns: ``{column: the classes its labels must be one of}``.
        fail: builds the exception for a one-line message (which names the file, row and column).
        roots: folders every row's real path must be inside (checked before any image is
            read); None: no such rule (the caller never opens the images).
        required: every column of ``label_columns`` must exist and every cell be filled;
            else columns the file lacks are left out and an empty cell means "no label".
        unique: refuse a path listed twice.

    Raises:
        Exception: from ``fail``: the file is missing or unreadable, lacks a column, or a
            row has an empty cell, an unknown label, a duplicate path or one outside ``roots``.
    """
    path = Path(path)
    if not path.is_file():
        raise fail(f"{path}: no such file")
    columns = ["path", *label_columns, SLICE]
    try:
        with open_table(path) as table:
            present, records = table.columns, list(table.rows(columns))
    except ManifestError as e:
        raise fail(f"{path} cannot be read: {e.reason}") from None
    needed = ["path", *label_columns] if required else ["path"]
    for column in needed:
        if column not in present:
            raise fail(f"{path}: missing column '{column}' (has: {', '.join(present) or 'none'})")
    read = [c for c in label_columns if c in present]
    base = Path(os.path.abspath(path)).parent
    rows: list[LabelledRow] = []
    first_row: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        where = f"{path}: row {number}"
        image = str(record.get("path") or "").strip()
        if not image:
            raise fail(f"{where}: column 'path' is empty")
        labels: dict[str, str] = {}
        for column in read:
            label = str(record.get(column) or "").strip()
            if not label:
                if required:
                    raise fail(f"{where}: column '{column}' is empty")
                continue
            if label not in label_columns[column]:
                raise fail(f"{where}: column '{column}': '{label}' is not one of the head's classes "
                           f"({', '.join(label_columns[column])})")
            labels[column] = label
        if roots is None and is_uri(image):
            full = image
        else:
            full = os.path.abspath(image if Path(image).is_absolute() else base / image)
        if roots is not None and outside_roots(Path(full), list(roots)):
            raise fail(f"{where}: column 'path': {image} is outside the data folders ({describe_roots(list(roots))}); "
                       f"add its folder to data.allow_roots")
        if unique:
            if full in first_row:
                raise fail(f"{where}: column 'path': {image} is listed twice (row {first_row[full]} too)")
            first_row[full] = number
        cut = str(record.get(SLICE) or "").strip()
        rows.append(LabelledRow(number, full, labels, cut or None))
    return rows


# -- the figures ------------------------------------------------------------------------------
@dataclass
class HeldoutScore:
    """One head's figures on a held-out set.

    Attributes:
        head: the head's name.
        classes: its classes (the confusion's order).
        images: labelled images scored (decoded).
        errors: labelled images that failed to decode: counted, not scored.
        accuracy: top-1 accuracy over ``images`` (None when nothing was scored).
        macro_f1: as :func:`heads.training.evaluate.evaluate` computes it (None likewise).
        per_class_recall: ``{class: recall}`` for classes with held-out examples.
        confusion: ``confusion[true][predicted]`` counts.
        slice_accuracy: ``{slice: accuracy}`` for every slice that has a scored image.
        slice_sizes: ``{slice: scored images}``.
        seen_by_trunk: how much of the scored set the trunk trained on (by content hash)
            and the figures on the rest, as :func:`heads.training.evaluate.seen_split_metrics`
            names them with ``heldout_`` for ``val_`` (``heldout_seen_by_trunk``,
            ``heldout_seen_share``, ``heldout_unseen_images``, ``heldout_accuracy_unseen``,
            ``heldout_macro_f1_unseen``); empty when not checked (the trunk has no record).
    """

    head: str
    classes: list[str]
    images: int
    errors: int = 0
    accuracy: float | None = None
    macro_f1: float | None = None
    per_class_recall: dict[str, float] = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)
    slice_accuracy: dict[str, float] = field(default_factory=dict)
    slice_sizes: dict[str, int] = field(default_factory=dict)
    seen_by_trunk: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics: ``heldout_images``, ``heldout_errors``, ``heldout_accuracy``,
        ``heldout_macro_f1``, ``heldout_recall.<class>``, ``heldout_slice_accuracy.<slice>``,
        ``heldout_slice_size.<slice>`` and the :attr:`seen_by_trunk` figures (each only when known)."""
        out: dict[str, float] = {f"{PREFIX}images": float(self.images), f"{PREFIX}errors": float(self.errors)}
        if self.accuracy is not None:
            out[f"{PREFIX}accuracy"] = self.accuracy
            out[f"{PREFIX}macro_f1"] = float(self.macro_f1)
        out.update({f"{PREFIX}recall.{c}": r for c, r in self.per_class_recall.items()})
        for name, acc in self.slice_accuracy.items():
            out[f"{PREFIX}slice_accuracy.{name}"] = acc
            out[f"{PREFIX}slice_size.{name}"] = float(self.slice_sizes[name])
        out.update(self.seen_by_trunk)
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(head: str, classes: Sequence[str], truth: Sequence[str], predicted: Sequence[str],
          slices: Sequence[str | None] | None = None, *, errors: int = 0,
          seen: Sequence[bool] | None = None) -> HeldoutScore:
    """Score one head's predictions against held-out labels.

    Args:
        head: the head's name.
        classes: its classes; every label and prediction is one of them.
        truth: the labels of the decoded images.
        predicted: the head's labels for the same images.
        slices: each image's slice (None: no slice).
        errors: labelled images that did not decode (reported, not scored).
        seen: per image, whether the trunk trained on it; None: unknown.
    """
    classes = list(classes)
    result = HeldoutScore(head=head, classes=classes, images=len(truth), errors=int(errors))
    if not truth:
        return result
    index = {c: i for i, c in enumerate(classes)}
    y, p = [index[t] for t in truth], [index[q] for q in predicted]
    figures = evaluate(torch.tensor(p), torch.tensor(y), classes, slices=list(slices) if slices is not None else None)
    result.accuracy, result.macro_f1 = figures.accuracy, figures.macro_f1
    result.per_class_recall, result.confusion = figures.per_class_recall, figures.confusion
    result.slice_accuracy, result.slice_sizes = figures.slice_accuracy, figures.slice_sizes
    if seen is not None:
        split = seen_split_metrics(p, y, classes, list(seen))
        result.seen_by_trunk = {PREFIX + k.removeprefix("val_"): v for k, v in split.items()}
    return result


# -- a head config's data.heldout (the refresh cascade) --------------------------------------
def read_heldout(spec: HeadSpec, classes: Sequence[str]) -> list[LabelledRow] | None:
    """The rows of the held-out file ``spec`` names in ``data.heldout``, or None when it names none.

    Relative ``data.heldout`` values are relative to the working folder (as ``data.manifest``).

    Raises:
        HeadConfigError: naming the head config, ``data.heldout``, the file, row and column.
    """
    name = spec.data.get("heldout")
    if not name:
        return None
    path = Path(name)
    roots = [manifest_folder(path), *data_roots(spec)]
    return read_label_file(path, {"label": list(classes)}, roots=roots,
                           fail=lambda message: HeadConfigError(spec.source, FIELD, message))


def heldout_metrics(trunk, head: LoadedHead, spec: HeadSpec, *, device: str | torch.device = "cpu",
                    batch_size: int = 64, seen=None) -> HeldoutScore | None:
    """The held-out figures of one head, on the set its config names in ``data.heldout``.

    The refresh cascade calls this with the candidate trunk and the head retrained on it
    (and with production's, to compare); nothing is logged here.

    Args:
        trunk: the trunk the head runs on (a :class:`trunk.model.Trunk`).
        head: the loaded head (its ``classes`` decide which labels are valid).
        spec: the head's validated config; ``data.heldout`` names a CSV/Parquet file with
            ``path``, ``label`` and optional ``slice`` columns.
        device: where to run.
        batch_size: images per forward pass.
        seen: a :class:`trunk.seen.SeenImages` of what ``trunk`` trained on, to count the
            held-out images it saw and score the rest (:attr:`HeldoutScore.seen_by_trunk`);
            None: not checked.

    Returns:
        The figures (see :meth:`HeldoutScore.metrics` for their MLflow names), or None when
        the config names no held-out set.

    Raises:
        HeadConfigError: the file is missing or unreadable, or a row is bad (one line
            naming the config, ``data.heldout``, the file, row and column), before any
            image is read.
    """
    rows = read_heldout(spec, head.classes)
    if rows is None:
        return None
    name = spec.name
    predictor = BatchPredictor(trunk, HeadBank({name: head}), torch.device(device), amp=False)
    truth, predicted, slices, shas = [], [], [], []
    errors = 0
    for batch in iter_decoded([r.path for r in rows], eval_transform(trunk.data_config), batch_size=batch_size):
        labels, _ = predictor(batch.pixels)[name]
        ok = iter(labels)
        for i, pos in enumerate(batch.indices):
            if batch.errors[i] is not None:
                errors += 1
                continue
            row = rows[pos]
            truth.append(row.labels["label"])
            predicted.append(next(ok))
            slices.append(row.slice)
            shas.append(batch.shas[i])
    mask = seen.mask(shas) if seen is not None else None
    return score(name, head.classes, truth, predicted, slices, errors=errors, seen=mask)


# -- a labels file beside a bulk classification ------------------------------------------------
@dataclass
class LabelsFile:
    """A classify labels file, read against a release's heads.

    Attributes:
        path: the file.
        rows: its rows (labels keyed by head name).
        heads: the release's heads that have a column, sorted.
        skipped: the release's heads without a column (not scored), sorted.
        ignored: columns naming no head of the release (besides ``path`` and ``slice``).
    """

    path: str
    rows: list[LabelledRow]
    heads: list[str]
    skipped: list[str]
    ignored: list[str]


def read_labels_file(path: str | Path, classes_of: Mapping[str, Sequence[str]]) -> LabelsFile:
    """Read a classify labels file: ``path``, one column per head, optional ``slice``.

    Args:
        path: the CSV or Parquet file.
        classes_of: ``{head name: its classes}`` of the release being run.

    Raises:
        LabelsError: one line naming the file, row and column (a missing file or
            ``path`` column, an empty path, a path listed twice, a label that is not one of
            the head's classes), or a file with no column for any of the heads.
    """
    path = Path(path)
    rows = read_label_file(path, {h: list(c) for h, c in classes_of.items()}, fail=LabelsError, required=False)
    with open_table(path) as table:
        present = list(table.columns)
    heads = sorted(h for h in classes_of if h in present)
    if not heads:
        raise LabelsError(f"{path}: no column names a head of the release (heads: {', '.join(sorted(classes_of))}; "
                          f"has: {', '.join(present)})")
    ignored = [c for c in present if c not in ("path", SLICE) and c not in classes_of]
    return LabelsFile(str(path), rows, heads, sorted(h for h in classes_of if h not in present), ignored)


def _match_key(path: str) -> str:
    return path if is_uri(path) else os.path.realpath(path)


def score_classified(output: str | Path, labels: LabelsFile, classes_of: Mapping[str, Sequence[str]], *,
                     seen=None) -> tuple[dict[str, HeldoutScore], int]:
    """Join a finished classification folder with a labels file; score every labelled head.

    Only the columns needed are read, shard by shard (``path``, ``sha256``, ``error`` and
    each scored head's ``<head>_label``).

    Args:
        output: the folder (with ``_SUCCESS.json``).
        labels: from :func:`read_labels_file`.
        classes_of: ``{head: classes}``.
        seen: a :class:`trunk.seen.SeenImages` of what the release's trunk trained on, or None.

    Returns:
        ``({head: figures}, labelled rows with no row in the output)``.
    """
    out = Path(output)
    shards = int(read_json(out / SUCCESS_FILE)["counts"]["shards"])
    wanted = {_match_key(r.path): r for r in labels.rows if r.labels}
    per_head: dict[str, dict[str, list]] = {h: {"truth": [], "predicted": [], "slices": [], "shas": []}
                                            for h in labels.heads}
    errors = dict.fromkeys(labels.heads, 0)
    matched: set[str] = set()
    columns = ["path", "sha256", "error", *(f"{h}_label" for h in labels.heads)]
    for k in range(shards):
        table = pq.read_table(out / shard_name(k), columns=columns).to_pydict()
        for i, cell in enumerate(table["path"]):
            key = _match_key(cell)
            row = wanted.get(key)
            if row is None:
                continue
            matched.add(key)
            for head, label in row.labels.items():
                if table["error"][i] is not None:
                    errors[head] += 1
                    continue
                got = per_head[head]
                got["truth"].append(label)
                got["predicted"].append(table[f"{head}_label"][i])
                got["slices"].append(row.slice)
                got["shas"].append(table["sha256"][i])
    scores = {}
    for head, got in per_head.items():
        mask = seen.mask(got["shas"]) if seen is not None else None
        scores[head] = score(head, classes_of[head], got["truth"], got["predicted"], got["slices"],
                             errors=errors[head], seen=mask)
    return scores, len(wanted) - len(matched)


def confusion_json(result: HeldoutScore) -> str:
    """The figures as JSON (the ``heldout.json`` artifact)."""
    return json.dumps(result.as_dict(), indent=2, sort_keys=True)
