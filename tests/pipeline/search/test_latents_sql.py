"""Querying a committed encode output without vaepipe, as docs/outputs.md shows: DuckDB SQL (k-NN by id,
filter + k-NN), Polars and pandas, each reading the files the manifest lists. DuckDB reads `mu` as
FLOAT[] (Parquet has no fixed-size list), so array_distance needs the cast mu::FLOAT[D]. The k-NN
results equal `vaepipe query`'s."""
from __future__ import annotations

import json
import os

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pytest

from pipeline.batch.encode import EncodeConfig, run_encode
from pipeline.search.query import QueryConfig, run_query

MODEL = "models:/digits@production"
LATENT_DIM = 4      # the session's digits model (tests/conftest.py)

# The SQL of docs/outputs.md, verbatim apart from D = 4.
KNN_BY_ID = """
WITH q AS (SELECT mu::FLOAT[4] AS v FROM read_parquet($files) WHERE id = $id)
SELECT id, label, array_distance(t.mu::FLOAT[4], q.v) AS distance
FROM read_parquet($files) t, q
WHERE t.id != $id
ORDER BY distance
LIMIT 5
"""
FILTER_KNN = """
WITH q AS (SELECT mu::FLOAT[4] AS v FROM read_parquet($files) WHERE id = $id)
SELECT id, label, array_distance(t.mu::FLOAT[4], q.v) AS distance
FROM read_parquet($files) t, q
WHERE t.label = 3 AND t.id != $id
ORDER BY distance
LIMIT 5
"""


def committed_files(out: str) -> list[str]:
    """The files of the committed run, from the manifest in the control folder (what docs/outputs.md does)."""
    parent, name = os.path.split(out.rstrip("/"))
    with open(os.path.join(parent, f"_{name}.vaepipe", "manifest.json")) as f:
        return [os.path.join(out, e["path"]) for e in json.load(f)["files"]]


@pytest.fixture(scope="module")
def latents(trained_digits, digits_parquet, workdir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sql") / "latents")
    run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=out, keep=["id", "label"], concurrency=1,
                            workdir=workdir))
    return out


def _vaepipe(latents: str, workdir: str, qid: int, where: str | None = None) -> list[tuple[int, float]]:
    t = run_query(QueryConfig(latents=latents, id=[str(qid)], k=5, where=where, workdir=workdir))
    return [(r["id"], r["distance"]) for r in t.to_pylist()]


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([d for _, d in got], [d for _, d in want], rtol=1e-5, atol=1e-6)


def test_duckdb_reads_mu_as_a_variable_list(latents):
    rows = duckdb.execute("DESCRIBE SELECT * FROM read_parquet($files)", {"files": committed_files(latents)}).fetchall()
    assert {r[0]: r[1] for r in rows}["mu"] == "FLOAT[]"      # hence the cast to FLOAT[4] before array_distance


def test_duckdb_knn_by_id_equals_vaepipe_query(latents, workdir):
    con = duckdb.connect()
    got = con.execute(KNN_BY_ID, {"files": committed_files(latents), "id": 7}).fetchall()
    _same([(i, d) for i, _, d in got], _vaepipe(latents, workdir, 7))


def test_duckdb_filter_then_knn_equals_vaepipe_query(latents, workdir):
    con = duckdb.connect()
    got = con.execute(FILTER_KNN, {"files": committed_files(latents), "id": 7}).fetchall()
    assert {label for _, label, _ in got} == {3}
    _same([(i, d) for i, _, d in got], _vaepipe(latents, workdir, 7, where="label = 3"))


def test_polars_knn_equals_vaepipe_query(latents, workdir):
    df = pl.read_parquet(committed_files(latents))
    assert df.schema["mu"] == pl.Array(pl.Float32, LATENT_DIM)   # Polars keeps the fixed size
    x = df["mu"].to_numpy()                                        # (N, D) float32
    q = df.filter(pl.col("id") == 7)["mu"].to_numpy()[0]
    got = (df.with_columns(distance=pl.Series(np.linalg.norm(x - q, axis=1)))
             .filter(pl.col("id") != 7).sort("distance").head(5))
    _same(list(zip(got["id"].to_list(), got["distance"].to_list())), _vaepipe(latents, workdir, 7))


def test_pandas_knn_equals_vaepipe_query(latents, workdir):
    df = pd.read_parquet(committed_files(latents))
    x = np.stack(df["mu"].to_numpy())                              # a column of arrays → (N, D)
    q = x[(df["id"] == 7).to_numpy()][0]
    df["distance"] = np.linalg.norm(x - q, axis=1)
    got = df[df["id"] != 7].nsmallest(5, "distance")
    _same(list(zip(got["id"].tolist(), got["distance"].tolist())), _vaepipe(latents, workdir, 7))
