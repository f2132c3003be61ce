"""`vaepipe query`: exact k nearest neighbours by Euclidean distance on μ over a latents folder, for
one or many query records (`--id`, repeated, or `--ids-file`) or vectors, in one streaming pass.

The path is kept light on purpose (a query is a short process): numpy, pyarrow and fsspec only; no
torch, Ray or MLflow import; a repeated query of a local table whose cache entry matches it imports
neither fsspec nor pyarrow's Parquet module (latent_cache.find_local). The latents are read row
group by row group (only the id, μ and any `--where` columns) by reader threads, a few row groups ahead, while the main thread scores
(`pipeline.search.knn`: one matrix product per block, then an exact re-score of the few rows that can still
make the k nearest), so memory is one or two row groups plus k rows per query, whatever the size of
the input. The kept columns of the winners are read at the end, from their row groups only. The
first full scan also keeps the columns in a local cache (pipeline.search.latent_cache) that later queries
of the same files read instead of Parquet.
Distances equal DuckDB's `array_distance` on the same FLOAT arrays."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.search import latent_cache
from pipeline.runtime.config import RuntimeConfig, opt
from pipeline.runtime.errors import ConfigError, InputError, SchemaError
from pipeline.search.knn import BlockSearch, from_np, latent_matrix, np_dtype, string_array, to_np, unique_first
from pipeline.search import ivf
from pipeline.search.latents import CachedLatents, Latents

if TYPE_CHECKING:   # imported where used: a cached query of a local table needs neither
    import pyarrow.parquet as pq

FORMATS = ("table", "jsonl", "csv")
NO_INDEX_NOTE_ROWS = 1_000_000   # a table this large without an index gets a line saying the scan is exact
CACHE_MODES = ("auto", "off")


@dataclass
class QueryConfig(RuntimeConfig):
    latents: str = opt("", "latents folder written by encode/nightly (or any Parquet folder/file)")
    id: list[str] = opt(help="find neighbours of the record with this id (repeatable, or comma-separated)",
                        factory=list)
    ids_file: str = opt("", "file of query ids, one per line (or a Parquet file with the id column)")
    id_column: str = opt("id", "id column")
    vector: list[float] = opt(help="find neighbours of this μ vector: v1,v2,… (several: repeat --vector)",
                              factory=list)
    k: int = opt(5, "neighbours per query")
    where: str | None = opt(None, "row filter on kept columns, e.g. \"label = 3\" or \"label IN (1, 7)\"")
    column: str = opt("mu", "latent column")
    exclude_self: bool = opt(True, "with --id, leave records with the query's id out of its neighbours")
    format: str = opt("table", "output: table, jsonl (one JSON object per row) or csv", choices=FORMATS)
    cache: str = opt("auto", "local memory-mapped copy of the latents' columns, all but logvar (pipeline.search.latent_cache): "
                             "auto = read it when it matches the files, else write it during the scan; off = "
                             "read the Parquet files only", choices=CACHE_MODES)
    cache_dir: str = opt("", "cache folder (default $VAEPIPE_CACHE_DIR, else ~/.cache/vaepipe/latents)")
    cache_max_gb: float = opt(latent_cache.DEFAULT_MAX_GB, "size budget of the cache folder: the least "
                                                           "recently used entries are deleted beyond it")
    exact: bool = opt(False, "scan every row even when the table has a fresh index (`vaepipe index`)")
    nprobe: int = opt(0, "cells of the index each query looks in (0: the value chosen at build time for its "
                         "measured recall)")

    def __post_init__(self) -> None:
        self.require("latents")
        if bool(self.id or self.ids_file) == bool(self.vector):
            raise ConfigError("give exactly one of --id / --ids-file or --vector")
        if self.k < 1:
            raise ConfigError(f"k must be ≥ 1, got {self.k}")
        self.choice("format", FORMATS)
        self.choice("cache", CACHE_MODES)
        if self.cache_max_gb <= 0:
            raise ConfigError(f"cache_max_gb must be > 0, got {self.cache_max_gb}")
        if self.nprobe < 0:
            raise ConfigError(f"nprobe must be ≥ 0 (0: the index's own), got {self.nprobe}")


# --- the --where filter ---------------------------------------------------------------------------

_OPS = {"=": np.equal, "==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal,
        ">": np.greater, ">=": np.greater_equal}


def parse_where(expr: str | None, schema: pa.Schema) -> list[tuple[str, str, Any]]:
    """A small, safe filter language: `col OP value [AND col OP value …]`, OP in = != < <= > >= IN.
    Returns (column, op, value or list of values), values cast to the column's type."""
    if not expr:
        return []
    out = []
    for clause in re.split(r"\s+(?i:and)\s+", expr.strip()):
        m = re.fullmatch(r"\s*(\w+)\s*(=|==|!=|<=|>=|<|>|(?i:in))\s*(.+?)\s*", clause)
        if not m:
            raise ConfigError(f"--where: cannot parse {clause!r}; expected e.g. \"label = 3\" or \"label IN (1, 2)\"")
        col, op, raw = m.group(1), m.group(2).lower(), m.group(3)
        if col not in schema.names:
            raise SchemaError(f"--where: column {col!r} not in latents; columns: {schema.names}")
        typ = schema.field(col).type

        def val(s: str):
            s = s.strip().strip("'\"")
            if pa.types.is_string(typ) or pa.types.is_large_string(typ):
                return s
            try:
                if pa.types.is_integer(typ):
                    return int(s)
                if pa.types.is_floating(typ):
                    return float(s)
                return pa.scalar(s).cast(typ).as_py()
            except (ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ConfigError(f"--where: {s!r} is not a valid {typ} value for column {col!r}") from None

        out.append((col, op, [val(v) for v in raw.strip("()").split(",") if v.strip()] if op == "in" else val(raw)))
    return out


def where_mask(t: pa.Table, clauses: list[tuple[str, str, Any]]) -> np.ndarray | None:
    """Rows of `t` that pass every clause (None: no filter). Nulls never pass."""
    if not clauses:
        return None
    mask = np.ones(t.num_rows, bool)
    for col, op, v in clauses:
        c = t.column(col)
        if c.null_count or pa.types.is_string(c.type) or pa.types.is_large_string(c.type) or \
                pa.types.is_dictionary(c.type):
            import pyarrow.compute as pc   # only for strings / nulls: keeps the common path light

            if op == "in":
                hit = pc.is_in(c, value_set=pa.array(v, c.type if not pa.types.is_dictionary(c.type)
                                                     else c.type.value_type))
            else:
                fn = {"=": "equal", "==": "equal", "!=": "not_equal", "<": "less", "<=": "less_equal",
                      ">": "greater", ">=": "greater_equal"}[op]
                hit = pc.call_function(fn, [c, pa.scalar(v)])
            mask &= np.asarray(hit.fill_null(False).to_numpy(zero_copy_only=False), bool)
        else:
            a = to_np(c)
            mask &= np.isin(a, np.asarray(v, a.dtype)) if op == "in" else _OPS[op](a, v)
    return mask


# --- query ids ------------------------------------------------------------------------------------

def read_ids_file(path: str) -> list[str]:
    """Query ids from a text file (one per line, blank lines and '#' comments skipped) or from the
    first column of a Parquet file."""
    from pipeline.table.uris import resolve

    loc = resolve(path)
    if not loc.fs.exists(loc.path):
        raise InputError(f"ids file {path!r} does not exist")
    if path.endswith((".parquet", ".parq")):
        import pyarrow.parquet as pq

        with loc.fs.open(loc.path, "rb") as f:
            t = pq.read_table(f)
        return [str(v) for v in t.column(0).drop_null().to_pylist()]
    with loc.fs.open(loc.path, "rt") as f:
        return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]


