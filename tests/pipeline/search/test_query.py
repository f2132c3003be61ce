"""`vaepipe query` against the real DuckDB (brute-force SQL, `array_distance`) and numpy, on a latents
folder committed through pipeline.table.parquet_io.Commit (staging → manifest), as encode writes it; and
the query path's promise to stay light (no torch, Ray, MLflow or pandas import)."""
from __future__ import annotations

import json
import os
import posixpath
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.runtime.errors import ConfigError, InputError, SchemaError
from pipeline.search.knn import BlockSearch, exact_sq
from pipeline.table.parquet_io import Commit, list_parquet_files
from pipeline.search.query import QueryConfig, run_query
from pipeline.table.uris import resolve

duckdb = pytest.importorskip("duckdb")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def write_latents(folder: str, x: np.ndarray, ids, labels=None, files: int = 3, row_group: int = 1000,
                  mu_type=None) -> str:
    """A committed latents folder: parts staged, then Commit (manifest + _SUCCESS)."""
    loc = resolve(folder)
    c = Commit(loc)
    staged = []
    bounds = np.linspace(0, len(x), files + 1).astype(int)
    ids = pa.array(ids)
    for i in range(files):
        lo, hi = bounds[i], bounds[i + 1]
        cols = {"id": ids[lo:hi]}
        if labels is not None:
            cols["label"] = pa.array(labels[lo:hi], pa.int64())
        vals = pa.array(x[lo:hi].ravel(), mu_type or pa.float32())
        cols["mu"] = pa.FixedSizeListArray.from_arrays(vals, x.shape[1])
        path = c.staged_path(f"unit-{i}.parquet")
        loc.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        pq.write_table(pa.table(cols), path, row_group_size=row_group, compression="zstd")
        staged.append((path, hi - lo))
    c.commit(staged, {"vaepipe.latent_dim": str(x.shape[1])})
    return folder


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    rng = np.random.default_rng(7)
    n, d = 12_000, 16
    x = rng.standard_normal((n, d), dtype=np.float32)
    ids = rng.permutation(n).astype(np.int64) * 3 + 100     # unordered, not row numbers
    folder = write_latents(str(tmp_path_factory.mktemp("lat") / "latents"), x, ids, labels=ids % 10)
    return folder, x, ids


def duck(folder: str, qid, k: int, where: str = "", dim: int = 16):
    files = list_parquet_files(resolve(folder))
    con = duckdb.connect()
    return con.execute(f"""
        WITH t AS (SELECT id, label, mu::FLOAT[{dim}] AS mu FROM read_parquet($files))
        SELECT id, array_distance(mu, (SELECT mu FROM t WHERE id = $qid LIMIT 1)) AS d
        FROM t WHERE id != $qid {('AND ' + where) if where else ''} ORDER BY d, id LIMIT {k}""",
                       {"files": files, "qid": qid}).fetchall()


def answers(t: pa.Table, query: str):
    return [(r["id"], r["distance"]) for r in t.to_pylist() if r["query"] == query]


def test_query_equals_duckdb_brute_force_for_many_ids_in_one_pass(latents):
    folder, x, ids = latents
    qids = [int(v) for v in ids[[0, 5, 4_000, 11_999, 7_777]]]
    t = run_query(QueryConfig(latents=folder, id=[str(q) for q in qids], k=10))
    assert t.num_rows == 50 and t.column_names[:3] == ["query", "rank", "distance"]
    for q in qids:
        # same ids, same distances bit for bit (float32, summed in dimension order like DuckDB)
        assert answers(t, str(q)) == duck(folder, q, 10)


def test_ids_file_and_repeated_ids_give_the_same_answer(latents, tmp_path):
    folder, _, ids = latents
    qids = [str(int(v)) for v in ids[[3, 9, 3_333]]]
    f = tmp_path / "ids.txt"
    f.write_text("# query ids\n" + "\n".join(qids) + "\n\n")
    a = run_query(QueryConfig(latents=folder, ids_file=str(f), k=7))
    b = run_query(QueryConfig(latents=folder, id=qids + [qids[0]], k=7))   # a duplicate is asked once
    assert a.equals(b) and a.num_rows == 21
    pq.write_table(pa.table({"id": pa.array([int(q) for q in qids])}), tmp_path / "ids.parquet")
    assert run_query(QueryConfig(latents=folder, ids_file=str(tmp_path / "ids.parquet"), k=7)).equals(a)


def test_where_filter_matches_duckdb(latents):
    folder, _, ids = latents
    q = int(ids[10])
    t = run_query(QueryConfig(latents=folder, id=[str(q)], k=8, where="label IN (1, 7) AND id > 5000"))
    assert answers(t, str(q)) == duck(folder, q, 8, where="label IN (1, 7) AND id > 5000")
    assert set(t.column("label").to_pylist()) <= {1, 7}


