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


def iter_images(root: str | Path) -> Iterator[str]:
    """Every image file under a local folder ``root``, recursively, sorted by path, streamed.

    The walk goes directory by directory (``os.scandir``), each directory's entries sorted
    by name and sub-folders entered in place, so paths come out in the component-wise order
    ``sorted(Path(...))`` gives, while only one directory's names are held per level.
    Files are chosen by extension, case-insensitively; symlinked files count, symlinked
    folders are not entered (as ``Path.rglob``); hidden files and folders (names starting
    with ``.``, e.g. macOS ``._x.jpg`` resource forks) are skipped. The same tree gives the
    same stream every time, which is what lets a bulk job resume on it.

    Raises:
        ValueError: the folder does not exist, is not a folder, or holds no images (raised
            when the stream is first read, or at its end for "no images").
    """
    root = Path(root)
    if not root.exists():
        raise ValueError(f"{root}: image folder does not exist")
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    found = 0
    stack = [_sorted_entries(str(root))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            stack.append(_sorted_entries(entry.path))
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
            found += 1
            yield entry.path
    if not found:
        raise ValueError(f"{root}: no image files found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")


def _sorted_entries(directory: str) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except (PermissionError, FileNotFoundError, NotADirectoryError):
        entries = []  # as rglob: an unreadable (or vanished) sub-folder is skipped
    return iter(entries)


def list_images(root: str | Path) -> list[Path]:
    """Every image file under a local folder ``root``, recursively, sorted by path (:func:`iter_images`, as a list).

    Raises:
        ValueError: the folder does not exist, is not a folder, or holds no images.
    """
    return [Path(p) for p in iter_images(root)]


def _keep_image(rel: str) -> bool:
    """Whether a path relative to the listed folder is a visible image file."""
    parts = rel.split("/")
    return posixpath.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS and not any(
        part.startswith(".") for part in parts
    )


def _find_images(uri: str, fs, root: str) -> Iterator[str]:
    # Directory by directory (one listing call per folder, names only), each sorted by name:
    # the component-wise order a local walk gives, streamed.
    found = 0
    stack = [iter([(root, True)])]
    root_dir = root.rstrip("/")
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        path, is_dir = item
        if is_dir:
            with storage_errors(uri):
                listed = fs.ls(path, detail=True)
            children = []
            for info in listed:
                name = info["name"].rstrip("/")
                if name == path.rstrip("/") or name == root_dir:
                    continue  # some backends list the folder itself
                base = name.rsplit("/", 1)[-1]
                if base.startswith("."):
                    continue
                children.append((base, name, info.get("type") == "directory"))
            children.sort()
            stack.append(iter([(name, d) for _, name, d in children]))
        elif _keep_image(path.rsplit("/", 1)[-1]):
            found += 1
            yield fs.unstrip_protocol(path)
    if not found:
        raise ValueError(f"{uri}: no image files found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")


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
    """The image paths a manifest lists, in its order, relative ones made absolute (:func:`iter_path_list`, as a list).

    Raises:
        ValueError: as :func:`iter_path_list`.
    """
    return list(iter_path_list(path))


def iter_path_list(path: str | Path) -> Iterator[str]:
    """The image paths a manifest lists, in its order, relative ones made absolute, streamed.

    Text lines, CSV blocks or Parquet batches are read as the stream is consumed, so a
    manifest of tens of millions of entries costs one block, not a list of paths.

    Args:
        path: a ``.txt``, ``.csv`` or ``.parquet``/``.pq`` manifest: a local path or an fsspec URI.
            Relative entries are joined to the manifest's folder (a URI manifest gives full
            URIs, with ``..`` resolved since object stores do not); absolute local paths and
            entries containing ``://`` are kept as they are.

    Raises:
        ValueError: one line naming the file (and the field) when it is missing, of an
            unknown kind, lacks a ``path`` column, has an empty path, or lists nothing (at
            the stream's end); or, for a URI, when its protocol is unknown or its backend
            is not installed.
    """
    if is_uri(path):
        yield from _read_uri_manifest(path)
        return
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"{path}: unknown manifest type '{suffix}'; use {_KINDS}")
    if not path.is_file():
        raise ValueError(f"{path}: manifest file does not exist")
    base = str(path.absolute().parent)
    found = 0
    with storage_errors(str(path)):
        for v in _reader(suffix)(str(path), lambda: path.open("rb")):
            found += 1
            yield v if _kept_as_is(v) else _join_local(base, v)
    if not found:
        raise ValueError(f"{path}: manifest lists no images")


