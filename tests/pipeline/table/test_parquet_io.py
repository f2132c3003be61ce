"""Parquet through fsspec: atomic commits (local and memory://), untrusted manifests, input listing,
footer checks."""
from __future__ import annotations

import json
import posixpath
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.table.commit import MANIFEST, control_of, partition_control
from pipeline.runtime.errors import ConfigError, InputError, ManifestError
from pipeline.table.parquet_io import (SUCCESS, Commit, check_inputs, list_parquet_files, read_manifest, read_table,
                                 write_options, write_table)
from pipeline.table.uris import resolve


@pytest.fixture(params=["local", "memory"])
def out(request, tmp_path):
    """An output Location that does not exist yet, on local disk or in fsspec's in-memory filesystem."""
    if request.param == "local":
        yield resolve(str(tmp_path / "out"))
        return
    loc = resolve(f"memory://vaepipe-tests/{uuid.uuid4().hex}/out")  # unique: the memory fs is process-global
    yield loc
    root = posixpath.dirname(loc.path)   # holds the output and its control folder
    if loc.fs.exists(root):
        loc.fs.rm(root, recursive=True)


def table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": list(range(start, start + n)), "x": [float(i) for i in range(start, start + n)]})


def stage(commit: Commit, name: str, t: pa.Table) -> tuple[str, int]:
    path = commit.staged_path(name)
    commit.out.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    write_table(commit.out, path, t)
    return path, t.num_rows


def names(loc) -> set[str]:
    """Every file under loc, relative to it."""
    return {posixpath.relpath(p, loc.path) for p in loc.fs.find(loc.path)}


def control_names(out) -> set[str]:
    return names(control_of(out))


# --- Commit -----------------------------------------------------------------------------------------

def test_commit_moves_staged_files_and_writes_manifest_and_success(out):
    c = Commit(out, run_id="r1")
    staged = [stage(c, "a.parquet", table(3)), stage(c, "b.parquet", table(2, start=3))]
    assert all(p.startswith(posixpath.join(control_of(out).path, "staging", "r1")) for p, _ in staged)
    assert not out.fs.exists(out.path)                              # nothing in OUT while staging

    m = c.commit(staged, {"vaepipe.model": "models:/vae/1"})
    assert names(out) == {"part-00000-r1.parquet", "part-00001-r1.parquet", SUCCESS}  # only data in OUT
    assert control_names(out) == {MANIFEST}                          # staging gone
    assert (m["run_id"], m["rows"], m["vaepipe.model"]) == ("r1", 5, "models:/vae/1")
    assert m["files"] == [{"path": "part-00000-r1.parquet", "rows": 3}, {"path": "part-00001-r1.parquet", "rows": 2}]
    assert read_manifest(out) == m
    with out.fs.open(posixpath.join(control_of(out).path, MANIFEST), "rb") as f:
        assert json.loads(f.read()) == m                            # plain JSON on disk
    files = list_parquet_files(out)
    assert [read_table(out, p).column("id").to_pylist() for p in files] == [[0, 1, 2], [3, 4]]


def test_commit_keeps_hive_partition_folders(out):
    c = Commit(out, run_id="r1")
    m = c.commit([stage(c, "date=2026-01-01/x.parquet", table(2)), stage(c, "date=2026-01-02/y.parquet", table(1))], {})
    assert [f["path"] for f in m["files"]] == ["date=2026-01-01/part-00000-r1.parquet",
                                               "date=2026-01-02/part-00001-r1.parquet"]
    assert {"date=2026-01-01/part-00000-r1.parquet", "date=2026-01-02/part-00001-r1.parquet"} <= names(out)


