"""Label columns for `train --labels COLUMN`: the class list (every distinct non-null value over the
whole input, read once, sorted) and each record's class index (-1 where the label is null: an
unlabelled record). Labels are integers or strings; the class list is stored in the model."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.runtime.errors import InputError, SchemaError
from pipeline.table.parquet_io import read_table
from pipeline.table.uris import Location


def check_label_column(schema: pa.Schema, column: str, features: list[str], source: str) -> None:
    """The column exists, is not a feature, and holds integers or strings."""
    if column not in schema.names:
        raise SchemaError(f"{source}: --labels column {column!r} not found; columns present: {schema.names}")
    if column in features:
        raise SchemaError(f"{source}: --labels column {column!r} is also a feature column")
    t = schema.field(column).type
    if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise SchemaError(f"{source}: --labels column {column!r} has type {t}; expected integers or strings "
                          f"(null where a record has no label)")


def read_classes(loc: Location, files: list[str], column: str, source: str) -> tuple[tuple, int]:
    """(sorted class list, labelled records) over every file of the input."""
    seen: set = set()
    labelled = 0
    for path in files:
        col = read_table(loc, path, [column]).column(column)
        labelled += len(col) - col.null_count
        seen.update(pc.unique(col.drop_null()).to_pylist())
    classes = tuple(sorted(seen))
    if len(classes) < 2:
        raise InputError(f"{source}: --labels column {column!r} has {len(classes)} distinct non-null value(s) "
                         f"{list(classes)} in {labelled} labelled record(s); a classifier needs at least 2 classes")
    return classes, labelled


def label_indices(table: pa.Table | pa.RecordBatch, column: str, classes: tuple) -> np.ndarray:
    """Class index of each record (N,) int64; -1 for a null label (or a value outside the class list,
    which only a separate --val-input can hold: validation uses no labels)."""
    idx = pc.index_in(table.column(column), value_set=pa.array(list(classes)))
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def prob_columns(classes: tuple) -> list[str]:
    """The served model's probability columns (pipeline.models.mlflow_model), one per class in class order:
    `pred_prob_<class>`."""
    return [f"pred_prob_{c}" for c in classes]
