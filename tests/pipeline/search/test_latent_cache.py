"""`vaepipe query`'s local cache (pipeline.search.latent_cache): the same answers as the Parquet path and as
DuckDB, served without reading Parquet once written; never read after the table changes; a broken,
partial or killed entry is ignored; the folder stays within its budget."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.search import query as query_mod
from pipeline.table.parquet_io import list_parquet_files
from pipeline.search.query import QueryConfig, run_query
from pipeline.table.uris import resolve
from tests.pipeline.search.test_query import ROOT, duck, write_latents

duckdb = pytest.importorskip("duckdb")


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6_000, 16), dtype=np.float32)
    ids = rng.permutation(len(x)).astype(np.int64) + 10
    return write_latents(str(tmp_path / "latents"), x, ids, labels=ids % 10), ids


def entries(folder) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.arrow")))


def queries(folder: str, ids: np.ndarray, **kw) -> list:
    """One of each kind of query: many ids, a --where filter, vectors."""
    q = [str(int(v)) for v in ids[[0, 17, 5_999]]]
    return [run_query(QueryConfig(latents=folder, id=q, k=9, **kw)),
            run_query(QueryConfig(latents=folder, id=q[:1], k=5, where="label IN (2, 3) AND id > 100", **kw)),
            run_query(QueryConfig(latents=folder, vector=[0.1] * 32, k=4, **kw))]


def test_second_query_reads_the_cache_not_parquet_and_answers_the_same(table, tmp_path, monkeypatch):
    folder, ids = table
    cache = str(tmp_path / "cache")
    want = queries(folder, ids, cache="off")
    assert not os.path.exists(cache)                        # --cache off writes nothing
    first = queries(folder, ids, cache_dir=cache)           # writes the entry during its scan
    assert len(entries(cache)) == 1 and not glob.glob(os.path.join(cache, "*.tmp-*"))

    def no_parquet(*a, **k):
        raise AssertionError("read Parquet data although the cache holds every column")

    # from now on any row-group read fails: the answers must come from the cache alone
    monkeypatch.setattr(query_mod.Latents, "_read_piece", no_parquet)
    monkeypatch.setattr(query_mod.Latents, "open", no_parquet)
    again = queries(folder, ids, cache_dir=cache)
    for a, b, c in zip(want, first, again):
        assert a.equals(b) and a.equals(c)
    q = int(ids[17])
    assert [(r["id"], r["distance"]) for r in again[0].to_pylist() if r["query"] == str(q)] == duck(folder, q, 9)


def test_a_changed_table_gets_a_new_entry_and_the_new_answer(table, tmp_path):
    folder, ids = table
    cache = str(tmp_path / "cache")
    q = str(int(ids[3]))
    before = run_query(QueryConfig(latents=folder, id=[q], k=5, cache_dir=cache))
    # the same ids, new latents, committed over the old table (what a re-encode does)
    x2 = np.random.default_rng(12).standard_normal((len(ids), 16), dtype=np.float32)
    write_latents(folder, x2, ids, labels=ids % 10)
    after = run_query(QueryConfig(latents=folder, id=[q], k=5, cache_dir=cache))
    assert after.equals(run_query(QueryConfig(latents=folder, id=[q], k=5, cache="off")))
    assert not after.equals(before)
    assert [(r["id"], r["distance"]) for r in after.to_pylist()] == duck(folder, int(q), 5)
    assert len(entries(cache)) == 2


def test_a_file_rewritten_in_place_gets_a_new_entry(tmp_path):
    """A plain Parquet file (no manifest) overwritten under the same path: the key follows the file's
    size and modification time, not only its name."""
    path = str(tmp_path / "plain.parquet")
    cache = str(tmp_path / "cache")
    rng = np.random.default_rng(15)
    got = []
    for _ in range(2):
        x = rng.standard_normal((3_000, 16), dtype=np.float32)
        pq.write_table(pa.table({"id": np.arange(3_000), "mu": pa.FixedSizeListArray.from_arrays(
            pa.array(x.ravel()), 16)}), path)
        got.append(run_query(QueryConfig(latents=path, id=["4"], k=5, cache_dir=cache)))
        assert got[-1].equals(run_query(QueryConfig(latents=path, id=["4"], k=5, cache="off")))
    assert not got[0].equals(got[1]) and len(entries(cache)) == 2


def test_an_entry_deleted_while_read_is_read_to_the_end(table, tmp_path):
    """Another query's pruning (or a rewrite of the entry) while this one reads: this one reads the
    file it opened."""
    from pipeline.search.latent_cache import LatentCache

    folder, ids = table
    cache = str(tmp_path / "cache")
    run_query(QueryConfig(latents=folder, id=[str(int(ids[0]))], k=3, cache_dir=cache))
    (entry,) = entries(cache)
    key = os.path.basename(entry)[: -len(".arrow")]
    opened = LatentCache(key, len(ids), cache).open(["id", "mu"])
    os.unlink(entry)
    got = pa.concat_tables([t for _, t in opened.blocks(["id", "mu"])])
    files = list_parquet_files(resolve(folder))
    assert got.column("id").to_pylist() == [v for f in files for v in pq.read_table(f).column("id").to_pylist()]
    assert opened.take(np.array([5, 0]), ["id"]).column("id").to_pylist() == got.column("id").to_pylist()[5::-5]


def test_truncated_entry_is_discarded_and_rewritten(table, tmp_path):
    folder, ids = table
    cache = str(tmp_path / "cache")
    q = [str(int(ids[5]))]
    want = run_query(QueryConfig(latents=folder, id=q, k=5, cache="off"))
    run_query(QueryConfig(latents=folder, id=q, k=5, cache_dir=cache))
    (entry,) = entries(cache)
    size = os.path.getsize(entry)
    with open(entry, "r+b") as f:
        f.truncate(size // 2)                                # a disk that lost the tail
    assert run_query(QueryConfig(latents=folder, id=q, k=5, cache_dir=cache)).equals(want)
    assert entries(cache) == [entry] and os.path.getsize(entry) == size   # rewritten whole


def test_unwritable_cache_folder_leaves_the_query_working(table, tmp_path):
    folder, ids = table
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    q = [str(int(ids[8]))]
    got = run_query(QueryConfig(latents=folder, id=q, k=5, cache_dir=str(blocker / "cache")))
    assert got.equals(run_query(QueryConfig(latents=folder, id=q, k=5, cache="off")))


def test_budget_keeps_the_most_recently_used_entry(tmp_path):
    rng = np.random.default_rng(13)
    cache = str(tmp_path / "cache")
    folders = [write_latents(str(tmp_path / f"t{i}"), rng.standard_normal((4_000, 16), dtype=np.float32),
                             np.arange(4_000), files=2) for i in range(2)]
    run_query(QueryConfig(latents=folders[0], id=["1"], k=3, cache_dir=cache))
    (first,) = entries(cache)
    budget_gb = 1.5 * os.path.getsize(first) / 2 ** 30       # room for one entry, not two
    run_query(QueryConfig(latents=folders[1], id=["1"], k=3, cache_dir=cache, cache_max_gb=budget_gb))
    (kept,) = entries(cache)
    assert kept != first


def test_query_killed_while_writing_leaves_no_entry(tmp_path):
    """SIGKILL during the scan that writes the entry: only a temporary file is left, never an entry
    under the final name; the next query answers right and writes the entry."""
    rng = np.random.default_rng(14)
    n = 1_500_000                                           # a scan long enough to be killed inside
    folder = write_latents(str(tmp_path / "big"), rng.standard_normal((n, 8), dtype=np.float32),
                           np.arange(n), files=4, row_group=65_536)
    cache = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "jobs.cli", "query", "--latents", folder, "--id", "7", "--k", "3",
           "--cache-dir", cache, "--format", "jsonl"]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not glob.glob(os.path.join(cache, "*.tmp-*")):    # the writer has opened its file: scan under way
        assert p.poll() is None, p.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert entries(cache) == [] and len(glob.glob(os.path.join(cache, "*.tmp-*"))) == 1
    got = run_query(QueryConfig(latents=folder, id=["7"], k=3, cache_dir=cache))
    assert got.equals(run_query(QueryConfig(latents=folder, id=["7"], k=3, cache="off")))
    assert len(entries(cache)) == 1


def test_a_repeated_query_of_a_local_table_imports_no_parquet_reader(table, tmp_path):
    """The note beside the entry lets a later query process open the entry directly: no fsspec, no
    pyarrow.parquet import (they are most of a short query's start-up), the same answer."""
    folder, ids = table
    cache = str(tmp_path / "cache")
    q = str(int(ids[42]))
    want = run_query(QueryConfig(latents=folder, id=[q], k=6, cache="off"))
    probe = ("import sys, json; from pipeline.search.query import QueryConfig, run_query; "
             f"t = run_query(QueryConfig(latents={folder!r}, id=[{q!r}], k=6, cache_dir={cache!r})); "
             "print(json.dumps([sorted(m for m in ('fsspec', 'pyarrow.parquet', 'numpy.ma') if m in sys.modules), "
             "t.to_pylist()]))")
    runs = [subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                           capture_output=True, text=True, check=True) for _ in range(2)]
    (first_mods, first), (again_mods, again) = [__import__("json").loads(r.stdout) for r in runs]
    assert first_mods == ["fsspec", "pyarrow.parquet"]   # the first lists the table and writes entry and note
    assert again_mods == []                              # numpy.ma: np.unique's first call imports it (~8 ms)
    assert first == again == want.to_pylist()