def test_second_commit_removes_old_files_only_after_the_new_manifest_exists(out, monkeypatch):
    c1 = Commit(out, run_id="r1")
    c1.commit([stage(c1, "a.parquet", table(3)), stage(c1, "b.parquet", table(3))], {})
    old = {posixpath.join(out.path, f"part-0000{i}-r1.parquet") for i in (0, 1)}

    # record which manifest is visible at the moment each old part file is deleted
    seen = {}
    real_rm = out.fs.rm

    def spy_rm(path, *args, **kwargs):
        if path in old:
            seen[path] = read_manifest(out)["run_id"]
            assert out.fs.exists(posixpath.join(out.path, SUCCESS))
        return real_rm(path, *args, **kwargs)

    monkeypatch.setattr(out.fs, "rm", spy_rm)
    c2 = Commit(out, run_id="r2")
    m = c2.commit([stage(c2, "a.parquet", table(4, start=10))], {})
    monkeypatch.undo()

    assert seen == {p: "r2" for p in old}                           # both deleted, each after the commit point
    assert names(out) == {"part-00000-r2.parquet", SUCCESS} and control_names(out) == {MANIFEST}
    assert read_manifest(out)["run_id"] == m["run_id"] == "r2"
    assert [read_table(out, p).num_rows for p in list_parquet_files(out)] == [4]


def test_abort_leaves_the_destination_unchanged(out):
    c1 = Commit(out, run_id="r1")
    c1.commit([stage(c1, "a.parquet", table(3))], {"note": "first"})
    before = {p: out.fs.cat_file(posixpath.join(out.path, p)) for p in names(out)}

    c2 = Commit(out, run_id="r2")
    stage(c2, "a.parquet", table(5))
    stage(c2, "b.parquet", table(5))
    assert any(p.startswith("staging/r2/") for p in control_names(out))
    c2.abort()                                                      # e.g. the job failed after writing parts

    assert {p: out.fs.cat_file(posixpath.join(out.path, p)) for p in names(out)} == before
    assert read_manifest(out)["note"] == "first"
    assert [read_table(out, p).num_rows for p in list_parquet_files(out)] == [3]


def test_abort_before_any_commit_leaves_no_output(out):
    c = Commit(out, run_id="r1")
    stage(c, "a.parquet", table(3))
    c.abort()
    assert names(out) == set() and control_names(out) == set() and read_manifest(out) is None
    with pytest.raises(InputError, match="does not exist"):           # OUT was never created
        check_inputs(out, list_parquet_files(out))


class Crash(Exception):
    pass


def crash_after_moves(monkeypatch, out, n: int) -> None:
    """Make the commit die after `n` parts have been moved out of staging (the process is gone before
    the real manifest is written): the next move out of staging raises."""
    real_mv, moved = out.fs.mv, []

    def mv(src, dst, *args, **kwargs):
        if "/staging/" in src:
            if len(moved) == n:
                raise Crash(f"killed while moving {src}")
            moved.append(dst)
        return real_mv(src, dst, *args, **kwargs)

    monkeypatch.setattr(out.fs, "mv", mv)


def test_first_commit_crashing_between_the_moves_and_the_manifest_exposes_nothing(out, monkeypatch):
    c1 = Commit(out, run_id="r1")
    staged = [stage(c1, "a.parquet", table(3)), stage(c1, "b.parquet", table(2, start=3))]
    crash_after_moves(monkeypatch, out, 1)
    with pytest.raises(Crash):
        c1.commit(staged, {})
    monkeypatch.undo()
    assert "part-00000-r1.parquet" in names(out)                   # one part already has its final name…
    assert not out.fs.exists(posixpath.join(out.path, SUCCESS))
    assert list_parquet_files(out) == []                            # …but readers see the previous (empty) state
    assert read_manifest(out)["files"] == [] and read_manifest(out)["pending_files"] == [
        "part-00000-r1.parquet", "part-00001-r1.parquet"]

    c2 = Commit(out, run_id="r2")                                   # the re-run commits and cleans up
    c2.commit([stage(c2, "a.parquet", table(4, start=10))], {})
    assert names(out) == {"part-00000-r2.parquet", SUCCESS} and control_names(out) == {MANIFEST}
    assert [read_table(out, p).column("id").to_pylist() for p in list_parquet_files(out)] == [[10, 11, 12, 13]]
    assert "pending_files" not in read_manifest(out)


