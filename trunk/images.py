"""Finding the images a job should read: a folder tree, or a manifest listing paths.

A manifest is a ``.txt`` file (one path per line; blank lines and ``#`` comments
skipped) or a ``.csv`` / ``.parquet`` table with a ``path`` column. Relative paths in a
manifest are relative to the manifest's own folder, so a data set and its manifest can
move together. Every problem is a one-line ``ValueError`` naming the file (and field).
"""

from __future__ import annotations

import csv
from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
PATH_FIELD = "path"


def list_images(root: str | Path) -> list[Path]:
    """Every image file under ``root``, recursively, sorted by path.

    Files are chosen by extension, case-insensitively. Hidden files and folders (names
    starting with ``.``, e.g. macOS ``._x.jpg`` resource forks) are skipped.

    Raises:
        ValueError: the folder does not exist, is not a folder, or holds no images.
    """
    root = Path(root)
    if not root.exists():
        raise ValueError(f"{root}: image folder does not exist")
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    found = [
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    ]
    if not found:
        raise ValueError(f"{root}: no image files found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return sorted(found)


def _read_txt(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def _read_csv(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if PATH_FIELD not in columns:
                raise ValueError(
                    f"{path}: field '{PATH_FIELD}': column missing; columns: {', '.join(columns) or 'none'}"
                )
            values = [(row.get(PATH_FIELD) or "").strip() for row in reader]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not valid CSV ({e})") from None
    for i, v in enumerate(values):
        if not v:
            # Row numbers as a spreadsheet shows them: the header is row 1.
            raise ValueError(f"{path}: field '{PATH_FIELD}': empty in row {i + 2}")
    return values


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq
    from pyarrow import ArrowException

    try:
        schema = pq.read_schema(path)
    except (ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable Parquet file ({first})") from None
    if PATH_FIELD not in schema.names:
        raise ValueError(f"{path}: field '{PATH_FIELD}': column missing; columns: {', '.join(schema.names) or 'none'}")
    values = pq.read_table(path, columns=[PATH_FIELD]).column(PATH_FIELD).to_pylist()
    out = []
    for i, v in enumerate(values):
        if v is None or not str(v).strip():
            raise ValueError(f"{path}: field '{PATH_FIELD}': empty in row {i}")
        out.append(str(v).strip())
    return out


def read_path_list(path: str | Path) -> list[str]:
    """The image paths a manifest lists, in its order, relative ones made absolute.

    Args:
        path: a ``.txt``, ``.csv`` or ``.parquet`` manifest.

    Raises:
        ValueError: one line naming the file (and the field) when it is missing, of an
            unknown kind, lacks a ``path`` column, has an empty path, or lists nothing.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"{path}: unknown manifest type '{suffix}'; use {', '.join(MANIFEST_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"{path}: manifest file does not exist")
    reader = {".txt": _read_txt, ".csv": _read_csv, ".parquet": _read_parquet}[suffix]
    values = reader(path)
    if not values:
        raise ValueError(f"{path}: manifest lists no images")
    base = path.absolute().parent
    return [str(p if p.is_absolute() else base / p) for p in map(Path, values)]


def resolve_inputs(input: str | Path) -> list[str]:
    """Image paths from a folder (searched recursively) or a manifest file.

    Raises:
        ValueError: one line naming the input when it is neither, or yields no images.
    """
    p = Path(input)
    if p.is_dir():
        return [str(x) for x in list_images(p)]
    if p.suffix.lower() in MANIFEST_SUFFIXES:
        return read_path_list(p)
    if not p.exists():
        raise ValueError(f"{p}: input does not exist (give an image folder or a .txt/.csv/.parquet manifest)")
    raise ValueError(f"{p}: input is neither a folder nor a manifest (.txt, .csv, .parquet)")
