"""The approximate-neighbour index of a committed latents table, kept in the output's control folder:

    <parent>/_<name>.vaepipe/index/
        current.json        the pointer: which build is current, and what it was built from
        <build>/            one build: centroids.npy, offsets.npy, rows.npy, vectors.npy (pipeline.search.ivf)

A build reads the table as committed (the files its manifests name, in the order a query numbers
their rows), writes its arrays into a folder of its own, measures recall@k against an exact scan on
a sample of the table's records, and only then, still holding the output's lease, replaces the
pointer (one atomic write): a build killed at any point leaves the previous pointer and its arrays
(or none), never a half-written index; the next build removes what the killed one left.

The pointer names the files and row counts the index covers. A query uses the index only when they
are exactly the table's files now (`freshness`); after any commit the index is stale and the query
scans exactly, and says so. The pointer is read back from storage, so it is untrusted: every name in
it is checked before anything is opened."""
from __future__ import annotations

import json
import math
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.runtime.config import WriterConfig, opt
from pipeline.runtime.errors import ConfigError, InputError, ManifestError
from pipeline.search import ivf
from pipeline.search.knn import latent_matrix
from pipeline.search.latents import Latents
from pipeline.table.commit import control_of, pause_point, read_json, safe_name, safe_relpath, write_bytes_atomic
from pipeline.table.uris import Location

INDEX = "index"
POINTER = "current.json"
FORMAT = 1
KINDS = ("ivf-flat",)


@dataclass
class IndexConfig(WriterConfig):
    latents: str = opt("", "latents folder written by encode/nightly (the index is stored in its control folder)")
    column: str = opt("mu", "latent column")
    id_column: str = opt("id", "record id column: an integer one is kept in the index (`vaepipe serve` finds "
                               "neighbours of an id through it)")
    kind: str = opt("ivf-flat", "index kind: ivf-flat (k-means cells, exact distances inside the probed cells)",
                    choices=KINDS)
    lists: int = opt(0, "cells of the index (0: about 4·√rows)")
    target_recall: float = opt(0.95, "nprobe is the smallest power of two whose recall@k on the sample reaches this")
    recall_k: int = opt(10, "k of the recall measured at build time")
    recall_queries: int = opt(200, "records of the table used as queries to measure recall (each leaves itself out)")
    seed: int = opt(0, "seed of the k-means sample and the recall sample")
    extend: bool = opt(True, "keep the current build's cells for the files it already covers (a nightly's "
                             "unchanged partitions) and assign only new rows; a full rebuild when they are "
                             "less than half the table")

    def __post_init__(self) -> None:
        self.require("latents")
        self.check_writer()
        self.choice("kind", KINDS)
        if self.lists < 0:
            raise ConfigError(f"lists must be ≥ 0 (0: automatic), got {self.lists}")
        if not 0 < self.target_recall <= 1:
            raise ConfigError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.recall_k < 1 or self.recall_queries < 1:
            raise ConfigError(f"recall_k and recall_queries must be ≥ 1, got {self.recall_k}, {self.recall_queries}")


# --- where it lives, and whether it is the table's --------------------------------------------------

def index_home(out: Location) -> Location:
    return control_of(out).join(INDEX)


def read_pointer(out: Location) -> dict[str, Any] | None:
    """The validated pointer of the table's current index, or None when it has none."""
    home = index_home(out)
    path = posixpath.join(home.path, POINTER)
    p = read_json(home, path)
    if p is None:
        return None
    src = home.full(path)
    if not isinstance(p, dict) or p.get("format") != FORMAT or p.get("kind") not in KINDS:
        raise ManifestError(f"{src}: not an index pointer vaepipe writes (format {FORMAT}, kind in {KINDS})")
    safe_name(p.get("build"), f"{src}: build")
    files = p.get("files")
    if not isinstance(files, list) or not all(isinstance(f, list) and len(f) == 2 and isinstance(f[1], int)
                                              for f in files):
        raise ManifestError(f"{src}: 'files' must be a list of [path, rows]")
    for f in files:
        safe_relpath(f[0], f"{src}: file")
    for key in ("nprobe", "rows", "dim"):
        if not isinstance(p.get(key), int) or p[key] < 0:
            raise ManifestError(f"{src}: {key!r} must be a non-negative integer, got {p.get(key)!r}")
    return p