def typed_ids(values: list[str], typ: pa.DataType, column: str) -> pa.Array:
    """Query ids as an Arrow array of the id column's type, duplicates removed (first kept)."""
    values = list(dict.fromkeys(values))
    try:
        if pa.types.is_integer(typ) or pa.types.is_floating(typ):
            conv = int if pa.types.is_integer(typ) else float
            return from_np(np.array([conv(v) for v in values], np_dtype(typ)))
        if pa.types.is_string(typ):
            return string_array(values)
        return pa.array(values, pa.string()).cast(typ)
    except (ValueError, OverflowError):
        raise InputError(f"query id(s) {values[:5]} are not valid values of id column {column!r} ({typ})") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"query id(s) {values[:5]} are not valid values of id column {column!r} ({typ})") from None


def match_ids(block_ids: pa.Array | pa.ChunkedArray, wanted: pa.Array, wanted_np: np.ndarray | None) -> np.ndarray:
    """For each row of a block, the index of its id in `wanted`, or -1."""
    if wanted_np is not None:   # numeric ids: numpy, no pyarrow.compute import
        a = (block_ids.combine_chunks() if isinstance(block_ids, pa.ChunkedArray) else block_ids)
        if a.null_count == 0:
            a = to_np(a)
            order = np.argsort(wanted_np, kind="stable")
            srt = wanted_np[order]
            pos = np.clip(np.searchsorted(srt, a), 0, len(srt) - 1)
            return np.where(srt[pos] == a, order[pos], -1)
    import pyarrow.compute as pc

    return np.asarray(pc.index_in(block_ids, value_set=wanted).fill_null(-1).to_numpy(zero_copy_only=False), np.int64)


