"""`vaepipe query`: k nearest neighbours by Euclidean distance on μ over a latents folder, streaming
file by file (memory bounded by one file's columns plus k rows), with an optional row filter."""
from __future__ import annotations

import heapq
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.config import RuntimeConfig, opt
from pipeline.errors import ConfigError, InputError, SchemaError
from pipeline.parquet_io import list_parquet_files, read_table
from pipeline.uris import resolve


@dataclass
class QueryConfig(RuntimeConfig):
    latents: str = opt("", "latents folder written by encode/nightly")
    id: list[str] = opt(help="find neighbours of the record with this id (repeatable)", factory=list)
    id_column: str = opt("id", "id column")
    vector: list[float] = opt(help="find neighbours of this μ vector: v1,v2,…", factory=list)
    k: int = opt(5, "neighbours per query")
    where: str | None = opt(None, "row filter on kept columns, e.g. \"label = 3\" or \"label IN (1, 7)\"")
    column: str = opt("mu", "latent column")
    exclude_self: bool = opt(True, "with --id, leave the query record out of its own neighbours")

    def __post_init__(self) -> None:
        self.require("latents")
        if bool(self.id) == bool(self.vector):
            raise ConfigError("give exactly one of --id or --vector")
        if self.k < 1:
            raise ConfigError(f"k must be ≥ 1, got {self.k}")


def parse_where(expr: str | None, schema: pa.Schema) -> pc.Expression | None:
    """A small, safe filter language: `col OP value [AND col OP value …]`, OP in = != < <= > >= IN."""
    if not expr:
        return None
    import re

    out = None
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
            return pa.scalar(s).cast(typ).as_py() if not pa.types.is_string(typ) else s

        f = pc.field(col)
        if op == "in":
            items = [val(v) for v in raw.strip("()").split(",") if v.strip()]
            e = f.isin(items)
        else:
            v = val(raw)
            e = {"=": f == v, "==": f == v, "!=": f != v, "<": f < v, "<=": f <= v, ">": f > v, ">=": f >= v}[op]
        out = e if out is None else out & e
    return out


def _latents(table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise SchemaError(f"column {column!r} is {col.type}, expected fixed_size_list of numbers")
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), col.type.list_size)
    scale = (table.schema.metadata or {}).get(b"vaepipe.int8_scale")
    if pa.types.is_int8(col.type.value_type) and scale:
        x = x * np.asarray(json.loads(scale), np.float32)
    return x


def run_query(cfg: QueryConfig) -> pa.Table:
    loc = resolve(cfg.latents)
    files = list_parquet_files(loc)
    if not files:
        raise InputError(f"latents {cfg.latents!r} hold no Parquet files")
    first = read_table(loc, files[0])
    schema = first.schema
    if cfg.column not in schema.names:
        raise SchemaError(f"{loc.full(files[0])}: no column {cfg.column!r}; columns: {schema.names}")
    keep = [c for c in schema.names if c not in (cfg.column, "logvar")]
    flt = parse_where(cfg.where, schema)

    if cfg.vector:
        queries = [(None, np.asarray(cfg.vector, np.float32))]
    else:
        if cfg.id_column not in schema.names:
            raise SchemaError(f"latents have no id column {cfg.id_column!r}; columns: {schema.names}")
        queries = _find_ids(loc, files, cfg)
    dim = _latents(first.slice(0, 1), cfg.column).shape[1] if first.num_rows else None
    for _, q in queries:
        if dim is not None and q.shape[0] != dim:
            raise SchemaError(f"query vector has {q.shape[0]} values, latents have {dim}")

    # One bounded heap per query: (-distance, tiebreak, row) keeps the k smallest distances.
    heaps: list[list] = [[] for _ in queries]
    counter = 0
    for path in files:
        t = read_table(loc, path)
        if flt is not None:
            t = pads.dataset(t).to_table(filter=flt)
        if t.num_rows == 0:
            continue
        x = _latents(t, cfg.column)
        for qi, (qid, q) in enumerate(queries):
            d = np.sqrt(((x - q) ** 2).sum(1))
            if qid is not None and cfg.exclude_self:
                d = np.where(np.asarray(t.column(cfg.id_column).to_pylist(), dtype=object) == qid, np.inf, d)
            take = np.argsort(d)[: cfg.k]
            for i in take:
                if not np.isfinite(d[i]):
                    continue
                counter += 1
                item = (-float(d[i]), counter, {c: t.column(c)[int(i)].as_py() for c in keep})
                if len(heaps[qi]) < cfg.k:
                    heapq.heappush(heaps[qi], item)
                elif item[0] > heaps[qi][0][0]:
                    heapq.heapreplace(heaps[qi], item)
    rows = []
    for qi, (qid, _) in enumerate(queries):
        for rank, (negd, _, row) in enumerate(sorted(heaps[qi], key=lambda it: -it[0]), 1):
            rows.append({"query": str(qid) if qid is not None else "vector", "rank": rank, "distance": -negd, **row})
    return pa.Table.from_pylist(rows) if rows else pa.table({"query": [], "rank": [], "distance": []})


def _find_ids(loc, files, cfg: QueryConfig):
    found: dict[str, np.ndarray] = {}
    want = set(cfg.id)
    for path in files:
        t = read_table(loc, path, [cfg.id_column, cfg.column])
        ids = [str(v) for v in t.column(cfg.id_column).to_pylist()]
        hits = [i for i, v in enumerate(ids) if v in want and v not in found]
        if hits:
            x = _latents(t.take(pa.array(hits)), cfg.column)
            for j, i in enumerate(hits):
                found[ids[i]] = x[j]
        if len(found) == len(want):
            break
    missing = [i for i in cfg.id if i not in found]
    if missing:
        raise InputError(f"id(s) {missing} not found in column {cfg.id_column!r} of {cfg.latents!r}")
    # Keep the id's original type for the self-exclusion comparison.
    return [(_typed(loc, files, cfg, i), found[i]) for i in cfg.id]


def _typed(loc, files, cfg, value: str):
    typ = read_table(loc, files[0], [cfg.id_column]).schema.field(cfg.id_column).type
    return value if pa.types.is_string(typ) or pa.types.is_large_string(typ) else pa.scalar(value).cast(typ).as_py()


def format_table(t: pa.Table, max_rows: int = 50) -> str:
    cols = t.schema.names
    rows = [[_fmt(v) for v in r.values()] for r in t.slice(0, max_rows).to_pylist()]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, rows)])


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
