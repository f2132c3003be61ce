"""What users read an output folder with, none of it vaepipe: each returns the ids it sees."""
from __future__ import annotations

import os

import pyarrow.parquet as pq

from pipeline.table.parquet_io import list_parquet_files
from pipeline.table.uris import resolve


def manifest_ids(out: str) -> list:
    """The committed rows, through the manifest(s): what every reader must return."""
    return sorted(v for p in list_parquet_files(resolve(out)) for v in pq.read_table(p, columns=["id"]).column("id").to_pylist())


def duckdb_ids(out: str) -> list:
    import duckdb

    return sorted(r[0] for r in duckdb.sql(f"SELECT id FROM read_parquet('{out}/**/*.parquet')").fetchall())


def pyarrow_ids(out: str) -> list:
    import pyarrow.dataset as ds

    return sorted(ds.dataset(out, partitioning="hive").to_table(columns=["id"]).column("id").to_pylist())


def polars_ids(out: str) -> list:
    import polars as pl

    return sorted(pl.scan_parquet(out).select("id").collect()["id"].to_list())


def pandas_ids(out: str) -> list:
    import pandas as pd

    return sorted(pd.read_parquet(out, columns=["id"])["id"].tolist())


def stray_files(out: str) -> list[str]:
    """Anything under OUT that is neither a data file nor `_SUCCESS` (a staged part, a manifest)."""
    return [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if not (f.endswith(".parquet") or f == "_SUCCESS")]


READERS = {"duckdb": duckdb_ids, "pyarrow": pyarrow_ids, "polars": polars_ids, "pandas": pandas_ids}


def assert_readers_agree(out: str, expected_rows: int | None = None) -> list:
    """DuckDB's recursive glob, pyarrow.dataset(hive), Polars and pandas on the folder all return
    exactly the manifest's rows, each id once; no staging part is left anywhere under OUT."""
    want = manifest_ids(out)
    assert len(want) == len(set(want)), "duplicate ids in the committed rows"
    if expected_rows is not None:
        assert len(want) == expected_rows
    for name, read in READERS.items():
        got = read(out)
        assert got == want, f"{name} reads {len(got)} rows ({len(got) - len(set(got))} duplicate ids), manifest has {len(want)}"
    leftovers = stray_files(out)
    assert not leftovers, f"non-data files inside the output: {leftovers}"
    return want


def partition_types(out: str) -> dict[str, str]:
    """How each reader types the hive partition column(s): they may differ, but none may fail."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    d = ds.dataset(out, partitioning="hive")
    return {"pyarrow": str(d.schema.field(d.schema.names[-1]).type),
            "duckdb": str(duckdb.sql(f"SELECT * FROM read_parquet('{out}/**/*.parquet') LIMIT 0").types[-1]),
            "polars": str(pl.scan_parquet(out).collect_schema().dtypes()[-1]),
            "pandas": str(pd.read_parquet(out).dtypes.iloc[-1])}
