"""Finding the images a job should read: a folder tree, or a manifest listing paths.

Inputs are local paths or fsspec URIs (anything with ``<protocol>://``: ``s3://bucket/prefix``,
``gs://...``, ``file:///data``, ``memory://x``). A folder URI yields full URIs, so each path
can be opened later with ``fsspec.open(path)`` in another process.

A manifest is a ``.txt`` file (one path per line; blank lines and ``#`` comments
skipped) or a ``.csv`` / ``.parquet`` (``.pq``) table with a ``path`` column, read by the
platform's one table reader (:mod:`trunk.manifest`). Relative paths in a
manifest are relative to the manifest's own folder (local or URI), so a data set and its
manifest can move together; absolute local paths and URIs in a manifest are kept as they
are. Manifests are streamed (lines, rows, Parquet batches of the one column), so millions of
entries cost only the list of paths. Every problem is a one-line ``ValueError`` naming the
file (and field).

File names are bytes on POSIX and need not be valid UTF-8. Python holds such a name as a
``str`` with the undecodable bytes as lone surrogates (``os.fsdecode``); a folder walk and a
``.txt`` manifest line give that form, and it opens the very file. Where a name must be text
(the ``path`` column of bulk output, JSON between Ray stages), :func:`path_text` writes it
losslessly and :func:`path_from_text` gives it back.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path

from trunk.manifest import (
    CSV_SUFFIXES, PARQUET_SUFFIXES, Opener, is_uri, open_table, storage_errors, url_to_fs,
)

# The one list of image file extensions: folder walks here and head class folders (heads/training/data.py).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
TEXT_SUFFIXES = (".txt",)
MANIFEST_SUFFIXES = (*TEXT_SUFFIXES, *CSV_SUFFIXES, *PARQUET_SUFFIXES)
PATH_FIELD = "path"
_KINDS = ", ".join(MANIFEST_SUFFIXES)  # for messages


_ESCAPE = re.compile(rb"\\(\\|x[0-9a-f]{2})")


def path_text(path: str | Path) -> str:
    """A path as valid UTF-8 text, losslessly: the form bulk output's ``path`` column holds.

    The path's bytes (``os.fsencode``) are decoded as UTF-8; each byte that is not part of
    valid UTF-8 is written ``\\xHH`` (two lowercase hex digits) and each literal backslash
    is doubled, so the text is unambiguous. A valid UTF-8 path without backslashes (nearly
    every path) is unchanged: ``b"bad\\xff.png"`` -> ``"bad\\\\xff.png"`` but ``"a/b.png"`` -> ``"a/b.png"``.

    Args:
        path: a local path or URI, as ``os.fsdecode`` gives it (undecodable bytes as surrogates).
    """
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate no file name decodes to; keep its bytes visible anyway
        raw = str(path).encode("utf-8", "surrogatepass")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def utf8_text(text: str) -> str:
    """``text`` unchanged when it is valid UTF-8, else as :func:`path_text` writes it.

    For messages that may quote a path that is not UTF-8 (an ``error`` cell), so a
    Parquet or JSON writer can always take them, while every other message stays as it was.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return path_text(text)
    return text


def path_from_text(text: str) -> str:
    """The inverse of :func:`path_text`: the path, openable as is (undecodable bytes as surrogates)."""
    raw = _ESCAPE.sub(lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1)[1:], 16)]),
                      text.encode("utf-8"))
    return os.fsdecode(raw)