def _may_hold(md: pq.FileMetaData, rg: int, col_index: int, lo, hi) -> bool:
    """Row-group statistics: can this row group hold an id in [lo, hi]? (True when unknown.)"""
    try:
        st = md.row_group(rg).column(col_index).statistics
        if st is None or not st.has_min_max:
            return True
        return not (st.max < lo or st.min > hi)
    except (TypeError, ValueError, pa.ArrowException):   # statistics of another type, or unreadable
        return True


def find_queries(lat: Latents | CachedLatents, cfg: QueryConfig, ids: pa.Array) -> np.ndarray:
    """The latent vector of each query id (its first occurrence), reading only the id column of the
    row groups whose statistics allow it, then μ of the row groups that hold a hit."""
    wanted_np = to_np(ids) if pa.types.is_integer(ids.type) else None
    lo, hi = (wanted_np.min(), wanted_np.max()) if wanted_np is not None and len(wanted_np) else (None, None)
    col_index = lat.schema.names.index(cfg.id_column)
    candidates: dict[int, list[int]] | None = None   # None: every row group (the cache: a scan of memory)
    if not lat.from_cache([cfg.id_column]):
        candidates = {}
        for i, md in enumerate(lat.meta):
            for rg in range(md.num_row_groups):
                if wanted_np is None or _may_hold(md, rg, col_index, lo, hi):
                    candidates.setdefault(i, []).append(rg)
    found = np.full(len(ids), -1, np.int64)     # global row of each query id
    for start, t in lat.blocks([cfg.id_column], candidates):
        hit = match_ids(t.column(cfg.id_column), ids, wanted_np)
        rows = np.flatnonzero(hit >= 0)
        if len(rows):
            qi = hit[rows]
            new = found[qi] < 0
            # first occurrence of each id: the lowest row, scanned in order
            qi, rows = qi[new], rows[new]
            _, first = unique_first(qi)
            found[qi[first]] = start + rows[first]
        if (found >= 0).all():
            break
    if (found < 0).any():
        missing = [v for v, f in zip(ids.to_pylist(), found) if f < 0]
        raise InputError(f"id(s) {missing[:20]}{' …' if len(missing) > 20 else ''} not found in column "
                         f"{cfg.id_column!r} of {cfg.latents!r}")
    t = lat.take(found, [cfg.column])
    return latent_matrix(t.column(cfg.column), lat.metadata, cfg.latents)


# --- the query ------------------------------------------------------------------------------------

