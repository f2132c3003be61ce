"""Reading a committed vaepipe output in tests, the way a manifest-aware reader does."""
from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.table.commit import control_of
from pipeline.table.parquet_io import list_parquet_files, partition_values, read_manifest
from pipeline.table.uris import resolve


def manifest(uri: str, **so) -> dict:
    """The committed manifest of an output (a table, or one nightly partition)."""
    m = read_manifest(resolve(uri, **so))
    assert m is not None, f"{uri} is not committed"
    return m


def quarantine(uri: str, **so) -> pa.Table:
    """The records the committed run skipped (--on-bad-record skip), from the control folder."""
    loc = resolve(uri, **so)
    ctl = control_of(loc)
    with loc.fs.open(posixpath.join(ctl.path, manifest(uri, **so)["quarantine"]), "rb") as f:
        return pq.read_table(f)


def committed(uri: str, **so) -> pa.Table:
    """The committed rows of a vaepipe output on any fsspec store, in manifest order, with hive
    partition values from the file paths as string columns (as a hive reader adds them)."""
    loc = resolve(uri, **so)
    assert loc.fs.exists(posixpath.join(loc.path, "_SUCCESS")) or read_manifest(loc) is None and list_parquet_files(loc), \
        f"{uri} is not committed"
    tables = []
    for path in list_parquet_files(loc):
        with loc.fs.open(path, "rb") as fh:
            t = pq.read_table(fh)
        for k, v in partition_values(posixpath.relpath(path, loc.path)).items():
            t = t.append_column(k, pa.array([v] * t.num_rows, pa.string()))
        tables.append(t)
    return pa.concat_tables(tables)


def mu(t: pa.Table, col: str = "mu") -> np.ndarray:
    """A fixed_size_list latent column as a float32 (N, D) array."""
    c = t.column(col).combine_chunks()
    return c.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(c), c.type.list_size)
