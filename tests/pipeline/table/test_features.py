"""Arrow feature columns → (N, D) matrices, and errors that name the column and the record."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runtime.errors import BadRecordError, SchemaError
from pipeline.table.features import check_finite, fixed_size_list, infer_spec, nonfinite_rows, to_matrix


def images(n: int = 6, d: int = 4) -> tuple[pa.Table, np.ndarray]:
    x = np.arange(n * d, dtype=np.uint8).reshape(n, d)
    t = pa.table({"id": pa.array(range(100, 100 + n)),
                  "image": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.uint8()), d)})
    return t, x


def vectors(rows: list) -> pa.Table:
    return pa.table({"id": pa.array([f"r{i}" for i in range(len(rows))]),
                     "vec": pa.array(rows, type=pa.list_(pa.float64()))})


# --- layouts ----------------------------------------------------------------------------------------

def test_fixed_size_list_of_uint8():
    t, x = images()
    spec = infer_spec(t.schema, ["image"])
    assert (spec.columns, spec.layout, spec.dim) == (("image",), "list", 4)
    m = to_matrix(t, spec, dim=4)
    assert m.dtype == np.float32 and m.shape == (6, 4)
    np.testing.assert_array_equal(m, x.astype(np.float32))


def test_variable_list_of_float64():
    rows = [[0.5, 1.5, 2.5], [3.0, 4.0, 5.0]]
    t = vectors(rows)
    spec = infer_spec(t.schema, ["vec"])
    assert (spec.layout, spec.dim) == ("list", None)               # length only known from the data
    np.testing.assert_array_equal(to_matrix(t, spec), np.array(rows, np.float32))
    np.testing.assert_array_equal(to_matrix(t, spec, dim=3, dtype=np.float64), np.array(rows))


def test_large_list_column_is_a_list_feature():
    t = pa.table({"vec": pa.array([[1.0, 2.0]], type=pa.large_list(pa.float32()))})
    spec = infer_spec(t.schema, ["vec"])
    np.testing.assert_array_equal(to_matrix(t, spec), [[1.0, 2.0]])


def test_several_numeric_scalar_columns():
    t = pa.table({"id": [1, 2, 3], "a": pa.array([1, 2, 3], pa.int64()), "b": pa.array([0.5, 1.5, 2.5], pa.float32()),
                  "c": pa.array([True, False, True])})
    spec = infer_spec(t.schema, ["a", "b", "c"])
    assert (spec.columns, spec.layout, spec.dim) == (("a", "b", "c"), "scalars", 3)
    m = to_matrix(t, spec, dim=3)
    np.testing.assert_array_equal(m, np.array([[1, 0.5, 1], [2, 1.5, 0], [3, 2.5, 1]], np.float32))
    with pytest.raises(SchemaError, match="3 feature columns .* the model expects 4"):
        to_matrix(t, spec, dim=4)


# --- schema errors ----------------------------------------------------------------------------------

def test_wrong_vector_length_names_column_and_record():
    t = vectors([[1.0, 2.0, 3.0], [1.0, 2.0], [1.0, 2.0, 3.0], [1.0]])
    spec = infer_spec(t.schema, ["vec"])
    with pytest.raises(SchemaError, match=r"'vec'.*length \[1, 2\], expected 3.*2 record\(s\).*id='r1', id='r3'"):
        to_matrix(t, spec, id_column="id", source="in.parquet")
    # against the model's size, every record is named by its id
    ok = vectors([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(SchemaError, match=r"in\.parquet: column 'vec'.*expected 3.*id='r0', id='r1'"):
        to_matrix(ok, spec, dim=3, id_column="id", source="in.parquet")


def test_wrong_fixed_size_names_column_and_model_size():
    t, _ = images(d=4)
    with pytest.raises(SchemaError, match="column 'image' holds vectors of length 4, the model expects 784"):
        to_matrix(t, infer_spec(t.schema, ["image"]), dim=784)


def test_records_without_an_id_column_are_named_by_row():
    t = pa.table({"vec": pa.array([[1.0], [1.0, 2.0]])})
    with pytest.raises(SchemaError, match="row 1"):
        to_matrix(t, infer_spec(t.schema, ["vec"]), id_column="id")


def test_nan_raises_bad_record_error_naming_the_id():
    t = pa.table({"id": [7, 8, 9], "vec": pa.array([[1.0, 2.0], [float("nan"), 0.0], [0.0, float("inf")]])})
    x = to_matrix(t, infer_spec(t.schema, ["vec"]))
    assert nonfinite_rows(x).tolist() == [False, True, True]
    with pytest.raises(BadRecordError, match=r"src: NaN or inf features in 2 record\(s\), e\.g\. id=8, id=9"):
        check_finite(t, x, "id", "src")
    check_finite(t.slice(0, 1), x[:1], "id", "src")                # finite records pass


def test_null_values_and_vectors_raise_bad_record_error_naming_the_id():
    t = pa.table({"id": [1, 2], "vec": pa.array([[1.0, None], [2.0, 3.0]])})
    with pytest.raises(BadRecordError, match=r"null value inside vectors of column 'vec'.*id=1"):
        to_matrix(t, infer_spec(t.schema, ["vec"]), id_column="id")
    t = pa.table({"id": [1, 2], "vec": pa.array([[1.0, 2.0], None])})
    with pytest.raises(BadRecordError, match=r"null vector in column 'vec'.*id=2"):
        to_matrix(t, infer_spec(t.schema, ["vec"]), id_column="id")
    t = pa.table({"id": [1, 2], "a": [None, 1.0]})
    with pytest.raises(BadRecordError, match=r"null in column 'a'.*id=1"):
        to_matrix(t, infer_spec(t.schema, ["a"]), id_column="id")


@pytest.mark.parametrize("table,columns,match", [
    (pa.table({"name": ["x"], "a": [1.0]}), ["a", "name"], r"must be numeric.*'name': 'string'"),
    (pa.table({"tags": pa.array([["x"]])}), ["tags"], r"list of string, expected a list of numbers"),
    (pa.table({"v": pa.array([[1.0]]), "a": [1.0]}), ["v", "a"], r"must be the only feature column"),
    (pa.table({"a": [1.0]}), [], r"no feature columns given"),
], ids=["string-column", "list-of-strings", "list-plus-scalar", "no-columns"])
def test_unusable_columns_are_schema_errors_in_infer_spec(table, columns, match):
    with pytest.raises(SchemaError, match=match):
        infer_spec(table.schema, columns, source="in.parquet")


def test_missing_column_lists_the_columns_present():
    t, _ = images()
    with pytest.raises(SchemaError, match=r"in\.parquet: feature column\(s\) \['pixels'\] not found; "
                                          r"columns present: \['id', 'image'\]"):
        infer_spec(t.schema, ["pixels"], source="in.parquet")


# --- slicing and chunking ---------------------------------------------------------------------------

def test_sliced_fixed_size_list_respects_offsets():
    t, x = images(n=10, d=4)
    part = t.slice(3, 4)
    np.testing.assert_array_equal(to_matrix(part, infer_spec(t.schema, ["image"]), dim=4), x[3:7])


def test_sliced_variable_list_respects_offsets():
    rows = np.random.randn(10, 3)
    t = vectors(rows.tolist())
    spec = infer_spec(t.schema, ["vec"])
    np.testing.assert_allclose(to_matrix(t.slice(5), spec, dim=3), rows[5:].astype(np.float32))
    np.testing.assert_allclose(to_matrix(t.slice(2, 3), spec, dim=3), rows[2:5].astype(np.float32))


def test_sliced_table_reports_ids_of_the_slice():
    t = pa.table({"id": list(range(10)), "vec": pa.array([[1.0, 2.0]] * 6 + [[1.0]] + [[1.0, 2.0]] * 3)})
    with pytest.raises(SchemaError, match=r"id=6\b"):
        to_matrix(t.slice(4, 5), infer_spec(t.schema, ["vec"]), dim=2, id_column="id")


def test_sliced_scalar_columns_respect_offsets():
    t = pa.table({"a": np.arange(10.0), "b": np.arange(10, 20)})
    m = to_matrix(t.slice(7), infer_spec(t.schema, ["a", "b"]))
    np.testing.assert_array_equal(m, [[7, 17], [8, 18], [9, 19]])


def test_multi_chunk_tables_and_record_batches():
    t, x = images(n=6)
    chunked = pa.concat_tables([t.slice(0, 2), t.slice(2, 4)])
    assert chunked.column("image").num_chunks == 2
    spec = infer_spec(t.schema, ["image"])
    np.testing.assert_array_equal(to_matrix(chunked.slice(1, 3), spec), x[1:4])  # a slice across chunks
    batch = t.to_batches()[0].slice(2, 2)
    np.testing.assert_array_equal(to_matrix(batch, spec), x[2:4])


# --- writing vectors --------------------------------------------------------------------------------

def test_fixed_size_list_writes_standard_arrow_float32_vectors(tmp_path):
    x = np.random.randn(5, 3)                                       # float64 in
    arr = fixed_size_list(x)
    assert arr.type == pa.list_(pa.float32(), 3)                    # plain Arrow, not a Ray extension type
    path = tmp_path / "mu.parquet"
    pq.write_table(pa.table({"mu": arr}), path)
    back = pq.read_table(path)
    assert back.schema.field("mu").type == pa.list_(pa.float32(), 3)
    np.testing.assert_array_equal(to_matrix(back, infer_spec(back.schema, ["mu"]), dim=3), x.astype(np.float32))


def test_fixed_size_list_handles_non_contiguous_input_and_other_types():
    x = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]       # a strided view
    arr = fixed_size_list(x, pa.float16())
    assert arr.type == pa.list_(pa.float16(), 3)
    assert arr.to_pylist() == x.tolist()


def test_feature_dtypes_as_stored():
    from pipeline.table.features import feature_dtypes

    schema = pa.schema([("image", pa.list_(pa.uint8(), 4)), ("a", pa.float64()), ("b", pa.int16()),
                        ("c", pa.decimal128(5, 2)), ("d", pa.float32())])
    assert feature_dtypes(schema, infer_spec(schema, ["image"])) == ["uint8"]
    assert feature_dtypes(schema, infer_spec(schema, ["a", "b", "c", "d"])) == ["float64", "int16", "float64", "float32"]

def test_train_val_split_and_per_record_noise_share_one_record_hash():
    import subprocess
    import sys

    import torch

    from pipeline.table.features import content_split_mask
    from vae.distributions import record_keys
    from vae.hashing import record_hash

    x = np.random.default_rng(0).random((5000, 64)).astype(np.float32)
    assert np.array_equal(record_keys(torch.from_numpy(x)), record_hash(x))        # one hash, two uses
    m = content_split_mask(x, 0.1)
    assert 0.08 < m.mean() < 0.12
    assert np.array_equal(content_split_mask(x[::-1], 0.1), m[::-1])                 # order-free
    assert np.array_equal(content_split_mask(x[1000:2000], 0.1), m[1000:2000])       # batch-free
    # Ray Data tasks run the split: importing it must not import torch
    code = "import sys, pipeline.table.features; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
