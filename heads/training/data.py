"""A head's labelled data: which images, which labels, which split, which slice.

Two layouts, as a head config's ``data`` block names them:

- ``data.root``: a folder of class sub-folders; every image below a class folder
  (recursively, by file extension) is an example of that class.
- ``data.manifest``: a CSV or Parquet file with columns ``path`` and ``label`` and
  optional ``split`` (``train``/``val``) and ``slice``; relative paths are relative to
  the manifest's own folder, so a data set can be moved as a whole.

Without a ``split`` column the validation split is seeded and stratified. Every problem is
a :class:`heads.spec.HeadConfigError` naming the head config, the field and, for a
manifest, the file and row.

Data that cannot train a classifier is refused (:func:`check_trainable`): fewer than
:data:`MIN_CLASSES` classes (one class passes any accuracy gate at 1.000), and, when
the platform makes the split (no ``split`` column), a class with fewer than
:data:`MIN_IMAGES_PER_CLASS` images, which cannot be in both train and val. With a
``split`` column the team's split is kept: each class needs a training image, and a
class may be absent from validation.

Which files a head's data may make the platform read (head configs and manifests come
from other teams; the platform may run with more rights than they have):

- a manifest's rows may point only inside its *data folder*: the manifest's own folder,
  or the folder above it when the manifest sits in a folder named ``manifests``
  (``ds/manifests/x.csv`` listing ``../images/1.png``, the layout demo/shapes.py
  writes); a ``data.root`` tree's files only inside ``data.root``;
- ``data.allow_roots`` (absolute folders, in the head config, so a reviewer sees it) adds
  folders rows may point into, for relative and absolute paths alike;
- the test is on the *real* path (symlinks resolved), so neither ``../../etc/shadow`` nor
  a symlink out of the folder gets through; a refused row is one line naming the
  manifest, row and column, before the file is opened or hashed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from heads.spec import HeadConfigError, HeadSpec
from trunk.hashindex import ContentHashes
from trunk.images import IMAGE_EXTENSIONS
from trunk.manifest import ManifestError, open_table
from trunk.seen import SeenImages

log = logging.getLogger(__name__)
SPLITS = ("train", "val")
REQUIRED_COLUMNS = ("path", "label")
# Every column a head's manifest or golden file may have; each is read as text.
COLUMNS = (*REQUIRED_COLUMNS, "split", "slice")
# A manifest in a folder of this name lists the images of the folder above (../images/...).
MANIFESTS_FOLDER = "manifests"
# A classifier needs two classes; a platform-made stratified split needs one training and
# one validation image of every class.
MIN_CLASSES = 2
MIN_IMAGES_PER_CLASS = 2


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        path: absolute path of the image file.
        label: index into :attr:`LabelledData.classes`.
        slice: the manifest's ``slice`` value, or ``None``.
    """

    path: str
    label: int
    slice: str | None = None


@dataclass
class LabelledData:
    """A head's examples, split into train and validation.

    Attributes:
        classes: label names, sorted; ``Sample.label`` indexes this list.
        train: training examples, in a fixed order.
        val: validation examples, in a fixed order.
        data_sha: 16 hex digits over every row's relative path, label, split, slice and
            the file's content hash (MLflow tag ``data_sha``).
        source: the folder or manifest the data was read from.
        has_slices: whether any example carries a slice.
        kept_out_of_val: images the platform's split put in train instead of validation
            because the trunk had trained on them (see :func:`load_labelled_data` ``avoid``).
    """

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    data_sha: str
    source: str
    has_slices: bool
    kept_out_of_val: int = 0


@dataclass
class _Row:
    path: Path
    rel: str  # path relative to the data location: what data_sha sees
    label: str
    split: str | None
    slice: str | None
    sha: str = ""  # the file's content hash, filled once per load


