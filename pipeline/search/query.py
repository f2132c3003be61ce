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
import os
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.search import latent_cache
from pipeline.runtime.config import RuntimeConfig, opt
from pipeline.runtime.errors import ConfigError, InputError, SchemaError
from pipeline.search.knn import BlockSearch, from_np, latent_matrix, np_dtype, string_array, to_np, unique_first

if TYPE_CHECKING:   # imported where used: a cached query of a local table needs neither
    import pyarrow.parquet as pq

    from pipeline.table.uris import Location

FORMATS = ("table", "jsonl", "csv")
CACHE_MODES = ("auto", "off")
BLOCK_ROWS = 262_144     # a larger row group is read in slices of this many rows


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


# --- reading --------------------------------------------------------------------------------------

class Latents:
    """The files of a latents folder with their footers: global row numbers, row-group offsets."""

    def __init__(self, loc: Location, files: list[str]):
        from pipeline.table.parquet_io import partition_values, read_footer

        self.loc, self.files = loc, files
        self.afs = loc.arrow_fs()
        self.meta = []
        for path in files:
            self.meta.append(read_footer(loc, path))
        self.file_start = np.cumsum([0] + [m.num_rows for m in self.meta])
        self.rg_start = [np.cumsum([0] + [m.row_group(i).num_rows for i in range(m.num_row_groups)])
                         for m in self.meta]
        first = next((m for m in self.meta if m.num_rows), self.meta[0])
        schema = first.schema.to_arrow_schema()
        self.metadata = schema.metadata or {}
        # hive partition values live in the folder names (nightly's date=…/): string columns, as a hive reader adds
        self.parts = [partition_values(posixpath.relpath(p, loc.path)) for p in files]
        self.part_keys = sorted({k for d in self.parts for k in d} - set(schema.names))
        for k in self.part_keys:
            schema = schema.append(pa.field(k, pa.string()))
        self.schema = schema
        self.cached: latent_cache.CachedBlocks | None = None   # set by use_cache when an entry matches

    def use_cache(self, cache: latent_cache.LatentCache, columns: list[str]) -> bool:
        """Serve reads of `columns` (or fewer) from `cache` when its entry exists and is whole."""
        self.cached = cache.open(columns)
        return self.cached is not None

    def from_cache(self, columns: list[str]) -> bool:
        """Whether reads of `columns` come from the cache."""
        return self.cached is not None and set(columns) <= set(self.cached.schema.names)

    @property
    def rows(self) -> int:
        return int(self.file_start[-1])

    def open(self, i: int) -> pq.ParquetFile:
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.afs.open_input_file(self.files[i]), metadata=self.meta[i], pre_buffer=True)

    def pieces(self, row_groups: dict[int, list[int]] | None = None) -> list[tuple[int, int, int, int]]:
        """(file, row group, first row in it, rows) for every row group, or slice of a large one."""
        out = []
        for i, md in enumerate(self.meta):
            for rg in (range(md.num_row_groups) if row_groups is None else row_groups.get(i, [])):
                n = md.row_group(rg).num_rows
                for lo in range(0, max(n, 1), BLOCK_ROWS):
                    out.append((i, rg, lo, min(n, lo + BLOCK_ROWS) - lo))
        return out

    def read_piece(self, piece: tuple[int, int, int, int], columns: list[str]) -> tuple[int, pa.Table]:
        """(global first row, table) of one piece, with any hive partition columns asked for."""
        parts = [c for c in columns if c in self.part_keys]
        if not parts:
            return self._read_piece(piece, columns)
        start, t = self._read_piece(piece, [c for c in columns if c not in parts])
        for c in parts:
            t = t.append_column(c, pa.array([self.parts[piece[0]].get(c)] * t.num_rows, pa.string()))
        return start, t.select(columns)

    def _read_piece(self, piece: tuple[int, int, int, int], columns: list[str]) -> tuple[int, pa.Table]:
        i, rg, lo, n = piece
        start = int(self.file_start[i] + self.rg_start[i][rg]) + lo
        try:
            pf = self.open(i)
            if lo == 0 and n == self.meta[i].row_group(rg).num_rows:
                return start, pf.read_row_group(rg, columns=columns, use_threads=False)
            batches = pf.iter_batches(batch_size=BLOCK_ROWS, row_groups=[rg], columns=columns, use_threads=False)
            for j, b in enumerate(batches):
                if j * BLOCK_ROWS == lo:
                    return start, pa.Table.from_batches([b])
            raise InputError(f"{self.loc.full(self.files[i])}: row group {rg} is shorter than its footer says")
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{self.loc.full(self.files[i])}: cannot read Parquet "
                             f"({type(e).__name__}: {str(e)[:200]})") from None

    def blocks(self, columns: list[str], row_groups: dict[int, list[int]] | None = None, threads: int | None = None):
        """(global first row, table) for every row group (or slice of a large one), in order, decoded
        by `threads` reader threads (default: one per core, at most 4) a few pieces ahead of the
        consumer: pyarrow decodes without the GIL, so the cores decode while the caller scores. A
        full scan of cached columns reads the memory-mapped cache instead (no decoding at all)."""
        if row_groups is None and self.from_cache(columns):
            yield from self.cached.blocks(columns)
            return
        pieces = self.pieces(row_groups)
        threads = threads or min(4, os.cpu_count() or 1)
        if threads <= 1 or len(pieces) <= 1:
            for p in pieces:
                yield self.read_piece(p, columns)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix="vaepipe-read") as ex:
            window = [ex.submit(self.read_piece, p, columns) for p in pieces[:threads + 1]]
            nxt = len(window)
            try:
                while window:
                    item = window.pop(0).result()
                    if nxt < len(pieces):
                        window.append(ex.submit(self.read_piece, pieces[nxt], columns))
                        nxt += 1
                    yield item
            finally:
                for f in window:
                    f.cancel()

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global rows → (file index, row group, row inside the row group)."""
        fi = np.searchsorted(self.file_start, rows, side="right") - 1
        rg = np.empty_like(rows)
        local = np.empty_like(rows)
        for f in unique_first(fi)[0]:
            sel = fi == f
            r = rows[sel] - self.file_start[f]
            g = np.searchsorted(self.rg_start[f], r, side="right") - 1
            rg[sel], local[sel] = g, r - self.rg_start[f][g]
        return fi, rg, local

    def take(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """The `columns` of the given global rows, in that order (reads their row groups only, or the
        cache)."""
        if not columns or len(rows) == 0:
            return self.schema.empty_table().select(columns)
        if self.from_cache(columns):
            return self.cached.take(rows, columns)
        fi, rg, local = self.locate(rows)
        groups = {}
        parts = [c for c in columns if c in self.part_keys]
        for f, g in sorted(set(zip(fi.tolist(), rg.tolist()))):
            t = self.open(f).read_row_group(g, columns=[c for c in columns if c not in parts])
            for c in parts:   # hive partition values from the file's folder names
                t = t.append_column(c, pa.array([self.parts[f].get(c)] * t.num_rows, pa.string()))
            groups[f, g] = t.select(columns)
        if len(rows) <= 4096:   # one-row slices: no pyarrow.compute import for a few winners
            return pa.concat_tables([groups[f, g].slice(r, 1) for f, g, r in zip(fi.tolist(), rg.tolist(),
                                                                                local.tolist())])
        pieces, order = [], []
        for (f, g), t in groups.items():
            sel = np.flatnonzero((fi == f) & (rg == g))
            pieces.append(t.take(from_np(local[sel])))
            order.append(sel)
        t = pa.concat_tables(pieces)
        return t.take(from_np(np.argsort(np.concatenate(order), kind="stable")))


class CachedLatents:
    """A local table served wholly from its cache entry, found through the entry's note
    (latent_cache.find_local): the same reads as Latents, no footer or Parquet page opened. Its
    schema is the cached columns' (all but logvar), with the table's metadata."""

    def __init__(self, cached: latent_cache.CachedBlocks):
        self.cached, self.schema = cached, cached.schema
        self.metadata = self.schema.metadata or {}
        self.rows = int(cached.starts[-1])

    def from_cache(self, columns: list[str]) -> bool:
        return set(columns) <= set(self.schema.names)

    def blocks(self, columns: list[str], row_groups: dict[int, list[int]] | None = None, threads: int | None = None):
        assert row_groups is None, "a cached table is scanned whole"
        return self.cached.blocks(columns)

    def take(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        return self.cached.take(rows, columns)


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
    if cfg.cache == "auto":
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


def cached_columns(schema: pa.Schema) -> list[str]:
    """What the cache holds: every column a query reads (μ, ids, --where and printed columns), all
    but logvar."""
    return [c for c in schema.names if c != "logvar"]


def run_query(cfg: QueryConfig) -> pa.Table:
    lat, cache, ident = open_latents(cfg)
    schema = lat.schema
    keep = [c for c in schema.names if c not in (cfg.column, "logvar")]
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

    search = BlockSearch(queries, cfg.k)
    exclude = ids is not None and cfg.exclude_self
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
    return result_table(lat, search, labels, keep)


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


def result_table(lat: Latents | CachedLatents, search: BlockSearch, labels: pa.Array, keep: list[str]) -> pa.Table:
    """query, rank, distance and the kept columns of each neighbour, ordered by query then rank."""
    d, rows = search.result.d, search.result.rows
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
