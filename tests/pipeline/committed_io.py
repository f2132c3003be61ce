"""Reading a committed vaepipe output in tests, the way a manifest-aware reader does."""
from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.parquet_io import read_manifest
from pipeline.uris import resolve


def committed(uri: str, **so) -> pa.Table:
    """The committed rows of a vaepipe output on any fsspec store, in manifest order."""
    loc = resolve(uri, **so)
    m = read_manifest(loc)
    assert m is not None and loc.fs.exists(posixpath.join(loc.path, "_SUCCESS")), f"{uri} is not committed"
    tables = []
    for f in m["files"]:
        with loc.fs.open(posixpath.join(loc.path, f["path"]), "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)


def mu(t: pa.Table, col: str = "mu") -> np.ndarray:
    """A fixed_size_list latent column as a float32 (N, D) array."""
    c = t.column(col).combine_chunks()
    return c.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(c), c.type.list_size)
