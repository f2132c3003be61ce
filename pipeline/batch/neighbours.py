"""`vaepipe neighbours`: the k nearest neighbours of every record of a latents folder, as a batch job
on Ray Data, committed like encode's output (staging → manifest → _SUCCESS).

Work units are the row groups of the latents. A Ray Data actor takes a unit, cuts its rows into query
blocks of `block_rows` and, for each block, streams all the latents past it (`pipeline.search.knn`: one
matrix product per chunk, exact re-score of the rows that can still make the k nearest), so the
answer is exact and an actor holds one query block, one latents chunk and k rows per query, whatever
the input size. Each unit becomes one Parquet file: the id column, `neighbours` (list of ids,
nearest first) and `distances` (list of float32, DuckDB's `array_distance`). A record is never its own
neighbour (its row is excluded; other records with the same vector are not).

Exact search costs N² distance evaluations. `--index usearch` instead builds an HNSW index (the
optional `usearch` package: `pip install 'vaepipe[ann]'`) once in the driver, ships it to the actors,
which search it and re-score the candidates exactly; the driver then measures recall@k against exact
search on `--recall-sample` random records and prints it (also in the manifest)."""
from __future__ import annotations

import json
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.table.commit import control_of, read_table_manifest
from pipeline.runtime.config import WriterConfig, opt
from pipeline.runtime.errors import ConfigError, InputError, SchemaError
from pipeline.search.knn import BlockSearch, exact_sq, from_np, latent_matrix
from pipeline.table.parquet_io import Commit, list_parquet_files, write_options
from pipeline.search.latents import Latents
from pipeline.table.uris import resolve

INDEXES = ("exact", "usearch")


