"""Cases 17–22: outputs users can trust at the edges of production, on the real stack (local Ray,
MLflow store, real `vaepipe` processes killed with real signals) and read by the tools users read
them with (DuckDB, pyarrow datasets, Polars, pandas), not only by vaepipe's own readers."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main as vaepipe_main
from pipeline.table.commit import control_of
from pipeline.evaluation.datasets import digits, images_table
from pipeline.batch.encode import EncodeConfig, run_encode
from pipeline.runtime.errors import ManifestError, PartialFailure
from pipeline.batch.nightly import NightlyConfig, read_state, run_nightly
from pipeline.table.parquet_io import read_manifest
from pipeline.table.uris import resolve

from readers import assert_readers_agree, partition_types

MODEL = "models:/digits@production"
REPO = pathlib.Path(__file__).resolve().parents[2]


def _digits(start: int, n: int) -> pa.Table:
    x, y = digits()
    return images_table(x, y).slice(start, n)


def _put(t: pa.Table, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, path)


def _nightly(workdir, src, out, **kw) -> dict:
    """A nightly run on the executor users get for these few local records (in this process, no Ray):
    these cases are about which partitions run and what readers see, the same on either executor.
    Nightly's Ray path runs in case 18's first run (`--concurrency 1`) and tests/pipeline/table/test_s3.py;
    forcing it here cost an actor start per partition, ~25 of them."""
    return run_nightly(NightlyConfig(model=MODEL, input=str(src), output=str(out), workdir=workdir, **kw))


def _vaepipe(workdir, log: pathlib.Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """A real `vaepipe` process in its own process group (its local Ray starts inside that group)."""
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args, "--workdir", workdir],
                            cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def _kill_group(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(30)


# --- case 17: late, rewritten and removed input files ---------------------------------------------

def test_17_nightly_reencodes_exactly_the_partitions_whose_files_changed(trained_digits, workdir, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _put(_digits(0, 100), src / "date=1" / "a.parquet")
    _put(_digits(100, 100), src / "date=2" / "a.parquet")
    _put(_digits(200, 100), src / "date=3" / "a.parquet")
    _put(_digits(300, 50), src / "date=3" / "c.parquet")
    _put(_digits(400, 100), src / "date=4" / "a.parquet")
    first = _nightly(workdir, src, out)
    assert [p for p, _ in first["encoded"]] == ["date=1", "date=2", "date=3", "date=4"]
    assert set(first["reasons"].values()) == {"new partition"}

    _put(_digits(500, 70), src / "date=1" / "b.parquet")                  # a late file
    time.sleep(0.01)
    _put(_digits(600, 120), src / "date=2" / "a.parquet")                 # a rewritten file
    (src / "date=3" / "c.parquet").unlink()                               # a removed file
    second = _nightly(workdir, src, out)
    assert second["reasons"] == {"date=1": "1 new file", "date=2": "1 rewritten", "date=3": "1 removed file"}
    assert [p for p, _ in second["encoded"]] == ["date=1", "date=2", "date=3"] and second["current"] == ["date=4"]
    rows = dict(second["encoded"])
    assert rows == {"date=1": 170, "date=2": 120, "date=3": 100}          # rows out = rows in
    ids = assert_readers_agree(str(out), expected_rows=170 + 120 + 100 + 100)
    assert set(ids) == set(range(0, 100)) | set(range(500, 570)) | set(range(600, 720)) | set(range(200, 300)) \
        | set(range(400, 500))
    state = read_state(resolve(str(out)))["partitions"]
    assert sorted(state["date=1"]["files"]) == ["a.parquet", "b.parquet"] and state["date=2"]["status"] == "ok"
    assert _nightly(workdir, src, out)["encoded"] == []                   # and then nothing is left to do
    shutil.rmtree(src / "date=4")                                         # input retention removed a partition:
    fourth = _nightly(workdir, src, out)                                  # its latents stay, and the run says so
    assert fourth["input_gone"] == ["date=4"] and fourth["encoded"] == []
    assert len(assert_readers_agree(str(out))) == 490


# --- case 18: one bad partition does not stop the night ---------------------------------------------

def test_18_a_corrupt_partition_fails_alone_is_recorded_and_retried(trained_digits, workdir, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        _put(_digits(100 * i, 100), src / f"date={i}" / "a.parquet")
    good = (src / "date=1" / "a.parquet").read_bytes()
    (src / "date=1" / "a.parquet").write_bytes(good[: len(good) // 2])   # an upload cut short
    code = vaepipe_main(["nightly", "--model", MODEL, "--input", str(src), "--output", str(out),
                         "--workdir", workdir, "--concurrency", "1"])
    err = capsys.readouterr()
    assert code == PartialFailure.exit_code == 3
    assert "1 of 3 partition(s) failed" in err.err and "date=1" in err.err and "a.parquet" in err.err
    assert "encoded  date=0: 100 records" in err.out and "encoded  date=2: 100 records" in err.out
    state = read_state(resolve(str(out)))["partitions"]
    assert state["date=1"]["status"] == "failed" and "not a readable Parquet file" in state["date=1"]["error"]
    assert assert_readers_agree(str(out)) == list(range(0, 100)) + list(range(200, 300))

    (src / "date=1" / "a.parquet").write_bytes(good)                      # fixed the next day
    again = _nightly(workdir, src, out)
    assert [p for p, _ in again["encoded"]] == ["date=1"] and again["reasons"]["date=1"].startswith("retry")
    assert assert_readers_agree(str(out)) == list(range(300))


# --- case 19: manifests and state are untrusted input ---------------------------------------------

@pytest.mark.parametrize("crafted", [
    {"files": [{"path": "/ABS/canary.parquet", "rows": 1}], "pending_run_id": "/ABS"},
    {"files": [], "pending_files": ["../canary.parquet"]},
    {"files": [{"path": "s3://other-bucket/canary.parquet", "rows": 1}]},
], ids=["absolute", "dotdot", "scheme"])
def test_19_a_crafted_manifest_stops_encode_before_anything_is_touched(trained_digits, digits_parquet, workdir,
                                                                      tmp_path, crafted):
    out = tmp_path / "out"
    run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=str(out), workdir=workdir, concurrency=1))
    canary_dir = tmp_path / "elsewhere"
    _put(_digits(0, 5), canary_dir / "canary.parquet")
    text = json.dumps(crafted).replace("/ABS", str(canary_dir))
    manifest = pathlib.Path(control_of(resolve(str(out))).path) / "manifest.json"
    manifest.write_text(text)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ManifestError, match="not a plain relative path"):
        run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=str(out), workdir=workdir, concurrency=1))
    assert (canary_dir / "canary.parquet").exists() and sorted(p.name for p in out.rglob("*")) == before
    assert manifest.read_text() == text                                   # left for a person to look at


def test_19_a_crafted_nightly_state_is_refused_before_any_partition_runs(trained_digits, workdir, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _put(_digits(0, 50), src / "date=1" / "a.parquet")
    _nightly(workdir, src, out)
    ctl = pathlib.Path(control_of(resolve(str(out))).path)
    (ctl / "state.json").write_text(json.dumps({"partitions": {"../../etc": {"files": {}}}}))
    with pytest.raises(ManifestError, match="partition"):
        _nightly(workdir, src, out)
    (ctl / "state.json").write_text(json.dumps({"partitions": {"date=1": {"files": {"/etc/passwd": {}}}}}))
    with pytest.raises(ManifestError, match="relative path"):
        _nightly(workdir, src, out)


# --- case 20: one writer per output --------------------------------------------------------------

def _wait_for(path: pathlib.Path, p: subprocess.Popen, log: pathlib.Path, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert p.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the run never reached " + what
        time.sleep(0.1)


@pytest.mark.parametrize("job", ["encode", "nightly"])
def test_20_two_writers_on_one_output_one_commits_the_other_exits_2_naming_it(trained_digits, digits_parquet,
                                                                              workdir, tmp_path, job):
    """Run a is held (a test hook) right after its first staged unit, lease held, until run b has
    exited; then it goes on and commits. No race on start-up times: the overlap is certain."""
    out = tmp_path / "out"
    if job == "nightly":
        inp = tmp_path / "in"
        for i, f in enumerate(sorted(os.listdir(digits_parquet))):
            _put(pq.read_table(os.path.join(digits_parquet, f)), inp / f"day={i}" / "part.parquet")
    else:
        inp = pathlib.Path(digits_parquet)
    args = [job, "--model", MODEL, "--input", str(inp), "--output", str(out)]
    held, release = tmp_path / "held", tmp_path / "release"
    a = _vaepipe(workdir, tmp_path / "a.log", *args, env={
        "VAEPIPE_PAUSE_AT": "unit.written", "VAEPIPE_PAUSE_MARKER": str(held), "VAEPIPE_PAUSE_UNTIL": str(release)})
    _wait_for(held, a, tmp_path / "a.log", "unit.written")
    b = _vaepipe(workdir, tmp_path / "b.log", *args)
    code_b = b.wait(300)
    release.touch()
    codes = {"a": a.wait(300), "b": code_b}
    logs = {k: (tmp_path / f"{k}.log").read_text() for k in codes}
    assert codes == {"a": 0, "b": 2}, logs
    assert f"is being written by {job} run" in logs["b"] and f"pid {a.pid}" in logs["b"], logs["b"]
    assert "Traceback" not in logs["b"]
    assert assert_readers_agree(str(out)) == list(range(1797))          # one run's rows, each id once


# --- case 21: a killed driver, at any point, and the re-run ---------------------------------------

@pytest.mark.parametrize("point,flags,executor", [
    ("unit.written", ["--concurrency", "1"], "ray"),   # Ray actors: the driver, its local Ray and an actor holding a unit
    ("unit.written", [], "local"),   # the default executor: one process, an encoder thread per core, 3 units (files)
    ("commit.moves", [], "local"),
    ("commit.manifest", [], "local"),
], ids=["unit.written", "unit.written.local", "commit.moves", "commit.manifest"])
def test_21_sigkill_of_the_whole_encode_then_a_rerun_leaves_exactly_the_committed_rows(
        trained_digits, digits_parquet, workdir, tmp_path, point, flags, executor):
    out = tmp_path / "out"
    cfg = EncodeConfig(model=MODEL, input=digits_parquet, output=str(out), workdir=workdir)   # the default executor
    first = run_encode(cfg).manifest
    marker = tmp_path / "paused"
    p = _vaepipe(workdir, tmp_path / "killed.log", "encode", "--model", MODEL, "--input", digits_parquet,
                 "--output", str(out), *flags, env={"VAEPIPE_PAUSE_AT": point, "VAEPIPE_PAUSE_MARKER": str(marker),
                                                    "VAEPIPE_LOG": "INFO"})
    _wait_for(marker, p, tmp_path / "killed.log", point)
    _kill_group(p)
    assert f"encode: executor {executor} " in (tmp_path / "killed.log").read_text()
    ctl = pathlib.Path(control_of(resolve(str(out))).path)
    if point == "unit.written":   # killed while encoding: nothing reached OUT, every reader still sees run 1
        assert read_manifest(resolve(str(out)))["run_id"] == first["run_id"]
        assert assert_readers_agree(str(out), expected_rows=1797) == list(range(1797))
        assert list((ctl / "staging").iterdir())                          # the killed run's leftovers
    r = run_encode(cfg)                                                    # the next run: lease taken over at once
    assert r.manifest["run_id"] not in (first["run_id"],) and r.rows_out == 1797
    assert assert_readers_agree(str(out), expected_rows=1797) == list(range(1797))
    assert not (ctl / "staging").exists()
    assert sorted(f.name for f in out.iterdir()) == sorted(["_SUCCESS", *(f["path"] for f in r.manifest["files"])])


# --- case 22: hive partitions every reader can infer ----------------------------------------------

@pytest.mark.parametrize("key,values", [("date", ["1", "2"]), ("dt", ["20261124", "20261125"]), ("region", ["eu", "us"])])
def test_22_nightly_partitions_read_by_duckdb_pyarrow_polars_and_pandas(trained_digits, workdir, tmp_path, key, values):
    src, out = tmp_path / "in", tmp_path / "out"
    for i, v in enumerate(values):
        _put(_digits(100 * i, 100), src / f"{key}={v}" / "a.parquet")
    _nightly(workdir, src, out)
    assert assert_readers_agree(str(out)) == list(range(200))
    types = partition_types(str(out))                                     # inferred, each its own way
    assert len(types) == 4
    import duckdb

    got = duckdb.sql(f"SELECT {key}::VARCHAR AS k, count(*) FROM read_parquet('{out}/**/*.parquet') GROUP BY k ORDER BY k")
    assert got.fetchall() == [(values[0], 100), (values[1], 100)]
    for f in out.rglob("*.parquet"):
        assert key not in pq.read_schema(f).names                         # the value lives in the folder name only
    from pipeline.search.query import QueryConfig, run_query   # vaepipe's own reader adds it back, as hive readers do

    hits = run_query(QueryConfig(latents=str(out), id=["0"], k=5, where=f"{key} = '{values[1]}'"))
    assert hits.num_rows == 5 and set(hits.column(key).to_pylist()) == {values[1]}
    shutil.rmtree(src)