def open_latents(cfg: QueryConfig) -> tuple[Latents | CachedLatents, latent_cache.LatentCache | None, str | None]:
    """The table to query; the cache entry to write during the scan (None: nothing to write); the
    local table's tree identity, for the note that lets the next query skip this (None: not local)."""
    if cfg.cache == "auto" and (cfg.exact or not _may_have_index(cfg.latents)):
        hit = latent_cache.find_local(cfg.latents, cfg.cache_dir or None, cfg.cache_max_gb)
        if hit is not None and cfg.column in hit.schema.names:
            return CachedLatents(hit), None, None
    from pipeline.table.parquet_io import list_parquet_files
    from pipeline.table.uris import is_local_fs, resolve

    loc = resolve(cfg.latents)
    # taken before the listing: a change made while this query lists the table leaves no note behind
    ident = latent_cache.tree_identity(loc.path) if cfg.cache == "auto" and is_local_fs(loc.fs) else None
    files = list_parquet_files(loc)
    if not files:
        raise InputError(f"latents {cfg.latents!r} hold no Parquet files")
    lat = Latents(loc, files)
    schema = lat.schema
    if cfg.column not in schema.names:
        raise SchemaError(f"{loc.full(files[0])}: no column {cfg.column!r}; columns: {schema.names}")
    if cfg.cache != "auto":
        return lat, None, None
    cache_cols = cached_columns(schema)
    cache = latent_cache.LatentCache(latent_cache.cache_key(loc.uri, loc.fs, files, cache_cols), lat.rows,
                                     cfg.cache_dir or None, cfg.cache_max_gb)
    if lat.use_cache(cache, cache_cols):
        cache.remember(ident, loc.path)
        return lat, None, None
    return lat, cache, ident


def _may_have_index(uri: str) -> bool:
    """Whether the table may have an index (the short path of a cached local table does not check
    one): always for remote tables, which do not take that path anyway."""
    import os

    if "://" in uri and not uri.startswith("file://"):
        return True
    return os.path.exists(latent_cache.local_index_pointer(uri.removeprefix("file://")))


def cached_columns(schema: pa.Schema) -> list[str]:
    """What the cache holds: every column a query reads (μ, ids, --where and printed columns), all
    but logvar."""
    return [c for c in schema.names if c != "logvar"]


def run_query(cfg: QueryConfig, say=None) -> pa.Table:
    """The neighbours table: from the table's index when it is fresh (and not --exact), else by an
    exact scan; `say` (default: stderr) gets one line when an index exists but cannot answer."""
    say = say or _stderr
    lat, cache, ident = open_latents(cfg)
    schema = lat.schema
    keep = [c for c in schema.names if c not in (cfg.column, "mu", "logvar", "embedding")]   # encode's vectors
    cache_cols = cached_columns(schema)
    clauses = parse_where(cfg.where, schema)
    vtype = schema.field(cfg.column).type
    dim = vtype.list_size if pa.types.is_fixed_size_list(vtype) else None

    ids = None
    if cfg.vector:
        v = np.asarray(cfg.vector, np.float32)
        if dim is not None and len(v) % dim:
            raise SchemaError(f"query vector has {len(v)} values, latents have {dim}")
        queries = v.reshape(-1, dim or len(v))
        labels = string_array(["vector"] if len(queries) == 1 else [f"vector {i}" for i in range(len(queries))])
    else:
        if cfg.id_column not in schema.names:
            raise SchemaError(f"latents have no id column {cfg.id_column!r}; columns: {schema.names}")
        raw = [*cfg.id, *(read_ids_file(cfg.ids_file) if cfg.ids_file else [])]
        if not raw:
            raise ConfigError(f"no query ids in {cfg.ids_file!r}")
        ids = typed_ids(raw, schema.field(cfg.id_column).type, cfg.id_column)
        queries = find_queries(lat, cfg, ids)
        labels = string_array([str(v) for v in ids.to_pylist()])
    if dim is not None and queries.shape[1] != dim:
        raise SchemaError(f"query vector has {queries.shape[1]} values, latents have {dim}")

    exclude = ids is not None and cfg.exclude_self
    found = None if cfg.exact or not isinstance(lat, Latents) else \
        indexed_search(lat, cfg, queries, ids, clauses, exclude, say)
    if found is not None:   # (nothing was scanned, so no cache entry is written)
        return result_table(lat, *found, labels, keep)
    search = BlockSearch(queries, cfg.k)
    cols = list(dict.fromkeys([*([cfg.id_column] if exclude else []), *(c for c, _, _ in clauses), cfg.column,
                               *(cache_cols if cache else [])]))
    writer = cache.writer(schema_of(schema, cache_cols)) if cache else None
    try:
        scan(lat, cfg, search, cols, clauses, ids, exclude, writer)
    except BaseException:
        if writer:
            writer.abort()
        raise
    if writer and writer.commit():
        cache.remember(ident, lat.loc.path)
    return result_table(lat, search.result.d, search.result.rows, labels, keep)


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