@dataclass
class NeighboursConfig(WriterConfig):
    input: str = opt("", "latents folder written by encode/nightly (or any Parquet folder with a latent column)")
    output: str = opt("", "output folder (committed atomically: manifest + _SUCCESS)")
    k: int = opt(10, "neighbours per record")
    id_column: str = opt("id", "id column (copied, and used for the neighbour ids)")
    column: str = opt("mu", "latent column")
    index: str = opt("exact", "exact (brute force, N² distances) or usearch (approximate HNSW index; "
                              "pip install 'vaepipe[ann]')", choices=INDEXES)
    block_rows: int = opt(2048, "query rows scored together against the latents")
    concurrency: int | None = opt(None, "Ray Data actors (default: CPU cores)")
    recall_sample: int = opt(1000, "--index usearch: records whose approximate neighbours are checked "
                                   "against exact search (recall@k)")
    ef: int = opt(64, "--index usearch: search expansion (higher: better recall, slower)")
    connectivity: int = opt(16, "--index usearch: graph connectivity (edges per node)")
    seed: int = opt(0, "seed for the recall sample")
    storage_options: str = opt("", "fsspec storage options as JSON, for input and output")

    def __post_init__(self) -> None:
        self.require("input", "output")
        self.choice("index", INDEXES)
        self.check_writer()
        for name in ("k", "block_rows", "ef", "connectivity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.recall_sample < 0:
            raise ConfigError("recall_sample must be ≥ 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError("concurrency must be ≥ 1")

    def storage_options_dict(self) -> dict[str, Any]:
        if not self.storage_options:
            return {}
        try:
            so = json.loads(self.storage_options) if isinstance(self.storage_options, str) else dict(self.storage_options)
        except json.JSONDecodeError as e:
            raise ConfigError(f"storage_options: expected a JSON object ({e.msg})") from None
        if not isinstance(so, dict):
            raise ConfigError("storage_options: expected a JSON object")
        return so


@dataclass
class NeighboursResult:
    output: str
    rows: int
    files: int
    k: int
    index: str
    wall_s: float
    recall: float | None = None
    index_build_s: float = 0.0
    manifest: dict = field(default_factory=dict)


def _usearch():
    try:
        from usearch.index import Index
    except ImportError:
        raise ConfigError("--index usearch needs the optional usearch package: pip install 'vaepipe[ann]'") from None
    return Index


class NeighbourUnits:
    """A Ray Data actor: answers whole units (row groups of the latents) and stages one file each."""

    def __init__(self, plan: dict[str, Any], index_bytes: bytes | None = None):
        self.plan = plan
        so = plan.get("storage_options", {})
        self.loc = resolve(plan["input"], **so)
        self.out = resolve(plan["output"], **so)
        self.lat = Latents(self.loc, plan["files"])
        self.index = None
        if index_bytes is not None:
            self.index = _usearch().restore(bytes(index_bytes))

    def queries(self, unit: dict) -> tuple[pa.Array, np.ndarray]:
        p = self.plan
        t = self.lat.open(unit["file"]).read_row_group(unit["row_group"], columns=[p["id_column"], p["column"]])
        return t.column(p["id_column"]), latent_matrix(t.column(p["column"]), self.lat.metadata, self.loc.uri)

    def exact(self, q: np.ndarray, first_row: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.plan
        search = BlockSearch(q, p["k"])
        own = first_row + np.arange(len(q))
        for start, t in self.lat.blocks([p["column"]], threads=1):
            x = latent_matrix(t.column(p["column"]), self.lat.metadata, self.loc.uri)
            hit = np.flatnonzero((own >= start) & (own < start + len(x)))
            search.add(x, start, (hit, own[hit] - start))
        return search.result.d, search.result.rows

    def approximate(self, q: np.ndarray, first_row: int) -> tuple[np.ndarray, np.ndarray]:
        return approximate_search(self.index, q, first_row + np.arange(len(q)), self.plan["k"], self.plan["ef"])

    def run_unit(self, unit: dict) -> dict:
        p = self.plan
        ids, x = self.queries(unit)
        writer, sink, rows = None, None, 0
        for lo in range(0, len(x), p["block_rows"]):
            q = x[lo:lo + p["block_rows"]]
            first = unit["first_row"] + lo
            d, nb = self.exact(q, first) if self.index is None else self.approximate(q, first)
            table = self.table(ids.slice(lo, len(q)), d, nb)
            if writer is None:
                self.out.fs.makedirs(posixpath.dirname(unit["staged"]), exist_ok=True)
                sink = self.out.fs.open(unit["staged"], "wb")
                writer = pq.ParquetWriter(sink, table.schema, **write_options(table.schema))
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:   # an empty row group: a typed, empty file
            self.out.fs.makedirs(posixpath.dirname(unit["staged"]), exist_ok=True)
            sink = self.out.fs.open(unit["staged"], "wb")
            schema = self.table(ids.slice(0, 0), np.zeros((0, p["k"]), np.float32), np.zeros((0, p["k"]), np.int64)).schema
            writer = pq.ParquetWriter(sink, schema, **write_options(schema))
        writer.close()
        sink.close()
        return {"index": unit["index"], "staged": unit["staged"], "rows": rows}

    def table(self, ids, d: np.ndarray, rows: np.ndarray) -> pa.Table:
        """id, neighbours (list of ids), distances (list of float32), nearest first."""
        p = self.plan
        found = np.isfinite(d)
        counts = found.sum(1)
        flat_rows = rows[found]
        nb_ids = self.lat.take(flat_rows, [p["id_column"]]).column(p["id_column"]).combine_chunks() \
            if len(flat_rows) else pa.array([], ids.type)
        offsets = from_np(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        return pa.table({p["id_column"]: ids,
                         "neighbours": pa.ListArray.from_arrays(offsets, nb_ids),
                         "distances": pa.ListArray.from_arrays(offsets, from_np(np.sqrt(d[found]).astype(np.float32)))})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = [self.run_unit(json.loads(u)) for u in batch["unit"]]
        return {k: np.array([r[k] for r in res]) for k in res[0]}


def approximate_search(index, q: np.ndarray, own: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
    """HNSW candidates (k + 1, so that dropping the record itself leaves k), re-scored exactly and
    ordered by (distance, row): the distances are the exact ones, the set is approximate."""
    index.expansion_search = max(ef, k + 1)
    m = index.search(q, k + 1, threads=1)
    keys = np.asarray(m.keys, np.int64).reshape(len(q), -1)
    counts = np.asarray(m.counts).reshape(-1)
    valid = (np.arange(keys.shape[1])[None, :] < counts[:, None]) & (keys != own[:, None])
    vecs = np.asarray(index.get(np.where(valid, keys, keys[:, :1]).ravel()), np.float32).reshape(*keys.shape, -1)
    d = exact_sq(vecs.reshape(-1, vecs.shape[-1]), np.repeat(q, keys.shape[1], axis=0)).reshape(keys.shape)
    d = np.where(valid, d, np.inf).astype(np.float32)
    order = np.lexsort((np.where(valid, keys, np.iinfo(np.int64).max), d), axis=1)[:, :k]
    d = np.take_along_axis(d, order, 1)
    rows = np.where(np.isfinite(d), np.take_along_axis(keys, order, 1), -1)
    if d.shape[1] < k:
        pad = k - d.shape[1]
        d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return d, rows


def build_index(lat: Latents, column: str, connectivity: int):
    Index = _usearch()
    dim = None
    index = None
    for start, t in lat.blocks([column]):
        x = latent_matrix(t.column(column), lat.metadata, lat.loc.uri)
        if index is None:
            dim = x.shape[1]
            index = Index(ndim=dim, metric="l2sq", dtype="f32", connectivity=connectivity)
        if len(x):
            index.add(np.arange(start, start + len(x), dtype=np.uint64), x, threads=0)
    return index


def plan_units(lat: Latents, commit: Commit) -> list[dict]:
    units = []
    for f, md in enumerate(lat.meta):
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            if n == 0:
                continue
            i = len(units)
            units.append({"index": i, "file": f, "row_group": rg, "rows": n,
                          "first_row": int(lat.file_start[f] + lat.rg_start[f][rg]),
                          "staged": commit.staged_path(f"unit-{i:06d}.parquet")})
    return units


def measure_recall(lat: Latents, cfg: NeighboursConfig, index) -> float:
    """recall@k of the index on `recall_sample` random records: |approximate ∩ exact| / k, averaged."""
    n = lat.rows
    sample = np.sort(np.random.default_rng(cfg.seed).choice(n, size=min(cfg.recall_sample, n), replace=False))
    t = lat.take(sample, [cfg.column])
    q = latent_matrix(t.column(cfg.column), lat.metadata, lat.loc.uri)
    search = BlockSearch(q, cfg.k)
    for start, b in lat.blocks([cfg.column]):
        x = latent_matrix(b.column(cfg.column), lat.metadata, lat.loc.uri)
        hit = np.flatnonzero((sample >= start) & (sample < start + len(x)))
        search.add(x, start, (hit, sample[hit] - start))
    _, approx = approximate_search(index, q, sample, cfg.k, cfg.ef)
    exact = search.result.rows
    want = min(cfg.k, n - 1)
    if want <= 0:
        return 1.0
    hits = [len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / want)


def run_neighbours(cfg: NeighboursConfig) -> NeighboursResult:
    """Take the output's lease (one writer per output), search, commit atomically."""
    from pipeline.batch.encode import refuse_partition_of_nightly
    from pipeline.table.lease import hold_lease

    so = cfg.storage_options_dict()
    loc, out = resolve(cfg.input, **so), resolve(cfg.output, **so)
    if out.fs is loc.fs and out.path.rstrip("/") == loc.path.rstrip("/"):
        raise InputError(f"output {cfg.output!r} is the input folder; choose another folder")
    refuse_partition_of_nightly(out)
    with hold_lease(control_of(out), out.uri, "neighbours", cfg.lease_ttl, cfg.wait) as lease:
        return _neighbours(cfg, loc, out, so, lease)


def _neighbours(cfg: NeighboursConfig, loc, out, so: dict, lease) -> NeighboursResult:
    t0 = time.perf_counter()
    read_table_manifest(out, control_of(out))   # an untrusted manifest fails here, before any work
    files = list_parquet_files(loc)
    if not files:
        raise InputError(f"input {cfg.input!r} holds no Parquet files")
    lat = Latents(loc, files)
    for c in (cfg.id_column, cfg.column):
        if c not in lat.schema.names:
            raise SchemaError(f"{loc.uri}: no column {c!r}; columns: {lat.schema.names}")
    commit = Commit(out, lease=lease)
    units = plan_units(lat, commit)
    metadata = {"vaepipe.neighbours_k": str(cfg.k), "vaepipe.neighbours_index": cfg.index,
                "vaepipe.input": loc.uri, "vaepipe.distance": "euclidean (float32, as DuckDB array_distance)"}
    index_bytes, recall, build_s = None, None, 0.0
    if cfg.index == "usearch" and units:
        tb = time.perf_counter()
        index = build_index(lat, cfg.column, cfg.connectivity)
        build_s = time.perf_counter() - tb
        if cfg.recall_sample:
            recall = measure_recall(lat, cfg, index)
            metadata["vaepipe.recall_at_k"] = f"{recall:.4f}"
        index_bytes = bytes(index.save())
        del index
    plan = {"input": cfg.input if "://" in cfg.input else loc.path, "files": files,
            "output": cfg.output if "://" in cfg.output else out.path, "storage_options": so,
            "k": cfg.k, "id_column": cfg.id_column, "column": cfg.column, "block_rows": cfg.block_rows,
            "ef": cfg.ef}
    if not units:
        res = []
    elif "memory" in (loc.scheme, out.scheme):   # memory:// lives in this process only
        try:
            worker = NeighbourUnits(plan, index_bytes)
            res = [worker.run_unit(dict(u)) for u in units]
        except Exception:
            commit.abort()
            raise
    else:
        res = _run_on_ray(cfg, plan, units, index_bytes, commit)
    res.sort(key=lambda r: int(r["index"]))
    staged = [(str(r["staged"]), int(r["rows"])) for r in res]
    rows = sum(n for _, n in staged)
    if rows != lat.rows:
        commit.abort()
        raise RuntimeError(f"neighbours wrote {rows} rows for {lat.rows} input rows; nothing committed")
    manifest = commit.commit(staged, {**metadata, "rows_in": lat.rows})
    return NeighboursResult(cfg.output, rows, len(staged), cfg.k, cfg.index, time.perf_counter() - t0, recall,
                            build_s, manifest)


def _run_on_ray(cfg: NeighboursConfig, plan: dict, units: list[dict], index_bytes, commit: Commit) -> list[dict]:
    import ray
    import ray.data

    from pipeline.runtime.ray_pool import strict_pool_dataset
    from pipeline.runtime.ray_runtime import driver_stderr_filtered, init_ray, quiet_data_progress

    init_ray(cfg.ray_address)
    quiet_data_progress()
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    n_actors = max(1, min(cfg.concurrency or min(cpus, os.cpu_count() or 1), len(units)))
    items = [{"unit": json.dumps(u)} for u in units]
    ds = strict_pool_dataset(ray.data.from_items(items, override_num_blocks=len(items)))
    ds = ds.map_batches(NeighbourUnits, fn_constructor_args=(plan, index_bytes), batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=1)
    try:
        with driver_stderr_filtered():
            return ds.take_all()
    except Exception as e:
        commit.abort()
        del ds   # its execution holds the actor pool
        from pipeline.runtime.errors import released_ray_failure

        err = released_ray_failure(e)   # the actors' CPUs back before the caller goes on
    raise err