def test_rerun_crashing_between_the_moves_and_the_manifest_keeps_the_previous_output(out, monkeypatch):
    c1 = Commit(out, run_id="r1")
    c1.commit([stage(c1, "a.parquet", table(3))], {"note": "first"})
    c2 = Commit(out, run_id="r2")
    staged = [stage(c2, "a.parquet", table(5)), stage(c2, "b.parquet", table(5))]
    crash_after_moves(monkeypatch, out, 1)
    with pytest.raises(Crash):
        c2.commit(staged, {})
    monkeypatch.undo()
    assert "part-00000-r2.parquet" in names(out)
    m = read_manifest(out)
    assert (m["run_id"], m["note"]) == ("r1", "first")
    assert [posixpath.relpath(p, out.path) for p in list_parquet_files(out)] == ["part-00000-r1.parquet"]
    c3 = Commit(out, run_id="r3")
    c3.commit([stage(c3, "a.parquet", table(1))], {})
    assert names(out) == {"part-00000-r3.parquet", SUCCESS} and control_names(out) == {MANIFEST}   # r1's and the crashed r2's parts gone


def test_a_staged_but_uncommitted_run_is_invisible_to_readers(out):
    c1 = Commit(out, run_id="r1")
    c1.commit([stage(c1, "a.parquet", table(3))], {})
    stage(Commit(out, run_id="r2"), "a.parquet", table(9))          # a crashed run's leftovers
    assert [read_table(out, p).num_rows for p in list_parquet_files(out)] == [3]


# --- listing inputs ---------------------------------------------------------------------------------

def test_list_parquet_files_skips_hidden_and_underscore_entries(out):
    for rel in ["a.parquet", "b.parq", "part-0", "sub/c.parquet", "date=2026-01-01/d.parquet",
                "_tmp.parquet", ".hidden.parquet", "_staging/x/e.parquet", ".git/f.parquet", "sub/_g.parquet",
                "notes.txt", "_SUCCESS"]:
        path = posixpath.join(out.path, rel)
        out.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        write_table(out, path, table(1))
    got = [posixpath.relpath(p, out.path) for p in list_parquet_files(out)]
    assert got == ["a.parquet", "b.parq", "date=2026-01-01/d.parquet", "part-0", "sub/c.parquet"]


def test_list_parquet_files_reads_a_committed_output_through_its_manifest(out):
    c = Commit(out, run_id="r1")
    c.commit([stage(c, "a.parquet", table(2)), stage(c, "b.parquet", table(2))], {})
    write_table(out, posixpath.join(out.path, "stray.parquet"), table(1))   # not part of the commit
    got = [posixpath.relpath(p, out.path) for p in list_parquet_files(out)]
    assert got == ["part-00000-r1.parquet", "part-00001-r1.parquet"]      # manifest order


def test_a_folder_of_committed_outputs_is_read_through_each_manifest(out, monkeypatch):
    """nightly's OUT/<partition>/: each partition is a table whose manifest lives in the root's control
    folder; a crashed commit in one partition and a stray file there stay invisible; plain files beside
    them are listed."""
    day1 = out.join("day=1")
    c = Commit(day1, run_id="r1", control=partition_control(control_of(out), "day=1"))
    c.commit([stage(c, "a.parquet", table(2))], {})
    write_table(day1, posixpath.join(day1.path, "stray.parquet"), table(1))
    assert [posixpath.relpath(p, day1.path) for p in list_parquet_files(day1)] == ["part-00000-r1.parquet"]
    day2 = out.join("day=2")
    c2 = Commit(day2, run_id="r2", control=partition_control(control_of(out), "day=2"))
    staged = [stage(c2, "a.parquet", table(3)), stage(c2, "b.parquet", table(3))]
    crash_after_moves(monkeypatch, day2, 1)
    with pytest.raises(Crash):
        c2.commit(staged, {})
    monkeypatch.undo()
    write_table(out, posixpath.join(out.path, "loose.parquet"), table(1))
    got = [posixpath.relpath(p, out.path) for p in list_parquet_files(out)]
    assert got == ["day=1/part-00000-r1.parquet", "loose.parquet"]