ROUNDS = 4   # widenings of a filtered index search before it gives way to the exact scan


def indexed_search(lat: Latents, cfg: QueryConfig, queries: np.ndarray, ids: pa.Array | None, clauses: list,
                   exclude: bool, say) -> tuple[np.ndarray, np.ndarray] | None:
    """(squared distances, rows) (Q, k) from the table's index when it is fresh, else None (and a
    line through `say` saying why the scan is exact). With `--where` or a query's own record to leave
    out, the index's candidates are checked against the table's columns (exact re-scoring of a wider
    candidate list), widened until every query has k that pass."""
    from pipeline.search import ann

    try:
        pointer = ann.read_pointer(lat.loc)
    except ConfigError:   # a table with no control folder (a bare file, a bucket root): no index
        return None
    why = ann.freshness(pointer, lat, cfg.column)
    if why is None:
        try:
            index = ann.open_index(lat.loc, pointer)
        except (FileNotFoundError, ValueError, OSError) as e:   # replaced by a new build as we read it
            why = f"the index could not be opened ({type(e).__name__}: {str(e)[:120]})"
    if why is not None:
        if pointer is not None or lat.rows >= NO_INDEX_NOTE_ROWS:
            say(f"query: exact scan of {lat.rows:,} rows: {why}"
                + ("" if pointer is None else f"; `vaepipe index --latents {cfg.latents}` rebuilds it"))
        return None
    if queries.shape[1] != pointer["dim"]:
        raise SchemaError(f"query vector has {queries.shape[1]} values, the index has {pointer['dim']}")
    need = list(dict.fromkeys([*([cfg.id_column] if exclude else []), *(c for c, _, _ in clauses)]))
    nprobe = cfg.nprobe or pointer["nprobe"]
    k = cfg.k
    width = k + (1 if exclude else 0) if not clauses else max(4 * k, 64)
    for _ in range(ROUNDS):
        d, rows = ivf.search(index, queries, width, nprobe)
        if not need:
            return d[:, :k], rows[:, :k]
        got = _passing(lat, cfg, d, rows, ids, clauses, exclude, k)
        short = [i for i in range(len(rows)) if (got[1][i] < 0).any()]
        # a short query whose candidate list was not full has seen every record of its probed cells;
        # when those are all the cells, fewer than k records pass at all: the answer is complete
        if not short or (nprobe >= index.n_lists and not any((rows[i] >= 0).all() for i in short)):
            return got
        width, nprobe = width * 4, min(index.n_lists, nprobe * 2)
    say(f"query: exact scan: the filter keeps fewer than {k} of the index's nearest candidates for "
        f"{len(short)} quer{'y' if len(short) == 1 else 'ies'}")
    return None