def load_labelled_data(spec: HeadSpec, avoid: SeenImages | None = None,
                       hashes: ContentHashes | None = None) -> LabelledData:
    """Read the labelled data a head config names and split it.

    Relative ``data.root`` / ``data.manifest`` values are relative to the working folder.

    Args:
        spec: a validated head config.
        avoid: the images (by content) the trunk the head is evaluated on trained on.
            When the platform makes the split (no ``split`` column), they go to train, and
            validation is drawn from the rest of each class, as far as the class allows;
            a team's own split is kept as it is (its overlap is reported, not changed).
        hashes: the content-hash index of the feature cache (:class:`trunk.hashindex.ContentHashes`):
            files whose size and mtime it knows are not read again, and what it learns is
            saved back. None reads and hashes every file.

    Returns:
        The examples, classes, split and content hash.

    Raises:
        HeadConfigError: a missing file or column, a bad row, an empty data set, a class
            without training images, or no validation images.
    """
    data = spec.data
    if data.get("root"):
        location = Path(data["root"])
        rows = _rows_from_root(spec, location)
    else:
        location = Path(data["manifest"])
        rows = _rows_from_manifest(spec, location)
    if not rows:
        raise spec.error("data", f"no images found in {location}")
    _hash_rows(rows, hashes)
    classes = sorted({r.label for r in rows})
    field_name, what = _where(spec, location)
    if len(classes) < MIN_CLASSES:
        raise spec.error(field_name, f"{what} has a single class ({classes[0]!r}, {len(rows)} images); a classifier "
                                     f"needs at least {MIN_CLASSES} classes")
    if not any(r.split for r in rows):
        counts = {c: sum(r.label == c for r in rows) for c in classes}
        few = {c: n for c, n in counts.items() if n < MIN_IMAGES_PER_CLASS}
        if few:
            shown = ", ".join(f"'{c}' has {n}" for c, n in sorted(few.items()))
            raise spec.error(field_name, f"{what}: class {shown} image(s); without a 'split' column each class needs "
                                         f"at least {MIN_IMAGES_PER_CLASS} (1 for training, 1 for validation): "
                                         f"add images or give a 'split' column")
        kept_out = _assign_split(rows, float(data["val_fraction"]), int(data["split_seed"]), avoid)
    else:
        kept_out = 0
    index = {c: i for i, c in enumerate(classes)}
    train = [Sample(str(r.path), index[r.label], r.slice) for r in rows if r.split == "train"]
    val = [Sample(str(r.path), index[r.label], r.slice) for r in rows if r.split == "val"]
    with_train = {classes[s.label] for s in train}
    for c in classes:
        if c not in with_train:
            raise spec.error("data", f"class '{c}' has no training images in {location}")
    if not val:
        raise spec.error("data", f"no validation images in {location}: give a 'val' split or more images per class")
    return LabelledData(
        classes=classes,
        train=train,
        val=val,
        data_sha=_data_sha(rows),
        source=str(location),
        has_slices=any(r.slice is not None for r in rows),
        kept_out_of_val=kept_out,
    )


def check_trainable(spec: HeadSpec, data: LabelledData) -> None:
    """Refuse labelled data that cannot train a classifier (fewer than :data:`MIN_CLASSES` classes).

    :func:`load_labelled_data` refuses such files itself; this also covers data built or
    filtered elsewhere before a head is trained and gated on it.

    Raises:
        HeadConfigError: naming the data's field and file.
    """
    if len(data.classes) < MIN_CLASSES:
        field_name, what = _where(spec, Path(data.source))
        raise spec.error(field_name, f"{what} has {len(data.classes)} class(es) "
                                     f"({', '.join(repr(c) for c in data.classes) or 'none'}); a classifier needs "
                                     f"at least {MIN_CLASSES} classes")


def _where(spec: HeadSpec, location: Path) -> tuple[str, str]:
    """The config field and the wording that name a head's data in an error."""
    if spec.data.get("root"):
        return "data.root", f"{location} (class folders)"
    return "data.manifest", f"{location}: column 'label'"


# -- class folders ------------------------------------------------------------------------
# -- which files rows may name -------------------------------------------------------------
def manifest_folder(manifest: str | Path) -> Path:
    """The data folder of a manifest (or golden) file: its folder, or the one above ``manifests/``."""
    folder = _absolute(Path(manifest)).parent
    return folder.parent if folder.name == MANIFESTS_FOLDER else folder


def data_roots(spec: HeadSpec) -> list[Path]:
    """The folders a head's data rows may point into: its data folder plus ``data.allow_roots``."""
    data = spec.data
    own = _absolute(Path(data["root"])) if data.get("root") else manifest_folder(data["manifest"])
    return [own, *(_absolute(Path(r)) for r in data.get("allow_roots") or ())]


def outside_roots(path: Path, roots: list[Path]) -> bool:
    """Whether ``path``'s real location (symlinks resolved) is outside every one of ``roots``."""
    real = os.path.realpath(path)
    for root in roots:
        top = os.path.realpath(root)
        if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
            return False
    return True


def describe_roots(roots: list[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def _rows_from_root(spec: HeadSpec, root: Path) -> list[_Row]:
    if not root.is_dir():
        raise spec.error("data.root", f"{root} is not a folder")
    roots = data_roots(spec)
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in class_dir.rglob("*")
                        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts))
        if not images:
            raise spec.error("data", f"class '{class_dir.name}' has no training images in {class_dir}")
        for p in images:
            if outside_roots(p, roots):
                raise spec.error("data.root", f"{p} links to {os.path.realpath(p)}, outside {describe_roots(roots)}; "
                                              f"add its folder to data.allow_roots to read it")
        rows += [_Row(_absolute(p), p.relative_to(root).as_posix(), class_dir.name, None, None) for p in images]
    return rows


# -- manifests ----------------------------------------------------------------------------
def read_table(manifest: Path, source: str, field_name: str) -> tuple[list[str], list[dict[str, str | None]]]:
    """``(column names, records)`` of a CSV or Parquet file a head config names.

    Read with the platform's one table reader (:func:`trunk.manifest.open_table`): each
    record holds the columns of :data:`COLUMNS`, as text (a label ``1`` stays ``"1"``), or
    ``None`` for a column the file lacks.

    Raises:
        HeadConfigError: the file cannot be read, naming ``source`` and ``field_name``.
    """
    try:
        with open_table(manifest) as table:
            return table.columns, list(table.rows(COLUMNS))
    except ManifestError as e:
        raise HeadConfigError(source, field_name, f"{manifest} cannot be read: {e.reason}") from None


