"""Arrow columns → a (N, D) numpy matrix with no per-row Python work, and the checks that make bad
input fail with a message naming the file, column and record."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.runtime.errors import BadRecordError, SchemaError
from vae.hashing import record_hash, splitmix64


@dataclass(frozen=True)
class FeatureSpec:
    columns: tuple[str, ...]
    layout: str          # 'list': one list column; 'scalars': one numeric column per feature
    dim: int | None = None


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)


def infer_spec(schema: pa.Schema, columns: list[str], source: str = "input") -> FeatureSpec:
    """One list column, or several numeric scalar columns; anything else is a SchemaError."""
    if not columns:
        raise SchemaError(f"{source}: no feature columns given (--features)")
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise SchemaError(f"{source}: feature column(s) {missing} not found; columns present: {schema.names}")
    types = {c: schema.field(c).type for c in columns}
    lists = [c for c, t in types.items() if pa.types.is_list(t) or pa.types.is_large_list(t)
             or pa.types.is_fixed_size_list(t)]
    if lists:
        if len(columns) != 1:
            raise SchemaError(f"{source}: a list feature column ({lists[0]!r}) must be the only feature "
                              f"column, got {columns}")
        c, t = columns[0], types[columns[0]]
        if not _is_numeric(t.value_type):
            raise SchemaError(f"{source}: column {c!r} is a list of {t.value_type}, expected a list of numbers")
        dim = t.list_size if pa.types.is_fixed_size_list(t) else None
        return FeatureSpec((c,), "list", dim)
    bad = {c: str(t) for c, t in types.items() if not _is_numeric(t)}
    if bad:
        raise SchemaError(f"{source}: feature column(s) must be numeric or a list of numbers; got {bad}")
    return FeatureSpec(tuple(columns), "scalars", len(columns))


def to_matrix(table: pa.Table | pa.RecordBatch, spec: FeatureSpec, dim: int | None = None,
              source: str = "input", id_column: str | None = None, dtype=np.float32) -> np.ndarray:
    """Feature matrix (N, D) of `dtype`. `dim` (the model's input size) is checked when given.
    Null vectors, null values and wrong lengths raise SchemaError/BadRecordError naming the record."""
    n = table.num_rows
    if spec.layout == "scalars":
        cols = []
        for c in spec.columns:
            col = table.column(c)
            if col.null_count:
                _raise_bad(table, np.asarray(col.is_null()), id_column, source, f"null in column {c!r}")
            cols.append(np.asarray(col.to_numpy(zero_copy_only=False), dtype=dtype))
        x = np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype)
        if dim is not None and x.shape[1] != dim:
            raise SchemaError(f"{source}: {x.shape[1]} feature columns {list(spec.columns)}, the model expects {dim}")
        return x
    c = spec.columns[0]
    col = table.column(c)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if col.null_count:
        _raise_bad(table, np.asarray(col.is_null()), id_column, source, f"null vector in column {c!r}")
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
    else:
        lengths = np.asarray(pc.list_value_length(col), dtype=np.int64)
        width = int(lengths[0]) if n else (dim or 0)
        wrong = lengths != (dim if dim is not None else width)
        if wrong.any():
            want = dim if dim is not None else width
            _raise_bad(table, wrong, id_column, source,
                       f"column {c!r} holds vectors of length {sorted(set(lengths[wrong].tolist()))[:5]}, expected {want}",
                       exc=SchemaError)
    if dim is not None and width != dim:
        raise SchemaError(f"{source}: column {c!r} holds vectors of length {width}, the model expects {dim}")
    values = col.flatten()  # respects slicing offsets; one contiguous child array
    if values.null_count:
        flat = np.asarray(values.is_null()).reshape(n, width).any(1)
        _raise_bad(table, flat, id_column, source, f"null value inside vectors of column {c!r}")
    x = values.to_numpy(zero_copy_only=False)
    if x.dtype != dtype:
        x = x.astype(dtype)
    return x.reshape(n, width)


def raw_dtype(schema: pa.Schema, spec: FeatureSpec) -> type:
    """The dtype records are handed to the model in. Integer vectors (uint8 images) stay integers:
    the model's scaler casts them on the way in, so there is no float32 copy in numpy and no NaN
    scan (integers cannot hold one), and 4× less to move to a GPU. Anything else becomes float32."""
    if spec.layout == "list":
        vt = schema.field(spec.columns[0]).type.value_type
        if vt in (pa.uint8(), pa.int8(), pa.int16(), pa.int32(), pa.int64()):
            return vt.to_pandas_dtype()
    return np.float32


def feature_dtypes(schema: pa.Schema, spec: FeatureSpec) -> list[str]:
    """numpy dtype names of the feature columns as stored (a list column: its value type), recorded in
    the model's preprocessing so that its MLflow signature accepts what training read. Decimals read
    as float64."""
    out = []
    for c in spec.columns:
        t = schema.field(c).type
        if spec.layout == "list":
            t = t.value_type
        out.append("float64" if pa.types.is_decimal(t) else str(np.dtype(t.to_pandas_dtype())))
    return out


def nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Boolean mask (N,) of records holding NaN or ±inf."""
    if np.issubdtype(x.dtype, np.integer):
        return np.zeros(x.shape[0], bool)
    return ~np.isfinite(x).all(axis=1)


def record_names(table: pa.Table | pa.RecordBatch, mask: np.ndarray, id_column: str | None, limit: int = 5) -> list[str]:
    rows = np.flatnonzero(mask)[:limit]
    if id_column and id_column in table.schema.names:
        ids = table.column(id_column).take(pa.array(rows)).to_pylist()
        return [f"{id_column}={v!r}" for v in ids]
    return [f"row {int(r)}" for r in rows]


def _raise_bad(table, mask, id_column, source, what, exc=BadRecordError):
    n = int(np.count_nonzero(mask))
    raise exc(f"{source}: {what} in {n} record(s), e.g. {', '.join(record_names(table, mask, id_column))}")


def check_finite(table, x: np.ndarray, id_column: str | None, source: str) -> None:
    bad = nonfinite_rows(x)
    if bad.any():
        _raise_bad(table, bad, id_column, source, "NaN or inf features")


def fixed_size_list(x: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.FixedSizeListArray:
    """(N, D) numpy → standard Arrow fixed_size_list<value_type>[D] (not Ray's tensor extension)."""
    x = np.ascontiguousarray(x)
    flat = pa.array(x.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, x.shape[1])


def content_split_mask(x: np.ndarray, fraction: float, salt: int = 0) -> np.ndarray:
    """Stable pseudo-random split by record content: True for about `fraction` of records. The same
    record always lands on the same side, whatever the file layout or order (vae.hashing's key)."""
    h = splitmix64(record_hash(x) ^ splitmix64(np.array([12345 + salt], dtype=np.uint64)))
    return (h % np.uint64(1_000_000)) < np.uint64(int(fraction * 1_000_000))


def split_table(batch: pa.Table, spec: FeatureSpec, fraction: float, want_val: bool,
                labels: str | None = None) -> pa.Table:
    """The validation (or training) side of a batch, by `content_split_mask`. With `labels` (the
    `train --labels` column), a labelled record always stays on the training side: validation uses
    no labels, and with a few labels every one of them counts. It lives here, not in pipeline.training.train,
    so the Ray Data tasks that run it need pyarrow and numpy only, not torch."""
    x = to_matrix(batch, spec, source="input")
    mask = content_split_mask(x, fraction)
    if labels is not None:
        mask &= batch.column(labels).is_null().to_numpy(zero_copy_only=False)
    return batch.filter(pa.array(mask if want_val else ~mask))