def identity(lat: Latents) -> list[list]:
    """The table as a query numbers its rows: each file (relative to the table) with its row count."""
    return [[posixpath.relpath(f, lat.loc.path) if f != lat.loc.path else posixpath.basename(f), int(m.num_rows)]
            for f, m in zip(lat.files, lat.meta)]


def freshness(pointer: dict[str, Any] | None, lat: Latents, column: str) -> str | None:
    """Why the index cannot answer for the table as it is now (None: it can)."""
    if pointer is None:
        return "the table has no index"
    if pointer.get("column") != column:
        return f"the index is over column {pointer.get('column')!r}, not {column!r}"
    now = identity(lat)
    if pointer["files"] != now:
        return (f"the index is stale: built from {len(pointer['files'])} file(s), {pointer['rows']:,} rows "
                f"(run {', '.join(pointer.get('runs', [])[-2:]) or '?'}); the table has been committed since "
                f"({len(now)} file(s), {sum(r for _, r in now):,} rows)")
    return None


def open_index(out: Location, pointer: dict[str, Any]) -> ivf.IVFFlat:
    home = index_home(out)
    return ivf.IVFFlat.load(home.fs, posixpath.join(home.path, pointer["build"]))


# --- building -------------------------------------------------------------------------------------

def _blocks(lat: Latents, column: str, id_column: str | None = None):
    """(first row, vectors (n, L) float32, ids or None) of every non-empty block of the table, in row order."""
    for start, t in lat.blocks([column] + ([id_column] if id_column else [])):
        if t.num_rows:
            if id_column and t.column(id_column).null_count:
                raise InputError(f"latents {lat.loc.uri!r}: id column {id_column!r} has null ids among rows "
                                 f"{start:,}..{start + t.num_rows - 1:,}; an index keeps integer ids only when all are set")
            ids = t.column(id_column).to_numpy().astype(np.int64, copy=False) if id_column else None
            yield start, latent_matrix(t.column(column), lat.metadata, lat.loc.uri), ids


def integer_ids(lat: Latents, id_column: str) -> bool:
    """Whether the table's ids can be kept in the index (an integer column without nulls is assumed;
    a null found while writing fails the build with a clear error)."""
    import pyarrow as pa

    return id_column in lat.schema.names and pa.types.is_integer(lat.schema.field(id_column).type)


def _gather(lat: Latents, column: str, want: np.ndarray, a: np.ndarray | None = None, c: np.ndarray | None = None,
            seed: int = 0) -> np.ndarray:
    """One pass over the table: the vectors of the sorted rows `want`; with `a` and `c`, also the cell
    of every row still at -1 in `a`, assigned to its nearest centre of `c` on the way."""
    out, dim = None, None
    for start, x, _ in _blocks(lat, column):
        if out is None:
            dim = x.shape[1]
            out = np.empty((len(want), dim), np.float32)
        lo, hi = np.searchsorted(want, [start, start + len(x)])
        out[lo:hi] = x[want[lo:hi] - start]
        if a is not None:
            todo = np.flatnonzero(a[start:start + len(x)] < 0)
            if len(todo):
                a[start + todo] = ivf.assign(x[todo], c, seed)
    if out is None:
        raise InputError(f"latents {lat.loc.uri!r} hold no rows: nothing to index")
    return out