def test_list_parquet_files_of_a_single_file_and_of_nothing(out):
    path = posixpath.join(out.path, "one.parquet")
    out.fs.makedirs(out.path, exist_ok=True)
    write_table(out, path, table(2))
    single = resolve(out.full(path))
    assert list_parquet_files(single) == [single.path]
    with pytest.raises(InputError, match="does not exist"):
        list_parquet_files(out.join("missing"))


# --- checking inputs --------------------------------------------------------------------------------

def test_check_inputs_returns_schema_and_row_counts(out):
    out.fs.makedirs(out.path, exist_ok=True)
    for i, n in enumerate([3, 5]):
        write_table(out, posixpath.join(out.path, f"p{i}.parquet"), table(n), metadata={"k": "v"})
    schema, rows, per_file = check_inputs(out, list_parquet_files(out))
    assert schema.names == ["id", "x"] and (rows, per_file) == (8, [3, 5])
    assert schema.metadata[b"k"] == b"v"


def test_check_inputs_names_a_truncated_parquet_file(out):
    out.fs.makedirs(out.path, exist_ok=True)
    good, bad = posixpath.join(out.path, "good.parquet"), posixpath.join(out.path, "bad.parquet")
    write_table(out, good, table(100))
    data = out.fs.cat_file(good)
    out.fs.pipe_file(bad, data[: len(data) // 2])                   # an upload cut short: no footer
    with pytest.raises(InputError, match=r"bad\.parquet: not a readable Parquet file"):
        check_inputs(out, list_parquet_files(out))
    with pytest.raises(InputError, match=r"bad\.parquet: cannot read Parquet"):
        read_table(out, bad)


def test_written_tables_are_zstd_parquet_with_metadata(tmp_path):
    loc = resolve(str(tmp_path))
    path = str(tmp_path / "t.parquet")
    write_table(loc, path, table(4), metadata={"vaepipe.model": "m"})
    md = pq.read_metadata(path)
    assert md.row_group(0).column(0).compression == "ZSTD"
    assert pq.read_schema(path).metadata[b"vaepipe.model"] == b"m"


# --- untrusted manifests ----------------------------------------------------------------------------

CRAFTED = [
    {"files": [{"path": "/etc/passwd", "rows": 1}]},
    {"files": [{"path": "../canary.txt", "rows": 1}]},
    {"files": [{"path": "a/../../canary.txt", "rows": 1}]},
    {"files": [{"path": "s3://other-bucket/key.parquet", "rows": 1}]},
    {"files": [], "pending_files": ["/abs/file"]},
    {"files": [], "pending_run_id": "/abs/dir"},
    {"files": [], "pending_run_id": "../.."},
    {"files": [], "quarantine": "../../canary.txt"},
    {"files": "everything"},
    ["not", "an", "object"],
]


@pytest.mark.parametrize("crafted", CRAFTED, ids=[json.dumps(c)[:40] for c in CRAFTED])
def test_a_crafted_manifest_is_refused_and_nothing_outside_the_output_is_touched(out, crafted):
    c1 = Commit(out, run_id="r1")
    c1.commit([stage(c1, "a.parquet", table(3))], {})
    canary = posixpath.join(posixpath.dirname(out.path), "canary.txt")
    out.fs.pipe_file(canary, b"keep me")
    ctl = control_of(out)
    out.fs.pipe_file(posixpath.join(ctl.path, MANIFEST), json.dumps(crafted).encode())
    before = names(out)

    with pytest.raises(ManifestError, match="manifest|relative path|run id|not a vaepipe"):
        list_parquet_files(out)
    c2 = Commit(out, run_id="r2")
    with pytest.raises(ManifestError):
        c2.commit([stage(c2, "a.parquet", table(1))], {})
    assert out.fs.cat_file(canary) == b"keep me" and names(out) == before   # nothing moved or deleted


def test_a_manifest_that_is_not_json_is_a_clear_error(out):
    ctl = control_of(out)
    out.fs.makedirs(ctl.path, exist_ok=True)
    out.fs.pipe_file(posixpath.join(ctl.path, MANIFEST), b"{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(out)


def test_an_output_at_a_bucket_or_filesystem_root_is_refused():
    with pytest.raises(ConfigError, match="below a bucket or directory root"):
        control_of(resolve("memory://"))
    with pytest.raises(ConfigError, match="does not start with"):
        control_of(resolve("memory://x/_hidden"))


def test_a_legacy_output_is_read_through_its_manifest_and_migrated_by_the_next_commit(out):
    """Outputs committed before the control folder kept _manifest.json, _skipped.parquet and _staging/
    inside OUT: they are read as before, and the next commit moves to the new layout."""
    out.fs.makedirs(posixpath.join(out.path, "_staging", "old"), exist_ok=True)
    write_table(out, posixpath.join(out.path, "part-00000-old.parquet"), table(2))
    write_table(out, posixpath.join(out.path, "_staging", "old", "unit.parquet"), table(9))
    write_table(out, posixpath.join(out.path, "_skipped.parquet"), table(1))
    out.fs.pipe_file(posixpath.join(out.path, "_manifest.json"),
                     json.dumps({"run_id": "old", "files": [{"path": "part-00000-old.parquet", "rows": 2}]}).encode())
    assert [posixpath.relpath(p, out.path) for p in list_parquet_files(out)] == ["part-00000-old.parquet"]
    c = Commit(out, run_id="r1")
    c.commit([stage(c, "a.parquet", table(3))], {})
    assert names(out) == {"part-00000-r1.parquet", SUCCESS}


def test_a_nightly_partition_is_read_through_the_roots_control_folder_and_refused_to_encode(out):
    """OUT/<p> of a nightly output: its manifest lives in the root's control folder, and a plain
    encode into it is refused (the partition is written under the nightly run's lease only)."""
    from pipeline.batch.encode import refuse_partition_of_nightly

    day = out.join("day=1")
    refuse_partition_of_nightly(day)                                # not a nightly output yet: allowed
    c = Commit(day, run_id="r1", control=partition_control(control_of(out), "day=1"))
    c.commit([stage(c, "a.parquet", table(2))], {})
    assert read_manifest(day)["run_id"] == "r1"
    with pytest.raises(ConfigError, match="partition of the nightly output"):
        refuse_partition_of_nightly(day)


def test_floats_and_lists_of_floats_are_written_without_a_dictionary(tmp_path):
    """write_options: zstd everywhere; a dictionary for ids, labels and strings (and int8 μ), none for
    float columns or float lists, whose values are nearly all distinct. DuckDB reads the file back."""
    import duckdb
    import numpy as np

    n = 4096
    rng = np.random.default_rng(0)
    t = pa.table({"id": np.arange(n), "label": pa.array(["cat", "dog"] * (n // 2)),
                  "mu": pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * 4, np.float32)), 4),
                  "q": pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(-127, 128, n * 4, np.int8)), 4),
                  "score": rng.standard_normal(n), "half": pa.array(rng.standard_normal(n).astype(np.float16))})
    opts = write_options(t.schema)
    assert opts == {"compression": "zstd", "use_dictionary": ["id", "label", "q.list.element"]}
    nested = pa.schema([("s", pa.struct([("a", pa.int64()), ("b", pa.float32())])),
                        ("m", pa.map_(pa.string(), pa.float64()))])      # a user's kept columns: by leaf
    assert write_options(nested)["use_dictionary"] == ["s.a", "m.key_value.key"]
    loc = resolve(str(tmp_path))
    write_table(loc, str(tmp_path / "t.parquet"), t)
    rg = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    cols = {rg.column(i).path_in_schema.split(".")[0]: rg.column(i) for i in range(rg.num_columns)}
    assert {c: "RLE_DICTIONARY" in m.encodings for c, m in cols.items()} == \
        {"id": True, "label": True, "mu": False, "q": True, "score": False, "half": False}
    assert {m.compression for m in cols.values()} == {"ZSTD"}
    assert pq.read_table(tmp_path / "t.parquet").equals(t)
    assert duckdb.sql(f"SELECT count(*), sum(mu[1]::DOUBLE) FROM read_parquet('{tmp_path}/t.parquet')").fetchone() == \
        pytest.approx((n, float(np.asarray(t.column("mu").combine_chunks().flatten())[::4].astype(np.float64).sum())))
