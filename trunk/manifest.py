"""Reading manifest tables: CSV and Parquet files, local paths or fsspec URIs, streamed.

The one reader behind head data manifests (:mod:`heads.training.data`), golden sets
(:mod:`heads.checks.golden`) and bulk-classification input lists (:mod:`trunk.images`). It is
built on pyarrow's readers: ``pyarrow.csv.open_csv`` (a streaming reader, a block at a
time) and ``pyarrow.parquet.ParquetFile.iter_batches`` (only the columns asked for), so a
manifest of millions of rows costs only the rows the caller keeps.

What every caller can rely on:

- every cell it asks for is text (``str``), never inferred: a label ``1`` stays ``"1"``,
  ``NA`` stays ``"NA"``, an empty CSV cell is ``""``; a Parquet column of another type is
  written as Python's ``str`` writes its values (as before this reader), a null is ``None``;
- CSV is UTF-8, with or without a byte-order mark; a file that is not is one line naming
  the byte where it stops being UTF-8;
- an empty CSV file has no columns (the caller reports which one is missing);
- every problem is a :class:`ManifestError` (a ``ValueError``): ``<file>: <reason>``, one
  line; callers that word their messages differently use :attr:`ManifestError.reason`.

Storage helpers for fsspec URIs (:func:`is_uri`, :func:`url_to_fs`, :func:`storage_errors`)
live here too, since a manifest is the first thing a job opens from storage.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")

Opener = Callable[[], IO[bytes]]


class ManifestError(ValueError):
    """A manifest that cannot be read as a table.

    Attributes:
        label: the file as the caller named it (path or URI).
        reason: one line, without the file name.
    """

    def __init__(self, label: str, reason: str):
        super().__init__(f"{label}: {reason}")
        self.label = label
        self.reason = reason


# -- storage ------------------------------------------------------------------------------
def is_uri(path: str | Path) -> bool:
    """Whether ``path`` names an fsspec URI (``<protocol>://...``) rather than a local path."""
    return isinstance(path, str) and "://" in path


def first_line(e: BaseException) -> str:
    """An exception's message, first line only (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def url_to_fs(uri: str):
    """The fsspec filesystem and protocol-less path for ``uri``, or a one-line ValueError."""
    from fsspec.core import split_protocol
    from fsspec.core import url_to_fs as _fsspec_url_to_fs

    protocol = split_protocol(uri.rpartition("::")[2])[0]
    try:
        return _fsspec_url_to_fs(uri)
    except ImportError as e:
        # fsspec's message names the package to install, e.g. "Install s3fs to access S3".
        raise ValueError(f"{uri}: no fsspec backend for protocol '{protocol}' ({first_line(e)})") from None
    except ValueError as e:
        if "Protocol not known" in str(e):
            raise ValueError(f"{uri}: unknown fsspec protocol '{protocol}'") from None
        raise ValueError(f"{uri}: cannot open ({first_line(e)})") from None


@contextmanager
def storage_errors(label: str) -> Iterator[None]:
    """Storage failures (permission denied, missing bucket, network) as one line naming ``label``."""
    try:
        yield
    except OSError as e:
        raise ManifestError(label, f"cannot read ({first_line(e)})") from None


def opener(path: str | Path) -> Opener:
    """A callable opening ``path`` (a local path or an fsspec URI) for binary reading."""
    if is_uri(path):
        fs, inner = url_to_fs(path)
        return lambda: fs.open(inner, "rb")
    return lambda: open(path, "rb")  # noqa: SIM115 - the caller closes it


# -- tables -------------------------------------------------------------------------------
class Table:
    """An open manifest table: its column names, and its rows on demand.

    Made by :func:`open_table`; valid inside its ``with`` block.

    Attributes:
        label: the file, for messages.
        columns: the file's column names, in file order.
    """

    def __init__(self, label: str, columns: list[str]):
        self.label = label
        self.columns = columns

    def rows(self, columns: Sequence[str]) -> Iterator[dict[str, str | None]]:
        """The rows in file order, each ``{column: text}`` for ``columns``.

        A column the file lacks is ``None`` in every row. Rows are read a block at a time.

        Raises:
            ManifestError: the file stops being readable part way through.
        """
        present = [c for c in dict.fromkeys(columns) if c in self.columns]
        for batch in self._batches(present):
            cells = [_texts(self.label, batch.column(c)) if c in present else None for c in columns]
            for i in range(batch.num_rows):
                yield {c: (v[i] if v is not None else None) for c, v in zip(columns, cells)}

    def _batches(self, columns: list[str]) -> Iterator[Any]:
        raise NotImplementedError


class _CsvTable(Table):
    def __init__(self, label: str, open_binary: Opener, stack: ExitStack):
        import pyarrow.csv as pacsv
        from pyarrow import ArrowInvalid

        self._open, self._stack, self._pacsv = open_binary, stack, pacsv
        with _csv_errors(label, open_binary):
            try:
                # A first look, for the names only: pyarrow reads one block to do it.
                with open_binary() as f:
                    names = list(pacsv.open_csv(f, read_options=self._read_options()).schema.names)
            except ArrowInvalid as e:
                if "Empty CSV file" not in str(e):
                    raise
                names = []  # as csv.DictReader saw it: no header, no columns
        super().__init__(label, names)

    def _read_options(self):
        # One thread: rows arrive in order and a parse error names its row.
        return self._pacsv.ReadOptions(use_threads=False)

    def _batches(self, columns: list[str]) -> Iterator[Any]:
        import pyarrow as pa

        if not self.columns:
            return
        # Only the asked-for columns are converted, each as text, whatever it looks like; with
        # none of them in the file, the first column still counts the rows (an empty list means all).
        include = columns or self.columns[:1]
        convert = self._pacsv.ConvertOptions(include_columns=include, column_types={c: pa.string() for c in include})
        f = self._stack.enter_context(self._open())  # closed with the table, however far it was read
        with _csv_errors(self.label, self._open):
            yield from self._pacsv.open_csv(f, read_options=self._read_options(), convert_options=convert)


class _ParquetTable(Table):
    def __init__(self, label: str, open_binary: Opener, stack: ExitStack):
        import pyarrow.parquet as pq

        f = stack.enter_context(open_binary())
        with _parquet_errors(label):
            self._file = pq.ParquetFile(f)
        super().__init__(label, list(self._file.schema_arrow.names))

    def _batches(self, columns: list[str]) -> Iterator[Any]:
        with _parquet_errors(self.label):
            yield from self._file.iter_batches(columns=columns)


@contextmanager
def open_table(path: str | Path, *, label: str | None = None, open_binary: Opener | None = None) -> Iterator[Table]:
    """Open a CSV or Parquet manifest for reading.

    Args:
        path: a local path or an fsspec URI; a name ending in a Parquet suffix
            (:data:`PARQUET_SUFFIXES`) is Parquet, any other is CSV.
        label: the file as messages name it; ``path`` by default.
        open_binary: opens the file for binary reading; by default :func:`opener` of ``path``.

    Yields:
        The :class:`Table`.

    Raises:
        ManifestError: the file cannot be opened or is not a readable table of its kind.
    """
    label = str(path) if label is None else label
    open_binary = open_binary or opener(path)
    parquet = str(path).lower().endswith(PARQUET_SUFFIXES)
    with ExitStack() as stack, storage_errors(label):
        yield (_ParquetTable if parquet else _CsvTable)(label, open_binary, stack)


def _texts(label: str, column: Any) -> list[str | None]:
    import pyarrow as pa

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.to_pylist()
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        out = []
        for v in column.to_pylist():
            try:
                out.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ManifestError(label, f"not UTF-8 text ({e.reason} in a cell)") from None
        return out
    # Numbers, booleans, dates: as str() writes them, so a Parquet label 1 is "1".
    return [None if v is None else str(v) for v in column.to_pylist()]


@contextmanager
def _csv_errors(label: str, open_binary: Opener) -> Iterator[None]:
    from pyarrow import ArrowException

    try:
        yield
    except ManifestError:
        raise
    except UnicodeDecodeError:  # a header that is not UTF-8
        raise ManifestError(label, f"not UTF-8 text ({_utf8_problem(open_binary)})") from None
    except ArrowException as e:
        text = first_line(e)
        if "invalid UTF8" in text:
            raise ManifestError(label, f"not UTF-8 text ({_utf8_problem(open_binary)})") from None
        # pyarrow counts rows as a spreadsheet does (the header is row 1).
        text = text.removeprefix("CSV parse error: ").replace("Row #", "row ", 1)
        raise ManifestError(label, f"not valid CSV ({text})") from None


@contextmanager
def _parquet_errors(label: str) -> Iterator[None]:
    from pyarrow import ArrowException

    try:
        yield
    except (ArrowException, OSError) as e:  # our own errors are neither, so they pass through
        raise ManifestError(label, f"not a readable Parquet file ({first_line(e)})") from None


def _utf8_problem(open_binary: Opener) -> str:
    """Where a file stops being UTF-8: ``"<reason> at byte N"`` (N counted from the file's start).

    Only on the error path: pyarrow says a column is not UTF-8 but not where.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes handed to the decoder so far
    try:
        with open_binary() as f:
            while True:
                chunk = f.read(1 << 20)
                # Error positions count from the bytes the decoder still held from the last chunk.
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    return f"{e.reason} at byte {offset - pending + e.start}"
                if not chunk:
                    return "invalid UTF-8"
                offset += len(chunk)
    except OSError as e:
        return first_line(e)