def test_the_note_is_not_used_once_anything_under_the_table_changes(table, tmp_path):
    """Any file added or changed under the table's folder or its control folder (a commit, a lease
    renewed, a stray file) sends the query the full way, which checks the files themselves."""
    from pipeline.search.latent_cache import find_local

    folder, ids = table
    cache = str(tmp_path / "cache")
    q = [str(int(ids[1]))]
    run_query(QueryConfig(latents=folder, id=q, k=3, cache_dir=cache))
    assert find_local(folder, cache) is not None
    control = os.path.join(os.path.dirname(folder), "_" + os.path.basename(folder) + ".vaepipe")
    assert os.path.isdir(control)
    for where in (control, folder):
        with open(os.path.join(where, "_touched"), "w") as f:
            f.write("x")
        assert find_local(folder, cache) is None
        got = run_query(QueryConfig(latents=folder, id=q, k=3, cache_dir=cache))   # full path, writes a note
        assert got.equals(run_query(QueryConfig(latents=folder, id=q, k=3, cache="off")))
        assert find_local(folder, cache) is not None
    assert len(entries(cache)) == 1            # the data files did not change: the same entry throughout


def test_a_note_whose_entry_is_gone_is_ignored_and_pruned(table, tmp_path):
    from pipeline.search.latent_cache import NOTE_SUFFIX, find_local

    folder, ids = table
    cache = str(tmp_path / "cache")
    q = [str(int(ids[2]))]
    run_query(QueryConfig(latents=folder, id=q, k=3, cache_dir=cache))
    (entry,) = entries(cache)
    os.unlink(entry)
    assert find_local(folder, cache) is None
    assert run_query(QueryConfig(latents=folder, id=q, k=3, cache_dir=cache)).equals(
        run_query(QueryConfig(latents=folder, id=q, k=3, cache="off")))
    other = write_latents(str(tmp_path / "other"), np.ones((10, 16), np.float32), np.arange(10))
    os.unlink(entries(cache)[0])
    run_query(QueryConfig(latents=other, id=["1"], k=3, cache_dir=cache))   # its commit prunes the cache
    notes = glob.glob(os.path.join(cache, "*" + NOTE_SUFFIX))
    assert len(notes) == 1 and find_local(other, cache) is not None