def test_vector_queries_equal_numpy_brute_force(latents):
    folder, x, ids = latents
    rng = np.random.default_rng(1)
    v = rng.standard_normal((3, 16), dtype=np.float32)
    t = run_query(QueryConfig(latents=folder, vector=[float(a) for a in v.ravel()], k=5))
    assert t.num_rows == 15
    for i in range(3):
        d = np.sqrt(exact_sq(x, v[i][None, :]))
        order = np.lexsort((np.arange(len(x)), d))[:5]
        rows = [r for r in t.to_pylist() if r["query"] == f"vector {i}"]
        assert [r["id"] for r in rows] == ids[order].tolist()
        assert [r["distance"] for r in rows] == [float(v_) for v_ in d[order]]


def test_search_core_is_exact_with_ties_duplicates_and_tiny_blocks():
    rng = np.random.default_rng(3)
    base = rng.integers(-3, 4, size=(60, 4)).astype(np.float32)       # many exact ties
    x = np.concatenate([base, base[:30], base * 100])                  # duplicates and large norms
    q = np.concatenate([x[[0, 7, 100]], rng.standard_normal((2, 4)).astype(np.float32)])
    for k in (1, 5, 40, 200):                                          # k above the row count too
        s = BlockSearch(q, k)
        for lo in range(0, len(x), 7):                                 # blocks smaller than k
            s.add(x[lo:lo + 7], lo)
        for i in range(len(q)):
            d = exact_sq(x, q[i][None, :])
            order = np.lexsort((np.arange(len(x)), d))[:k]
            got = s.result.rows[i][np.isfinite(s.result.d[i])]
            assert got.tolist() == order.tolist()
            np.testing.assert_array_equal(s.result.d[i][: len(order)], d[order])


def test_string_ids_float16_latents_and_errors(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((500, 8)).astype(np.float16)
    ids = [f"r{i}" for i in range(500)]
    folder = write_latents(str(tmp_path / "s"), x.astype(np.float32), ids, files=2, row_group=128,
                           mu_type=pa.float16())
    t = run_query(QueryConfig(latents=folder, id=["r17", "r400"], k=4))
    xf = x.astype(np.float32)
    for q in ("r17", "r400"):
        d = exact_sq(xf, xf[int(q[1:])][None, :])
        d[int(q[1:])] = np.inf
        order = np.lexsort((np.arange(500), d))[:4]
        assert [r[0] for r in answers(t, q)] == [ids[i] for i in order]
    with pytest.raises(InputError, match="not found"):
        run_query(QueryConfig(latents=folder, id=["nope"], k=3))
    with pytest.raises(SchemaError, match="8"):
        run_query(QueryConfig(latents=folder, vector=[0.0, 1.0, 2.0], k=3))
    with pytest.raises(ConfigError, match="exactly one"):
        QueryConfig(latents=folder, k=3)
    with pytest.raises(SchemaError, match="nope"):
        run_query(QueryConfig(latents=folder, id=["r1"], where="nope = 3"))


def test_unique_first_is_np_unique_with_return_index():
    from pipeline.search.knn import unique_first

    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 5_000):
        a = rng.integers(0, 40, n)
        got, want = unique_first(a), np.unique(a, return_index=True)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_cli_prints_jsonl_and_does_not_import_torch_ray_mlflow_or_pandas(latents):
    folder, _, ids = latents
    q = int(ids[42])
    code = ("import sys, json; from jobs.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'ray', 'mlflow', 'pandas', 'sklearn') if m in sys.modules]; "
            "print(json.dumps({'heavy': heavy}), file=sys.stderr); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "query", "--latents", folder, "--id", str(q), "--k", "6",
                        "--format", "jsonl"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stderr.strip().splitlines()[-1]) == {"heavy": []}
    rows = [json.loads(line) for line in p.stdout.strip().splitlines()]
    assert [(r["id"], r["distance"]) for r in rows] == duck(folder, q, 6)
    assert main(["query", "--latents", folder, "--id", "-1", "--k", "3"]) == 2    # unknown id: exit 2


def test_output_piped_into_head_stops_quietly(latents):
    """`vaepipe query … | head -1`: the reader closes the pipe after one line; the query stops with
    SIGPIPE's status and no BrokenPipeError traceback."""
    folder, _, ids = latents
    ids_file = os.path.join(os.path.dirname(folder), "all-ids.txt")
    with open(ids_file, "w") as f:
        f.write("\n".join(str(int(v)) for v in ids[:2000]))   # 20,000 lines: far more than a pipe buffer
    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", "query", "--latents", folder, "--ids-file", ids_file,
                          "--k", "10", "--format", "jsonl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    first = p.stdout.readline()
    p.stdout.close()   # what `head -1` does after its line
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert json.loads(first)["rank"] == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