def run_ids(lat: Latents) -> list[str]:
    """The runs whose files the table holds (vaepipe's part names end in the run id)."""
    out = set()
    for f in lat.files:
        base = posixpath.basename(f)
        if base.startswith("part-") and base.endswith(".parquet") and base.count("-") >= 2:
            out.add(base[len("part-00000-"):-len(".parquet")])
    return sorted(out)


def build_locked(out: Location, lease, cfg: IndexConfig, log=print) -> dict[str, Any]:
    """Build the index of the committed table at `out` while the caller holds its lease; returns
    the pointer written. Three streaming passes over the table, so memory holds the cell of each
    row (4 bytes), the k-means sample and one block, never the table: (1) the k-means sample and the
    recall queries, (2) every row's cell, (3) rows spilled into cell order (ivf.write_blocks) while
    the recall queries' exact neighbours are found by the exact scan's search. With `extend`, the
    current build's cells are kept for the files it covers and pass 1 reads no sample."""
    from pipeline.search.knn import BlockSearch
    from pipeline.table.parquet_io import list_parquet_files

    t0 = time.perf_counter()
    lat = Latents(out, list_parquet_files(out))
    if cfg.column not in lat.schema.names:
        raise InputError(f"latents {out.uri!r} have no column {cfg.column!r}; columns: {lat.schema.names}")
    n = lat.rows
    if n == 0:
        raise InputError(f"latents {out.uri!r} hold no rows: nothing to index")
    home, fs = index_home(out), out.fs
    build = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    folder = posixpath.join(home.path, build)
    files = identity(lat)
    rng = np.random.default_rng(cfg.seed)
    own = np.sort(rng.choice(n, min(n, cfg.recall_queries), replace=False))
    kept = previous_cells(out, files, cfg, log) if cfg.extend else None
    if kept is None:
        n_lists = min(n, cfg.lists or max(1, round(4 * math.sqrt(n))))
        pick = np.sort(rng.choice(n, min(n, ivf.SAMPLE_PER_LIST * n_lists), replace=False))
        both = np.union1d(pick, own)
        got = _gather(lat, cfg.column, both)                                             # pass 1
        c = ivf.kmeans(got[np.searchsorted(both, pick)], n_lists, ivf.KMEANS_ITERS, rng)
        queries = got[np.searchsorted(both, own)]
        del got
        a = np.full(n, -1, np.int32)
        extended = None
    else:
        c, a, extended = kept
        extended["assigned_rows"] = int((a < 0).sum())
    t_train = time.perf_counter() - t0
    q2 = _gather(lat, cfg.column, own, a, c, cfg.seed)                                   # pass 2
    queries = q2 if kept is not None else queries
    t_assign = time.perf_counter() - t0 - t_train
    k = min(cfg.recall_k, max(1, n - 1))
    truth = BlockSearch(queries, min(k + 1, n))
    with_ids = integer_ids(lat, cfg.id_column)
    nbytes = ivf.write_blocks(fs, folder, _blocks(lat, cfg.column, cfg.id_column if with_ids else None), c, a,
                              queries.shape[1], on_block=lambda start, x: truth.add(x, start),
                              with_ids=with_ids)                                        # pass 3
    del a
    t_write = time.perf_counter() - t0 - t_train - t_assign
    index = ivf.IVFFlat.load(fs, folder)
    nprobe, recall, tried = ivf.tune_nprobe(index, queries, own, truth.result.rows, k, cfg.target_recall)
    pointer = {"format": FORMAT, "kind": cfg.kind, "build": build, "column": cfg.column, "dim": int(queries.shape[1]),
               "rows": int(n), "files": files, "runs": run_ids(lat),
               "id_column": cfg.id_column if with_ids else None,
               "lists": int(index.n_lists), "nprobe": int(nprobe),
               "recall": {"k": k, "queries": int(len(own)), "at_nprobe": round(float(recall), 4),
                          "tried": {str(p): round(float(r), 4) for p, r in tried.items()}},
               "extended": extended, "bytes": int(nbytes), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "seconds": {"sample_and_train": round(t_train, 2), "assign": round(t_assign, 2),
                           "write": round(t_write, 2),
                           "recall": round(time.perf_counter() - t0 - t_train - t_assign - t_write, 2)}}
    del index
    pause_point("index.pointer")
    lease.check()
    write_bytes_atomic(home, posixpath.join(home.path, POINTER), json.dumps(pointer, indent=1).encode())
    sweep(home, keep=build)
    log(f"index: {pointer['kind']} over {n:,} rows of {out.uri} ({pointer['lists']:,} cells, "
        f"{nbytes / 2**20:,.1f} MiB) in {time.perf_counter() - t0:.1f} s; recall@{k} {recall:.4f} at nprobe "
        f"{nprobe} on {len(own)} of its records" + (f"; kept the cells of {extended['kept_rows']:,} rows"
                                                      if extended else ""))
    return pointer


