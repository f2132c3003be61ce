"""`vaepipe neighbours` on the real stack (local Ray Data, committed output): exact neighbours equal a
numpy brute force bit for bit; the approximate usearch index prints its recall@k against exact."""
from __future__ import annotations

import re

import numpy as np
import pytest

from jobs.cli import main
from pipeline.search.knn import exact_sq
from pipeline.batch.neighbours import NeighboursConfig, run_neighbours
from pipeline.table.parquet_io import read_manifest
from pipeline.table.uris import resolve
from tests.pipeline.committed_io import committed
from tests.pipeline.search.test_query import write_latents


@pytest.fixture(scope="module")
def small_latents(tmp_path_factory):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1_500, 8)).astype(np.float32)
    x[100:110] = x[0]                                  # exact ties: ten copies of record 0
    ids = np.arange(1_500, dtype=np.int64) * 7 + 3
    folder = write_latents(str(tmp_path_factory.mktemp("nb") / "latents"), x, ids, files=3, row_group=400)
    return folder, x, ids


def brute_force(x: np.ndarray, k: int):
    rows, dists = [], []
    for i in range(len(x)):
        d = exact_sq(x, x[i][None, :])
        d[i] = np.inf                                  # a record is not its own neighbour
        order = np.lexsort((np.arange(len(x)), d))[:k]
        rows.append(order)
        dists.append(np.sqrt(d[order]).astype(np.float32))
    return np.array(rows), np.array(dists)


def test_exact_neighbours_equal_numpy_brute_force(ray_local, small_latents, tmp_path):
    folder, x, ids = small_latents
    out = str(tmp_path / "knn")
    r = run_neighbours(NeighboursConfig(input=folder, output=out, k=10, block_rows=128))
    assert r.rows == 1_500 and r.index == "exact" and r.recall is None
    assert read_manifest(resolve(out))["vaepipe.neighbours_k"] == "10"
    t = committed(out)
    assert t.column_names == ["id", "neighbours", "distances"]
    assert t.column("id").to_pylist() == ids.tolist()                 # input order kept
    rows, dists = brute_force(x, 10)
    assert t.column("neighbours").to_pylist() == ids[rows].tolist()
    np.testing.assert_array_equal(np.array(t.column("distances").to_pylist(), np.float32), dists)
    # record 0's ten copies are at distance 0, in row order
    assert t.column("neighbours")[0].as_py()[:9] == ids[100:109].tolist()


def test_usearch_index_prints_its_recall_and_is_mostly_right(ray_local, small_latents, tmp_path, capsys):
    pytest.importorskip("usearch")
    folder, x, ids = small_latents
    out = str(tmp_path / "ann")
    assert main(["neighbours", "--input", folder, "--output", out, "--k", "10", "--index", "usearch",
                 "--recall-sample", "300"]) == 0
    text = capsys.readouterr().out
    m = re.search(r"recall@10 against exact search on 300 records: ([0-9.]+)", text)
    assert m, text
    recall = float(m.group(1))
    assert 0.9 <= recall <= 1.0
    t = committed(out)
    rows, dists = brute_force(x, 10)
    got = t.column("neighbours").to_pylist()
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, ids[rows].tolist())])
    assert overlap >= 0.9                                  # over all records, not just the sample
    assert all(len(v) == 10 and ids[i] not in v for i, v in enumerate(got))
    d = np.array(t.column("distances").to_pylist())
    assert (np.diff(d, axis=1) >= 0).all()                # nearest first, exact distances of the candidates
    assert read_manifest(resolve(out))["vaepipe.recall_at_k"] == f"{recall:.4f}"


def test_neighbours_config_checks():
    from pipeline.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="index"):
        NeighboursConfig(input="a", output="b", index="faiss")
    with pytest.raises(ConfigError, match="k must be"):
        NeighboursConfig(input="a", output="b", k=0)