def _join_local(base: str, entry: str) -> str:
    """``str(Path(base) / entry)``, without making a Path for the plain entries nearly every row holds."""
    if "//" in entry or "./" in entry or entry.endswith(("/", "/.")) or entry == ".":
        return str(Path(base) / entry)
    return os.path.join(base, entry)


def _read_uri_manifest(uri: str) -> Iterator[str]:
    fs, path = url_to_fs(uri)
    suffix = posixpath.splitext(path)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"{uri}: unknown manifest type '{suffix}'; use {_KINDS}")
    with storage_errors(uri):
        if not fs.isfile(path):
            raise ValueError(f"{uri}: manifest file does not exist")
    base = posixpath.dirname(path)
    found = 0
    with storage_errors(uri):
        for v in _reader(suffix)(uri, lambda: fs.open(path, "rb")):
            found += 1
            yield v if _kept_as_is(v) else fs.unstrip_protocol(posixpath.normpath(posixpath.join(base, v)))
    if not found:
        raise ValueError(f"{uri}: manifest lists no images")


def resolve_inputs(input: str | Path) -> list[str]:
    """Image paths from a folder (searched recursively) or a manifest file (:func:`iter_inputs`, as a list).

    Raises:
        ValueError: as :func:`iter_inputs`.
    """
    return list(iter_inputs(input))


def iter_inputs(input: str | Path) -> Iterator[str]:
    """Image paths from a folder (searched recursively) or a manifest file, streamed, in a deterministic order.

    A folder gives :func:`iter_images` order (sorted by path, component-wise); a manifest
    its own order (:func:`iter_path_list`). Nothing is held but the folder level or manifest
    block being read, so bulk jobs over tens of millions of inputs iterate it shard by shard.

    Args:
        input: a local path, or an fsspec URI such as ``s3://bucket/prefix`` (folder URIs
            give full URIs, openable with ``fsspec.open``).

    Raises:
        ValueError: one line naming the input when it is neither, yields no images, or
            names an unknown protocol or one whose fsspec backend is not installed.
    """
    if is_uri(input):
        yield from _resolve_uri(input)
        return
    p = Path(input)
    if p.is_dir():
        yield from iter_images(p)
    elif p.suffix.lower() in MANIFEST_SUFFIXES:
        yield from iter_path_list(p)
    elif not p.exists():
        raise ValueError(f"{p}: input does not exist (give an image folder or a manifest: {_KINDS})")
    else:
        raise ValueError(f"{p}: input is neither a folder nor a manifest ({_KINDS})")


class InputStream:
    """A job's inputs as a re-iterable stream: each ``iter()`` walks the folder or reads the manifest afresh.

    What :func:`heads.classify.engine.classify` takes to plan shards without holding the
    input list: one pass counts the inputs and fingerprints them, the next computes the
    pending shards, and the job checks the two passes saw the same stream.

    Args:
        input: as for :func:`iter_inputs`.
    """

    def __init__(self, input: str | Path) -> None:
        self.input = input

    def __iter__(self) -> Iterator[str]:
        return iter_inputs(self.input)

    def __repr__(self) -> str:
        return f"InputStream({str(self.input)!r})"


def _resolve_uri(uri: str) -> Iterator[str]:
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
    yield from (_find_images(uri, fs, path) if is_dir else _read_uri_manifest(uri))