def previous_cells(out: Location, files: list[list], cfg: IndexConfig, log) -> tuple | None:
    """(centres, cell of each row or -1 for rows the current build does not cover, a note) when the
    current build covers at least half of the table's rows through files that are still there,
    unchanged (same name, same rows: vaepipe never rewrites a part in place); else None."""
    try:
        prev = read_pointer(out)
    except ManifestError as e:   # a pointer vaepipe did not write: rebuild from scratch (and replace it)
        log(f"index: the current pointer is not usable ({e}); building from scratch")
        return None
    if prev is None or prev["column"] != cfg.column or prev["kind"] != cfg.kind or (cfg.lists and cfg.lists != prev["lists"]):
        return None
    start, pos = {}, 0
    for path, rows in prev["files"]:
        start[path] = (pos, rows)
        pos += rows
    n = sum(r for _, r in files)
    covered = sum(r for p, r in files if start.get(p, (0, -1))[1] == r)
    if covered < n / 2:
        return None
    try:
        old = open_index(out, prev)
        c = np.array(old.centroids)
        if c.shape[1] != prev["dim"] or int(old.offsets[-1]) != prev["rows"]:
            return None
        cell = np.repeat(np.arange(len(c), dtype=np.int32), np.diff(np.asarray(old.offsets)))
        old_a = np.empty(prev["rows"], np.int32)
        old_a[np.asarray(old.rows)] = cell
    except (OSError, ValueError, IndexError) as e:
        log(f"index: the current build cannot be read ({type(e).__name__}: {e}); building from scratch")
        return None
    a = np.full(n, -1, np.int32)
    pos = 0
    for path, rows in files:
        o = start.get(path)
        if o is not None and o[1] == rows:
            a[pos:pos + rows] = old_a[o[0]:o[0] + rows]
        pos += rows
    return c, a, {"from_build": prev["build"], "kept_rows": int(covered)}


def sweep(home: Location, keep: str) -> None:
    """Remove every build folder but `keep`, and temporary pointers of killed writes (under the lease
    no other build runs). A reader that still maps an old build's files keeps them (local) or falls
    back to an exact scan when they are gone (query.open_index)."""
    try:
        entries = home.fs.ls(home.path, detail=False)
    except FileNotFoundError:
        return
    for p in entries:
        name = posixpath.basename(p.rstrip("/"))
        if name in (keep, POINTER):
            continue
        try:
            home.fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass


def build_index(cfg: IndexConfig, log=print) -> dict[str, Any]:
    """`vaepipe index`: take the output's lease, build, commit the pointer."""
    from pipeline.table.lease import hold_lease
    from pipeline.table.uris import resolve

    out = resolve(cfg.latents)
    if not out.fs.exists(out.path):
        raise InputError(f"latents {cfg.latents!r} do not exist")
    with hold_lease(control_of(out), out.uri, "index", cfg.lease_ttl, cfg.wait) as lease:
        return build_locked(out, lease, cfg, log)