def _passing(lat: Latents, cfg: QueryConfig, d: np.ndarray, rows: np.ndarray, ids: pa.Array | None, clauses: list,
             exclude: bool, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k candidates of each query that pass --where and are not the query's own record."""
    uniq = np.unique(rows[rows >= 0])
    cols = list(dict.fromkeys([*([cfg.id_column] if exclude else []), *(c for c, _, _ in clauses)]))
    t = lat.take(uniq, cols)
    ok = where_mask(t, clauses)
    ok = np.ones(len(uniq), bool) if ok is None else ok
    own = t.column(cfg.id_column).to_pylist() if exclude else None
    qids = ids.to_pylist() if exclude else None
    d_out = np.full((len(rows), k), np.inf, np.float32)
    r_out = np.full((len(rows), k), -1, np.int64)
    for i in range(len(rows)):
        n = 0
        for dd, r in zip(d[i].tolist(), rows[i].tolist()):
            if r < 0 or n == k:
                break
            j = int(np.searchsorted(uniq, r))
            if ok[j] and not (exclude and own[j] == qids[i]):
                d_out[i, n], r_out[i, n] = dd, r
                n += 1
    return d_out, r_out


def schema_of(schema: pa.Schema, columns: list[str]) -> pa.Schema:
    """`columns` of `schema`, with its metadata (int8 scales, the model version)."""
    return pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)


def scan(lat: Latents | CachedLatents, cfg: QueryConfig, search: BlockSearch, cols: list[str], clauses: list, ids: pa.Array | None,
         exclude: bool, writer: latent_cache.CacheWriter | None) -> None:
    """One pass over the latents: each block scored for every query (after --where and leaving each
    query's own record out), and copied to the cache when one is being written."""
    wanted_np = to_np(ids) if exclude and pa.types.is_integer(ids.type) else None
    for start, t in lat.blocks(cols):
        if writer:
            writer.add(start, t)
        if t.num_rows == 0:
            continue
        x = latent_matrix(t.column(cfg.column), lat.metadata, cfg.latents)
        ex = None
        if exclude:
            hit = match_ids(t.column(cfg.id_column), ids, wanted_np)
            local = np.flatnonzero(hit >= 0)
            ex = (hit[local], local)
        mask = where_mask(t, clauses)
        if mask is None:
            search.add(x, start, ex)
            continue
        sel = np.flatnonzero(mask)
        if not len(sel):   # the filter keeps nothing of this block
            continue
        if ex is not None and len(ex[1]):
            pos = np.searchsorted(sel, ex[1])
            ok = (pos < len(sel)) & (sel[np.minimum(pos, len(sel) - 1)] == ex[1])
            ex = (ex[0][ok], pos[ok])
        search.add(x[sel], start, ex, row_ids=start + sel)


def result_table(lat: Latents | CachedLatents, d: np.ndarray, rows: np.ndarray, labels: pa.Array,
                 keep: list[str]) -> pa.Table:
    """query, rank, distance and the kept columns of each neighbour (squared distances and table
    rows (Q, k), inf / -1 where none), ordered by query then rank."""
    found = np.isfinite(d)
    qi, rank = np.nonzero(found)
    winners = rows[qi, rank]
    t = lat.take(winners, keep)
    names = labels.to_pylist()
    out = {"query": string_array([names[i] for i in qi.tolist()]),
           "rank": from_np((rank + 1).astype(np.int64)),
           "distance": from_np(np.sqrt(d[qi, rank]).astype(np.float32).astype(np.float64))}
    for c in keep:
        out[c] = t.column(c)
    return pa.table(out)


# --- printing -------------------------------------------------------------------------------------

def format_table(t: pa.Table, max_rows: int = 50) -> str:
    cols = t.schema.names
    rows = [[_fmt(v) for v in r.values()] for r in t.slice(0, max_rows).to_pylist()]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    more = [f"… {t.num_rows - max_rows:,} more rows (--format jsonl or csv prints all)"] if t.num_rows > max_rows else []
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, rows), *more])


def format_rows(t: pa.Table, fmt: str) -> str:
    """Every row as JSON lines or CSV (distances printed exactly: the float32 value's shortest repr)."""
    if fmt == "table":
        return format_table(t)
    recs = t.to_pylist()
    if fmt == "jsonl":
        return "\n".join(json.dumps(r, default=str) for r in recs)
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(t.schema.names)
    w.writerows([list(r.values()) for r in recs])
    return buf.getvalue().rstrip("\n")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v)
