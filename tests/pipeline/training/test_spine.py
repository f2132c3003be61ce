"""The spine on the real stack: Parquet → Ray Train → MLflow registry → Ray Data encode → query."""
from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.table.parquet_io import read_manifest
from pipeline.table.uris import resolve
from pipeline.batch.encode import EncodeConfig, run_encode
from pipeline.runtime.errors import ModelNotFoundError, SchemaError
from pipeline.search.query import QueryConfig, run_query
from pipeline.models.registry import client, current_alias_version


def test_train_registers_first_version_as_production(trained_digits, digits_parquet, workdir):
    tracking = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    assert trained_digits.version == "1" and trained_digits.promoted
    assert current_alias_version("digits", "production", tracking) == "1"
    run = client(tracking).get_run(trained_digits.run_id)
    # per-epoch metrics, params and lineage are all in the one MLflow run
    hist = client(tracking).get_metric_history(trained_digits.run_id, "val_neg_elbo")
    assert [m.step for m in hist] == [0, 1, 2]
    assert run.data.params["epochs"] == "3"
    assert run.data.tags["vaepipe.input_uri"] == digits_parquet          # the input this model was trained on
    assert run.info.status == "FINISHED"
    assert len(run.data.tags["vaepipe.data_fingerprint"]) == 16
    assert np.isfinite(trained_digits.metrics["val_neg_elbo"])


def test_encode_writes_standard_arrow_lists_with_ids_and_model_version(trained_digits, digits_parquet, workdir, tmp_path):
    out = str(tmp_path / "latents")
    r = run_encode(EncodeConfig(model="models:/digits@production", input=digits_parquet, output=out,
                                keep=["id", "label"], workdir=workdir))
    assert (r.rows_in, r.rows_out, r.skipped) == (1797, 1797, 0)
    files = sorted(glob.glob(os.path.join(out, "*.parquet")))
    t = pa.concat_tables(pq.read_table(f) for f in files)       # plain pyarrow, no Ray
    assert t.schema.field("mu").type == pa.list_(pa.float32(), 4)   # fixed_size_list<float32>[4]
    assert sorted(t.column("id").to_pylist()) == list(range(1797))   # every id once
    assert t.column("id").to_pylist() == list(range(1797))           # and in input order
    mu = t.column("mu").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    assert np.isfinite(mu).all()
    md = pq.read_schema(files[0]).metadata
    assert md[b"vaepipe.model_uri"] == b"models:/digits/1" and md[b"vaepipe.model_version"] == b"1"
    manifest = read_manifest(resolve(out))
    assert manifest["rows"] == 1797 and os.path.exists(os.path.join(out, "_SUCCESS"))


def test_encode_rejects_missing_alias_before_any_work(trained_digits, digits_parquet, workdir, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no alias 'staging'"):
        run_encode(EncodeConfig(model="models:/digits@staging", input=digits_parquet,
                                output=str(tmp_path / "o"), workdir=workdir))
    assert not os.path.exists(tmp_path / "o")


def test_encode_rejects_wrong_vector_length_naming_column(trained_digits, workdir, tmp_path):
    src = tmp_path / "short"
    src.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "image": pa.array([[0] * 10, [0] * 10], pa.list_(pa.uint8(), 10))}),
                   src / "a.parquet")
    with pytest.raises(SchemaError, match="'image' holds vectors of length 10, the model expects 64"):
        run_encode(EncodeConfig(model="models:/digits@production", input=str(src), output=str(tmp_path / "o"),
                                workdir=workdir))
    assert not os.path.exists(tmp_path / "o")


def test_encode_rejects_missing_and_non_numeric_columns(trained_digits, workdir, tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    pq.write_table(pa.table({"id": [1], "pixels": pa.array([[0] * 64], pa.list_(pa.uint8()))}), src / "a.parquet")
    with pytest.raises(SchemaError, match=r"feature column\(s\) \['image'\] not found"):
        run_encode(EncodeConfig(model="models:/digits@production", input=str(src), output=str(tmp_path / "o"),
                                workdir=workdir))
    src2 = tmp_path / "strings"
    src2.mkdir()
    pq.write_table(pa.table({"id": [1], "image": pa.array([["a"] * 64], pa.list_(pa.string()))}), src2 / "a.parquet")
    with pytest.raises(SchemaError, match="list of string, expected a list of numbers"):
        run_encode(EncodeConfig(model="models:/digits@production", input=str(src2), output=str(tmp_path / "o2"),
                                workdir=workdir))


def test_query_finds_neighbours_by_id_and_vector(trained_digits, digits_parquet, workdir, tmp_path):
    out = str(tmp_path / "latents")
    run_encode(EncodeConfig(model="models:/digits@production", input=digits_parquet, output=out,
                            keep=["id", "label"], workdir=workdir))
    by_id = run_query(QueryConfig(latents=out, id=["7"], k=3))
    assert by_id.num_rows == 3 and 7 not in by_id.column("id").to_pylist()
    d = by_id.column("distance").to_pylist()
    assert d == sorted(d)
    # the neighbours of a record's own μ start with the record itself at distance 0
    t = pq.read_table(out)
    mu7 = t.filter(pa.compute.equal(t["id"], 7)).column("mu")[0].as_py()
    by_vec = run_query(QueryConfig(latents=out, vector=mu7, k=1))
    assert by_vec.column("id").to_pylist() == [7] and by_vec.column("distance")[0].as_py() == pytest.approx(0, abs=1e-6)
    filtered = run_query(QueryConfig(latents=out, id=["7"], k=5, where="label = 3"))
    assert set(filtered.column("label").to_pylist()) == {3}
