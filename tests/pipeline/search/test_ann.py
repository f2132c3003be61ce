"""The index kept with a committed latents table (pipeline.search.ann, `vaepipe index`) and `vaepipe
query` through it: fresh index used, stale or missing one never (exact scan, and a line saying so),
filters and a query's own record held, a build killed before its pointer leaves the previous index
whole, an untrusted pointer refused. Answers checked against the exact scan and DuckDB."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jobs.cli import main
from pipeline.runtime.errors import ConfigError, LeaseHeldError, ManifestError
from pipeline.search import ann
from pipeline.search.query import QueryConfig, run_query
from pipeline.table.commit import control_of
from pipeline.table.lease import hold_lease
from pipeline.table.uris import resolve
from tests.pipeline.search.test_query import ROOT, duck, write_latents


def _clumps(n: int, seed: int) -> np.ndarray:
    # μ of a trained model form clumps (classes); uniform noise would make every index look bad
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, 16)) * 3
    return (centres[rng.integers(0, 30, n)] + rng.normal(size=(n, 16))).astype(np.float32)


def _table(path, n=20_000, seed=0, files=3):
    x = _clumps(n, seed)
    ids = np.random.default_rng(seed).permutation(n).astype(np.int64) * 5 + 11   # not row numbers
    return write_latents(str(path), x, ids, labels=(ids // 5) % 10, files=files, row_group=2_000), x, ids


def _pointer(folder):
    return ann.read_pointer(resolve(folder))


def _build(folder, **kw):
    return ann.build_index(ann.IndexConfig(latents=folder, **kw), log=lambda m: None)


def test_build_records_what_it_covers_and_a_recall_measured_against_the_exact_scan(tmp_path, seed):
    folder, x, _ = _table(tmp_path / "lat")
    p = _build(folder)
    assert p == _pointer(folder)                                   # the pointer is the commit point
    assert p["rows"] == len(x) and sum(r for _, r in p["files"]) == len(x) and len(p["files"]) == 3
    assert p["recall"]["at_nprobe"] >= 0.95 and p["recall"]["k"] == 10 and p["recall"]["queries"] == 200
    assert p["nprobe"] == min(int(n) for n, r in p["recall"]["tried"].items() if r >= 0.95)
    home = resolve(folder)
    assert sorted(os.listdir(os.path.join(control_of(home).path, "index"))) == sorted([p["build"], "current.json"])


def test_query_through_a_fresh_index_matches_the_exact_scan_and_duckdb(tmp_path, seed):
    folder, x, ids = _table(tmp_path / "lat")
    p = _build(folder)
    said = []
    qs = [str(int(v)) for v in ids[[3, 500, 19_999]]]
    every_cell = run_query(QueryConfig(latents=folder, id=qs, k=10, nprobe=p["lists"]), say=said.append)
    exact = run_query(QueryConfig(latents=folder, id=qs, k=10, exact=True), say=said.append)
    assert every_cell.equals(exact) and said == []        # all cells probed: the exact answer, bit for bit
    for q in qs:   # and DuckDB's brute-force SQL agrees (ids and float32 distances)
        want = duck(folder, int(q), 10)
        got = [(r["id"], r["distance"]) for r in exact.to_pylist() if r["query"] == q]
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([d for _, d in got], [d for _, d in want], rtol=1e-6)
    fast = run_query(QueryConfig(latents=folder, id=qs, k=10), say=said.append)   # the recorded nprobe
    hits = sum(len({r["id"] for r in fast.to_pylist() if r["query"] == q} &
                   {r["id"] for r in exact.to_pylist() if r["query"] == q}) for q in qs)
    assert hits >= 0.8 * 30 and said == []
    assert all(r["id"] != int(r["query"]) for r in fast.to_pylist())   # the query's own record is left out


def test_where_and_vectors_hold_through_the_index(tmp_path, seed):
    folder, x, ids = _table(tmp_path / "lat")
    p = _build(folder)
    q = str(int(ids[77]))
    got = run_query(QueryConfig(latents=folder, id=[q], k=8, where="label IN (2, 5)"), say=print)
    assert got.num_rows == 8 and set(got.column("label").to_pylist()) <= {2, 5}
    full = run_query(QueryConfig(latents=folder, id=[q], k=8, where="label IN (2, 5)", nprobe=p["lists"]))
    assert full.equals(run_query(QueryConfig(latents=folder, id=[q], k=8, where="label IN (2, 5)", exact=True)))
    # a filter almost nothing passes: the widened candidates run out, the exact scan answers, and says so
    rare = int(ids[123])
    said = []
    t = run_query(QueryConfig(latents=folder, vector=x[0].tolist(), k=3, where=f"id = {rare}"), say=said.append)
    assert t.column("id").to_pylist() == [rare] and len(said) == 1 and "exact scan" in said[0]
    v = run_query(QueryConfig(latents=folder, vector=x[9].tolist(), k=4, nprobe=p["lists"]))
    assert v.column("id").to_pylist()[0] == int(ids[9]) and v.column("distance").to_pylist()[0] == 0.0


def test_a_commit_makes_the_index_stale_and_the_query_scans_exactly_and_says_so(tmp_path, seed):
    folder, x, ids = _table(tmp_path / "lat")
    _build(folder)
    x2 = _clumps(5_000, seed + 1)
    write_latents(folder, x2, np.arange(5_000) + 10**7, labels=np.zeros(5_000, int), files=1)   # a new commit
    said = []
    got = run_query(QueryConfig(latents=folder, vector=x2[0].tolist(), k=5), say=said.append)
    assert got.equals(run_query(QueryConfig(latents=folder, vector=x2[0].tolist(), k=5, exact=True)))
    assert got.column("id").to_pylist()[0] == 10**7       # the new commit's record: never an old answer
    assert len(said) == 1 and "stale" in said[0] and "vaepipe index" in said[0]
    _build(folder)                                        # rebuilt: fresh again, silent
    said.clear()
    run_query(QueryConfig(latents=folder, vector=x2[0].tolist(), k=5), say=said.append)
    assert said == []


def test_a_build_killed_before_its_pointer_leaves_the_previous_index_and_the_next_build_cleans_up(tmp_path, seed):
    folder, x, ids = _table(tmp_path / "lat", n=8_000)
    first = _build(folder)
    marker = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": ROOT, "VAEPIPE_PAUSE_AT": "index.pointer", "VAEPIPE_PAUSE_MARKER": str(marker)}
    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", "index", "--latents", folder, "--lists", "50"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():                             # arrays written, pointer not yet
        assert p.poll() is None, p.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    index_dir = os.path.join(control_of(resolve(folder)).path, "index")
    assert len(os.listdir(index_dir)) == 3                 # the killed build's folder is there, unnamed
    assert _pointer(folder) == first                       # readers still get the previous index, whole
    said = []
    q = str(int(ids[5]))
    got = run_query(QueryConfig(latents=folder, id=[q], k=5, nprobe=first["lists"]), say=said.append)
    assert got.equals(run_query(QueryConfig(latents=folder, id=[q], k=5, exact=True))) and said == []
    again = _build(folder, lease_ttl=5, wait=30)          # the killed holder's lease is taken over
    assert sorted(os.listdir(index_dir)) == sorted([again["build"], "current.json"])


def test_cli_builds_and_a_second_writer_is_refused_while_the_lease_is_held(tmp_path, seed, capsys):
    folder, _, _ = _table(tmp_path / "lat", n=3_000)
    assert main(["index", "--latents", folder, "--lists", "20"]) == 0
    assert "recall@10" in capsys.readouterr().out
    with hold_lease(control_of(resolve(folder)), folder, "nightly"):
        with pytest.raises(LeaseHeldError):
            _build(folder)
    with pytest.raises(ConfigError, match="target_recall"):
        ann.IndexConfig(latents=folder, target_recall=1.5)


def test_a_pointer_that_names_paths_outside_the_index_is_refused(tmp_path, seed):
    folder, _, ids = _table(tmp_path / "lat", n=3_000)
    p = _build(folder, lists=20)
    path = os.path.join(control_of(resolve(folder)).path, "index", "current.json")
    for bad in ({**p, "build": "../../elsewhere"}, {**p, "files": [["/etc/passwd", 3]]}, {**p, "format": 99}):
        with open(path, "w") as f:
            json.dump(bad, f)
        with pytest.raises(ManifestError, match="current.json"):
            run_query(QueryConfig(latents=folder, id=[str(int(ids[0]))], k=3))


def test_the_light_pointer_path_of_a_short_query_is_where_builds_write_it(tmp_path, seed):
    from pipeline.search.latent_cache import local_index_pointer

    folder, _, _ = _table(tmp_path / "lat", n=1_000)
    _build(folder, lists=4)
    home = ann.index_home(resolve(folder))
    assert local_index_pointer(folder) == os.path.join(home.path, ann.POINTER) and os.path.exists(local_index_pointer(folder))


def test_integer_ids_are_kept_in_the_index_with_a_lookup_by_id(tmp_path, seed):
    folder, x, ids = _table(tmp_path / "lat", n=5_000)
    p = _build(folder, lists=30)
    index = ann.open_index(resolve(folder), p)
    assert p["id_column"] == "id"
    pos = index.positions_of(np.array([ids[0], ids[4_999], -5]))
    assert pos[2] == -1 and [int(index.ids[q]) for q in pos[:2]] == [int(ids[0]), int(ids[4_999])]
    np.testing.assert_array_equal(index.vectors[pos[0]], x[0])                  # the record's own vector
    assert sorted(np.asarray(index.ids).tolist()) == sorted(ids.tolist())
