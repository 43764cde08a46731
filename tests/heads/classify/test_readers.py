"""The README's one-liners that read a classification folder, run as written, with pandas, pyarrow, DuckDB and polars.

The folder is a real job's output: ``_JOB.json``, ``_SUCCESS.json``, monitoring sidecars and a
damaged shard the resumed job set aside (``.vtp-<job id>.part-00001.parquet.damaged-*``).
Each one-liner must give every row, in input order, with the shards' values. Polars reads
a folder only when every file in it is Parquet, and DuckDB reads no folder: both take the
shard glob.
"""

# ruff: noqa: F811  (fixtures imported from a sibling test module are redefined as arguments)
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heads.classify.output import SHARD_GLOB, shard_provenance
from tests.heads.classify.test_engine import ROWS_PER_SHARD, bank, inputs, release, run  # noqa: F401  (fixtures)

# Exactly the README's lines ("{out}" is the output folder); each leaves its result in ``df``.
ONE_LINERS = {
    "pandas": 'import pandas as pd; df = pd.read_parquet("{out}")',
    "pyarrow": 'import pyarrow.parquet as pq; df = pq.read_table("{out}")',
    "duckdb": 'import duckdb; df = duckdb.sql("SELECT * FROM \'{out}/part-*.parquet\'").df()',
    "polars": 'import polars as pl; df = pl.read_parquet("{out}/part-*.parquet")',
}


def _as_arrow(df) -> pa.Table:
    if isinstance(df, pa.Table):
        return df
    if hasattr(df, "to_arrow"):  # polars
        return df.to_arrow()
    return pa.Table.from_pandas(df, preserve_index=False)  # pandas (DuckDB's .df() too)


@pytest.fixture
def folder(tmp_path, tiny_trunk, bank, inputs, release):
    out = tmp_path / "predictions"
    run(tiny_trunk, bank, inputs, out, release)
    # As a killed-and-resumed job leaves it: a damaged shard set aside beside the good ones.
    shard = out / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    (out / "_SUCCESS.json").unlink()
    run(tiny_trunk, bank, inputs, out, release)
    names = {p.name for p in out.iterdir()}
    assert {"_JOB.json", "_SUCCESS.json", "_MONITOR.safetensors", "_part-00000.monitor.safetensors"} <= names
    assert any(n.startswith(".vtp-") and ".damaged-" in n for n in names)
    return out


def test_the_readme_one_liners_read_every_row_in_input_order(folder, inputs):
    expected = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob(SHARD_GLOB))])
    assert expected.num_rows == len(inputs) and len(list(folder.glob(SHARD_GLOB))) == -(-len(inputs) // ROWS_PER_SHARD)
    for reader, line in ONE_LINERS.items():
        scope: dict = {}
        exec(line.format(out=folder), scope)  # noqa: S102  (our own README line)
        got = _as_arrow(scope["df"])
        assert got.column_names == expected.column_names, reader
        for name in expected.column_names:
            assert got.column(name).to_pylist() == expected.column(name).to_pylist(), (reader, name)
        assert got.column("path").to_pylist() == inputs, reader

    # A shard says which job and rows it holds, read on its own (the key travels with Arrow's table too).
    assert b"vtp.provenance" in pq.read_table(folder / "part-00000.parquet").schema.metadata
    got = [shard_provenance(p) for p in sorted(folder.glob(SHARD_GLOB))]
    assert [g["shard"]["first_row"] for g in got] == list(range(0, len(inputs), ROWS_PER_SHARD))
    assert len({g["job"]["fingerprint"] for g in got}) == 1