def list_images(root: str | Path) -> list[Path]:
    """Every image file under a local folder ``root``, recursively, sorted by path.

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


def _keep_image(rel: str) -> bool:
    """Whether a path relative to the listed folder is a visible image file."""
    parts = rel.split("/")
    return posixpath.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS and not any(
        part.startswith(".") for part in parts
    )


def _find_images(uri: str, fs, root: str) -> list[str]:
    prefix = root.rstrip("/") + "/"
    with storage_errors(uri):
        # One recursive listing (a flat list call on object stores), names only, no contents.
        found = [
            fs.unstrip_protocol(p)
            for p in fs.find(root, withdirs=False)
            if _keep_image(p[len(prefix):] if p.startswith(prefix) else p)
        ]
    if not found:
        raise ValueError(f"{uri}: no image files found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    # "\0" sorts below every character, so this is the component-wise order Path uses.
    found.sort(key=lambda s: s.replace("/", "\0"))
    return found


def _read_txt(label: str, open_binary: Opener) -> Iterator[str]:
    # Line by line in bytes: a line is a path's bytes, as `find` or `ls` print them, so a
    # name that is not valid UTF-8 is kept (as surrogates, os.fsdecode's form) and opens
    # the very file. A NUL byte cannot be in a path: that is UTF-16 or binary, not a list.
    offset = 0
    with open_binary() as f:
        for raw in f:
            if offset == 0 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM, e.g. from Windows Notepad
                raw, offset = raw[3:], 3
            nul = raw.find(b"\0")
            if nul >= 0:
                raise ValueError(f"{label}: not a text list of paths (NUL byte at byte {offset + nul}; "
                                 "save it as UTF-8)")
            text = raw.decode("utf-8", "surrogateescape")
            offset += len(raw)
            # splitlines, not just "\n": lone "\r" (old Mac) still separates lines.
            for line in text.splitlines():
                s = line.strip()
                if s and not s.startswith("#"):
                    yield s


def _read_table(label: str, open_binary: Opener) -> Iterator[str]:
    # CSV or Parquet (by label's suffix), through the platform's one manifest reader:
    # streamed, and only the path column is converted.
    with open_table(label, open_binary=open_binary) as table:
        if PATH_FIELD not in table.columns:
            raise ValueError(
                f"{label}: field '{PATH_FIELD}': column missing; columns: {', '.join(table.columns) or 'none'}"
            )
        # Rows as a spreadsheet shows a CSV (the header is row 1); a Parquet file's from 0.
        first = 0 if label.lower().endswith(PARQUET_SUFFIXES) else 2
        for number, row in enumerate(table.rows([PATH_FIELD]), start=first):
            v = (row[PATH_FIELD] or "").strip()
            if not v:
                raise ValueError(f"{label}: field '{PATH_FIELD}': empty in row {number}")
            yield v


def _kept_as_is(entry: str) -> bool:
    """Whether a manifest entry is used verbatim: a URI or an absolute local path."""
    return is_uri(entry) or Path(entry).is_absolute()


def _reader(suffix: str):
    return _read_txt if suffix in TEXT_SUFFIXES else _read_table


def read_path_list(path: str | Path) -> list[str]:
    """The image paths a manifest lists, in its order, relative ones made absolute.

    Args:
        path: a ``.txt``, ``.csv`` or ``.parquet``/``.pq`` manifest: a local path or an fsspec URI.
            Relative entries are joined to the manifest's folder (a URI manifest gives full
            URIs, with ``..`` resolved since object stores do not); absolute local paths and
            entries containing ``://`` are kept as they are.

    Raises:
        ValueError: one line naming the file (and the field) when it is missing, of an
            unknown kind, lacks a ``path`` column, has an empty path, or lists nothing;
            or, for a URI, when its protocol is unknown or its backend is not installed.
    """
    if is_uri(path):
        return _read_uri_manifest(path)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"{path}: unknown manifest type '{suffix}'; use {_KINDS}")
    if not path.is_file():
        raise ValueError(f"{path}: manifest file does not exist")
    base = path.absolute().parent
    with storage_errors(str(path)):
        out = [
            v if _kept_as_is(v) else str(base / v)
            for v in _reader(suffix)(str(path), lambda: path.open("rb"))
        ]
    if not out:
        raise ValueError(f"{path}: manifest lists no images")
    return out


def _read_uri_manifest(uri: str) -> list[str]:
    fs, path = url_to_fs(uri)
    suffix = posixpath.splitext(path)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"{uri}: unknown manifest type '{suffix}'; use {_KINDS}")
    with storage_errors(uri):
        if not fs.isfile(path):
            raise ValueError(f"{uri}: manifest file does not exist")
        base = posixpath.dirname(path)
        out = [
            v if _kept_as_is(v) else fs.unstrip_protocol(posixpath.normpath(posixpath.join(base, v)))
            for v in _reader(suffix)(uri, lambda: fs.open(path, "rb"))
        ]
    if not out:
        raise ValueError(f"{uri}: manifest lists no images")
    return out


def resolve_inputs(input: str | Path) -> list[str]:
    """Image paths from a folder (searched recursively) or a manifest file.

    Args:
        input: a local path, or an fsspec URI such as ``s3://bucket/prefix`` (folder URIs
            give full URIs, openable with ``fsspec.open``).

    Raises:
        ValueError: one line naming the input when it is neither, yields no images, or
            names an unknown protocol or one whose fsspec backend is not installed.
    """
    if is_uri(input):
        return _resolve_uri(input)
    p = Path(input)
    if p.is_dir():
        return [str(x) for x in list_images(p)]
    if p.suffix.lower() in MANIFEST_SUFFIXES:
        return read_path_list(p)
    if not p.exists():
        raise ValueError(f"{p}: input does not exist (give an image folder or a manifest: {_KINDS})")
    raise ValueError(f"{p}: input is neither a folder nor a manifest ({_KINDS})")


def _resolve_uri(uri: str) -> list[str]:
    fs, path = url_to_fs(uri)
    with storage_errors(uri):
        if fs.isdir(path):
            is_dir = True
        elif posixpath.splitext(path)[1].lower() in MANIFEST_SUFFIXES:
            is_dir = False
        elif not fs.exists(path):
            raise ValueError(f"{uri}: input does not exist (give an image folder or a manifest: {_KINDS})")
        else:
            raise ValueError(f"{uri}: input is neither a folder nor a manifest ({_KINDS})")
    return _find_images(uri, fs, path) if is_dir else _read_uri_manifest(uri)