def _absolute(path: Path) -> Path:
    # abspath, not resolve(): symlinked images keep the names the data set gives them.
    return Path(os.path.abspath(path))


def _text(value: str | None) -> str | None:
    if value is None:
        return None
    text = value.strip()
    return text or None


def _rows_from_manifest(spec: HeadSpec, manifest: Path) -> list[_Row]:
    if not manifest.is_file():
        raise spec.error("data.manifest", f"{manifest}: no such file")
    columns, table = read_table(manifest, spec.source, "data.manifest")
    for col in REQUIRED_COLUMNS:
        if col not in columns:
            raise spec.error("data.manifest", f"{manifest}: missing column '{col}' (has: {', '.join(columns) or 'none'})")
    base = _absolute(manifest).parent
    roots = data_roots(spec)
    rows: list[_Row] = []
    seen: dict[Path, int] = {}
    # Rows are numbered from 1, not counting a CSV header.
    for number, record in enumerate(table, start=1):
        where = f"{manifest}: row {number}"
        raw_path, label = _text(record.get("path")), _text(record.get("label"))
        if raw_path is None:
            raise spec.error("data.manifest", f"{where}: column 'path' is empty")
        if label is None:
            raise spec.error("data.manifest", f"{where}: column 'label' is empty")
        split = _text(record.get("split"))
        if "split" in columns and split not in SPLITS:
            raise spec.error("data.manifest", f"{where}: column 'split' is {split!r}; use 'train' or 'val'")
        path = Path(raw_path)
        path = _absolute(path if path.is_absolute() else base / path)
        # Before the file is looked at: a row may not reach outside the team's data.
        if outside_roots(path, roots):
            raise spec.error("data.manifest", f"{where}: column 'path': {raw_path} is outside the data folders "
                                              f"({describe_roots(roots)}); add its folder to data.allow_roots")
        if not path.is_file():
            raise spec.error("data.manifest", f"{where}: column 'path': {raw_path} does not exist")
        if path in seen:
            raise spec.error("data.manifest", f"{where}: column 'path': {raw_path} is already listed at row {seen[path]}")
        seen[path] = number
        rel = Path(os.path.relpath(path, base)).as_posix()
        rows.append(_Row(path, rel, label, split, _text(record.get("slice"))))
    return rows


# -- split and hash -----------------------------------------------------------------------
def _assign_split(rows: list[_Row], val_fraction: float, seed: int, avoid: SeenImages | None = None) -> int:
    """Stratified split: per class, a shuffle seeded by (seed, class), so adding a class
    never reshuffles the others; a class with at least 2 images keeps 1 for validation
    and at least 1 for training.

    Validation takes the first images of the shuffle that are not in ``avoid``; when every
    such image would have been chosen anyway the split is exactly the unsteered one. A
    class with too few unseen images keeps fewer in validation (at least 1: then an
    image the trunk saw stays there, and the overlap is reported).

    Returns:
        How many images the steering moved out of validation.
    """
    seen = avoid.mask([r.sha for r in rows]) if avoid is not None and len(avoid) else [False] * len(rows)
    is_seen = {id(r): flag for r, flag in zip(rows, seen)}
    moved = 0
    by_class: dict[str, list[_Row]] = {}
    for r in rows:
        by_class.setdefault(r.label, []).append(r)
    for label, members in sorted(by_class.items()):
        members.sort(key=lambda r: r.rel)
        # String seeds are hashed with SHA-512: stable across processes and Python runs.
        random.Random(f"{seed}/{label}").shuffle(members)
        n = len(members)
        n_val = 0 if n < 2 else min(n - 1, max(1, round(n * val_fraction)))
        unseen = [r for r in members if not is_seen[id(r)]]
        chosen = unseen[:n_val] if unseen else members[:min(n_val, 1)]
        moved += sum(is_seen[id(r)] for r in members[:n_val]) - sum(is_seen[id(r)] for r in chosen)
        picked = {id(r) for r in chosen}
        for r in members:
            r.split = "val" if id(r) in picked else "train"
    return moved


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_rows(rows: list[_Row], hashes: ContentHashes | None) -> None:
    """Fill each row's content hash: every file read, or through the (size, mtime) index."""
    if hashes is None:
        for r in rows:
            r.sha = _file_sha256(r.path)
        return
    for r in rows:
        r.sha = hashes.sha(r.path)
    try:
        hashes.save()
    except OSError as e:  # a read-only cache: correct hashes all the same, read again next time
        log.warning("%s: could not save content hashes (%s); the files will be hashed again next run",
                    hashes.directory, e)


def _data_sha(rows: list[_Row]) -> str:
    # Content hashes, not (size, mtime): a data set whose pixels changed under the same names
    # must not look unchanged. The index (trunk.hashindex) only saves reading unchanged files.
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r.rel):
        h.update(json.dumps([r.rel, r.label, r.split, r.slice, r.sha]).encode() + b"\n")
    return h.hexdigest()[:16]
