"""`vaepipe encode`: Parquet records → μ (and optional logvar, anomaly score) with a registered model.

Work is split into units of whole row groups; Ray Data runs them on an actor pool (`map_batches`
with a callable class: one model load per actor). Each actor reads its row groups through the
input's filesystem (fsspec/pyarrow), converts Arrow → torch without per-row Python, encodes in
`batch_size` chunks and streams a Parquet file into the job's staging prefix. Only when every unit
has succeeded does the driver commit (rename → manifest → _SUCCESS). Unit file names are a function
of the unit, so a retried task overwrites its own file: no duplicates, no partial output."""
from __future__ import annotations

import json
import logging
import os
import posixpath
import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.models import registry
from pipeline.runtime.config import WriterConfig, opt, parse_storage_options
from pipeline.runtime.errors import ConfigError, InputError, SchemaError, released_ray_failure
from pipeline.table.features import (FeatureSpec, check_finite, fixed_size_list, infer_spec, nonfinite_rows, raw_dtype,
                               to_matrix)
from pipeline.table.commit import Commit, control_of, parent_table, partition_control, pause_point, read_table_manifest
from pipeline.table.lease import Lease, hold_lease
from pipeline.table.parquet_io import list_parquet_files, partition_values, read_footer, write_options
from pipeline.runtime.progress import Progress
from pipeline.table.quantize import error_report, error_sums, int8_scale, quantize
from pipeline.table.uris import Location, resolve
from vae.anomaly import NEEDS_REFERENCE, SCORES, anomaly_score
from vae.checkpoint import load_checkpoint, model_from_checkpoint, reference_from_checkpoint
from vae.distributions import record_keys, record_normal
from vae.model import VAE
from vae.semi import SemiVAE

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "int8")


@dataclass
class EncodeConfig(WriterConfig):
    model: str = opt("models:/vae@production", "registered model: models:/NAME@ALIAS or models:/NAME/VERSION")
    input: str = opt("", "Parquet file or folder (any fsspec URI; hive partitions kept)")
    output: str = opt("", "output folder (committed atomically: manifest + _SUCCESS)")
    keep: list[str] = opt(help="columns copied to the output (default: the id column, if present)", factory=list)
    id_column: str = opt("id", "record id column (named in errors, default kept column)")
    batch_size: int = opt(4096, "records per forward pass")
    unit_rows: int = opt(131_072, "target records per work unit / output file (whole row groups)")
    concurrency: int | None = opt(None, "encoder actors (default: CPU cores, or GPUs with --use-gpu)")
    use_gpu: bool | None = opt(None, "encode on GPUs (default: when there are any: this machine's in this process, "
                                     "the cluster's on the actor pool; --no-use-gpu: CPU only)")
    logvar: bool = opt(False, "also write the posterior log-variance")
    embedding: bool = opt(False, "also write `embedding`: μ in the model's latent metric (vae.model.VAE.embedding), "
                                 "whose Euclidean distances approximate those of the decoded records, where μ's "
                                 "weigh every latent direction alike (the prior whitens them); for neighbours: "
                                 "`query --column embedding`")
    score: bool = opt(False, "also write an anomaly score per record (higher = more unusual): --score-kind")
    score_kind: str = opt("auto", "the score: auto (sq_err+knn_z, the kind that ranked anomalies best in the "
                                  "protocols (docs/quality.md), or neg_elbo for a model without a latent "
                                  "reference), neg_elbo (-ELBO, nats), sq_err (squared reconstruction error of "
                                      "E[x|μ]), knn_z (mean distance from μ to its 5 nearest μ of the records the "
                                      "model was fit on, stored with it by `vaepipe train`), sq_err+knn_z (both, "
                                      "standardised on those records, summed); another kind than neg_elbo implies "
                                      "--score", choices=("auto", *SCORES))
    score_models: list[str] = opt(help="more registered models (same features), each scoring every record with "
                                       "--score-kind; `score` is the mean over --model and these (an ensemble, e.g. "
                                       "one recipe trained with other seeds). μ comes from --model alone; implies "
                                       "--score", factory=list)
    predict: bool = opt(False, "also write `pred` (the class, in the label column's type) and `pred_prob` "
                               "(fixed_size_list<float32>[C], in the model's class order) from a model trained "
                               "with `train --labels`")
    dtype: str = opt("float32", "latent storage: float32, float16, int8 (per-dimension scale in metadata)",
                     choices=DTYPES)
    on_bad_record: str = opt("fail", "NaN/inf/null features: fail the job, or skip them (their ids go to the quarantine file the manifest names)",
                             choices=("fail", "skip"))
    executor: str = opt("auto", "where the units run: ray (an actor pool on the Ray cluster), local (this process, "
                                "no Ray; one encoder thread per core, on this machine's GPU when it has one), auto "
                                "(local for local or memory:// data when no cluster address is set, no Ray cluster "
                                "runs here, no --concurrency asks for actors and at most one GPU is to be used)",
                        choices=("auto", "ray", "local"))
    storage_options: str = opt("", "fsspec storage options as JSON, for input and output, e.g. "
                                    "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' for an S3-compatible store")
    index: str = opt("", "after the commit, under the same lease, build this approximate-neighbour index of the "
                         "output (ivf-flat; `vaepipe index` has the other settings); empty: none", choices=("", "ivf-flat"))

    def __post_init__(self) -> None:
        self.require("model", "input", "output")
        self.storage_options_dict()
        self.choice("dtype", DTYPES)
        self.choice("score_kind", ("auto", *SCORES))
        if self.score_kind not in ("auto", "neg_elbo") or self.score_models:
            self.score = True
        self.choice("executor", ("auto", "ray", "local"))
        self.choice("on_bad_record", ("fail", "skip"))
        self.choice("index", ("", "ivf-flat"))
        if self.batch_size < 1 or self.unit_rows < 1:
            raise ConfigError("batch_size and unit_rows must be ≥ 1")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError("concurrency must be ≥ 1")
        self.check_writer()

    def storage_options_dict(self) -> dict[str, Any]:
        return parse_storage_options(self.storage_options)


def choose_executor(cfg: "EncodeConfig", loc: Location, out: Location, units: list["Unit"], record_bytes: int) -> tuple[str, str]:
    """(executor, why): 'local' runs the units in this process, 'ray' on a Ray Data actor pool."""
    if in_process(loc, out):
        return "local", "memory:// lives in this process"
    if cfg.executor != "auto":
        return cfg.executor, f"--executor {cfg.executor}"
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        return "ray", "a Ray cluster address is set"
    import sys

    from pipeline.runtime import ray_runtime

    if "ray" in sys.modules and sys.modules["ray"].is_initialized() and not ray_runtime.started_local():
        return "ray", "Ray is already running in this process"
    if cfg.concurrency is not None:
        return "ray", "--concurrency asks for actors"
    gpus = torch.cuda.device_count() if cfg.use_gpu is not False else 0
    if gpus > 1:
        return "ray", f"{gpus} GPUs here: one actor each"
    if cfg.use_gpu and not gpus:
        return "ray", "--use-gpu and no GPU visible to this process: GPU actors on the cluster"
    if not (loc.is_local and out.is_local):
        return "ray", "object-store data: actors overlap the transfers"
    if _local_cluster_running():
        return "ray", "a Ray cluster is running on this machine: joining it"
    # Local files on one machine, at any size: this process runs one encoder thread per core, as many
    # as a one-node Ray would start actors, without Ray's start, its processes or its object store
    # (10 M records on 2 cores: 150.6 s here against 219.4 s on the actor pool, half the memory;
    # docs/performance.md); with one GPU, the threads decode Parquet in parallel and share it (the one
    # GPU actor of the pool decodes alone: 1 M records on an H200 host, docs/performance.md). A job
    # that should survive the loss of an encoder runs with --executor ray.
    size = sum(u.rows for u in units) * record_bytes
    if ray_runtime.started_local():
        # the one-node Ray this process started (a train before, say) has no more cores than this
        # process: its actors would add only their start-up (a process, torch, the model: seconds each)
        return "local", f"{size / 1e9:.2f} GB of local features: in this process, beside its own one-node Ray"
    return "local", f"{size / 1e9:.2f} GB of local features: one process, no Ray start"


def _local_cluster_running() -> bool:
    """A `ray start --head` on this machine (what `ray.init()` would join). Ray's address file sits in
    $RAY_TMPDIR, $TMPDIR or /tmp under ray/; looked at first without importing Ray (fast path)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    if not os.path.exists(os.path.join(base, "ray", "ray_current_cluster")):
        return False
    from pipeline.runtime.ray_runtime import running_local_cluster

    return running_local_cluster() is not None


def in_process(*locs: Location) -> bool:
    """memory:// lives inside one process: Ray actors (other processes) cannot see it, so such jobs
    run their units in the driver process (the local executor)."""
    return any(loc.scheme == "memory" for loc in locs)


@dataclass
class Unit:
    index: int
    file: str            # path inside the input filesystem
    rel: str             # path relative to the input root (keeps partition folders)
    row_groups: list[int]
    rows: int


def plan_units(loc: Location, files: list[str], unit_rows: int) -> tuple[list[Unit], pa.Schema | None, int]:
    """Read every footer (a corrupt file fails here, naming it) and group row groups into units."""
    units, schema, total, schema_has_rows = [], None, 0, False
    root = loc.path if loc.fs.isdir(loc.path) else posixpath.dirname(loc.path)
    for path in files:
        md = read_footer(loc, path)
        if schema is None or (not schema_has_rows and md.num_rows):   # an empty first file does not decide it
            schema, schema_has_rows = md.schema.to_arrow_schema(), md.num_rows > 0
        total += md.num_rows
        rel = posixpath.relpath(path, root)
        cur, rows = [], 0
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            if n == 0:
                continue
            cur.append(rg)
            rows += n
            if rows >= unit_rows:
                units.append(Unit(len(units), path, rel, cur, rows))
                cur, rows = [], 0
        if cur:
            units.append(Unit(len(units), path, rel, cur, rows))
    return units, schema, total


def check_model_against(model: VAE, schema: pa.Schema, source: str, id_column: str) -> FeatureSpec:
    """Fail before any work when the data cannot feed this model (columns, types, vector length)."""
    pre = model.config.preprocessing
    spec = infer_spec(schema, pre.features, source=source)
    if spec.layout != pre.layout:
        raise SchemaError(f"{source}: model expects features {pre.features} as {pre.layout!r}, found {spec.layout!r}")
    if spec.dim is not None and spec.dim != model.config.input_dim:
        raise SchemaError(f"{source}: column {spec.columns[0]!r} holds vectors of length {spec.dim}, "
                          f"the model expects {model.config.input_dim}")
    return spec


def latent_array(v: np.ndarray, dtype: str, int8_scale: np.ndarray | None) -> pa.FixedSizeListArray:
    if dtype == "float32":
        return fixed_size_list(v.astype(np.float32), pa.float32())
    if dtype == "float16":
        return fixed_size_list(v.astype(np.float16), pa.float16())
    return fixed_size_list(quantize(v, int8_scale), pa.int8())


def row_group_slices(pf: pq.ParquetFile, rg: int, columns: list[str], rows: int):
    """Tables of at most `rows` rows covering row group `rg`; an empty row group gives one empty
    table (so an empty input file still gets its typed, empty output)."""
    empty = True
    for b in pf.iter_batches(batch_size=rows, row_groups=[rg], columns=columns):
        empty = False
        yield pa.Table.from_batches([b])
    if empty:
        yield pf.read_row_group(rg, columns=columns)


def prefetched(items, depth: int = 2):
    """Iterate `items` from a background thread, at most `depth` ahead: Parquet decoding (which
    releases the GIL) overlaps the forward passes. Errors are raised here, in order; a consumer that
    stops early stops the producer."""
    q: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for x in items:
                if not put((x, None)):
                    return
            put((end, None))
        except BaseException as e:   # handed to the consumer, raised there
            put((end, e))

    th = threading.Thread(target=run, name="vaepipe-prefetch", daemon=True)
    th.start()
    try:
        while True:
            x, err = q.get()
            if x is end:
                if err is not None:
                    raise err
                return
            yield x
    finally:
        stop.set()
        th.join()


def release_memory() -> None:
    """Hand freed row-group buffers back to the OS (Arrow's pool, then glibc's heap), so an actor's
    RSS stays at one row group's worth instead of the allocators' high-water mark."""
    pa.default_memory_pool().release_unused()
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:   # not glibc (macOS, musl): nothing to trim
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


class StagedWriter:
    """One unit's staged Parquet file, opened on the first row group (a unit whose records were all
    skipped writes nothing)."""

    def __init__(self, fs, path: str, schema: pa.Schema):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.sink = fs.open(path, "wb")
        self.writer = pq.ParquetWriter(self.sink, schema, **write_options(schema))

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()
        self.sink.close()


class UnitEncoder:
    """A Ray Data actor: loads the model once, then encodes whole units (row groups → one file). A
    GPU actor runs several units at once in threads: `run_unit` keeps its state in locals, and the
    model is only read (inference mode)."""

    def __init__(self, model_bytes: bytes, plan: dict[str, Any]):
        self.plan = plan
        self.device = torch.device("cuda" if plan["use_gpu"] and torch.cuda.is_available() else "cpu")
        torch.set_num_threads(plan["threads"])
        state = load_checkpoint(model_bytes)
        self.model = model_from_checkpoint(state, map_location=str(self.device))
        self.scorers = self.score_members(state, plan) if plan["score"] else []
        self.loc = resolve(plan["input"], **plan.get("storage_options", {}))
        self.out = resolve(plan["output"], **plan.get("storage_options", {}))
        self.spec = FeatureSpec(tuple(plan["features"]), plan["layout"])
        self.scale = np.asarray(plan["int8_scale"], np.float32) if plan["int8_scale"] is not None else None
        self.classes = pa.array(list(self.model.classes)) if plan.get("predict") else None   # int64 or string

    def score_members(self, state: dict, plan: dict) -> list[tuple[VAE, Any]]:
        """(model, latent reference or None) of --model and each of --score-models."""
        states = [state, *(load_checkpoint(b) for b in plan.get("score_blobs", []))]
        members = []
        for i, st in enumerate(states):
            model = self.model if i == 0 else model_from_checkpoint(st, map_location=str(self.device))
            ref = reference_from_checkpoint(st) if plan["score_kind"] in NEEDS_REFERENCE else None
            if ref is not None:
                ref.mu = ref.mu.to(self.device)
            members.append((model, ref))
        return members

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Raw records (N, D) in their own dtype → μ (and logvar / score), `batch_size` at a time.
        One torch view of the whole matrix (no copy; pinned once on GPU), outputs written into
        preallocated tensors on the device and copied back once."""
        p, bs, dev = self.plan, self.plan["batch_size"], self.device
        n, lat = len(x), self.model.config.latent_dim
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")   # Arrow's buffers are read-only
            xt = torch.from_numpy(x)
        if dev.type == "cuda":
            xt = xt.pin_memory()
        outs = {"mu": torch.empty(n, lat, device=dev)}
        if p["logvar"]:
            outs["logvar"] = torch.empty(n, lat, device=dev)
        if p.get("embedding"):
            outs["embedding"] = torch.empty(n, lat, device=dev)
        if p["score"]:
            outs["score"] = torch.empty(n, device=dev)
        if p.get("predict"):
            outs["pred_prob"] = torch.empty(n, len(self.model.classes), device=dev)
        with torch.inference_mode():
            for i in range(0, n, bs):
                raw = xt[i:i + bs].to(dev, non_blocking=True)
                q = self.model.embed(raw)
                outs["mu"][i:i + bs] = q.mean
                if "logvar" in outs:
                    outs["logvar"][i:i + bs] = q.logvar
                if "embedding" in outs:
                    outs["embedding"][i:i + bs] = self.model.embedding(q.mean)
                if "score" in outs:   # the members' mean; neg_elbo's noise is per record (any batch or unit)
                    keys = record_keys(raw) if p["score_kind"] == "neg_elbo" else None
                    outs["score"][i:i + bs] = torch.stack([
                        anomaly_score(m, raw, p["score_kind"], ref,
                                      None if keys is None else record_normal(keys, m.config.latent_dim).unsqueeze(0),
                                      mu=q.mean if m is self.model else None)   # --model's μ: computed above
                        for m, ref in self.scorers]).mean(0)
                if "pred_prob" in outs:   # q(y|μ): the same μ written beside it
                    outs["pred_prob"][i:i + bs] = self.model.class_probs(q.mean)
        return {k: v.cpu().numpy() for k, v in outs.items()}

    def output_table(self, t: pa.Table, enc: dict[str, np.ndarray], meta: dict, int8_sums: dict) -> pa.Table:
        """The kept id columns and the encodings of one slice, as Arrow lists. Hive partition values
        stay in the folder names only (as every hive reader expects), never repeated as a column.
        `int8_sums`, the unit's own (a GPU actor runs several units at once), gathers the int8 error."""
        p = self.plan
        out = {c: t.column(c) for c in p["keep"] if c in t.schema.names}
        out["mu"] = latent_array(enc["mu"], p["dtype"], self.scale)
        if self.scale is not None:   # the int8 error on the data encoded, not on a sample
            sums = error_sums(enc["mu"], out["mu"].flatten().to_numpy().reshape(enc["mu"].shape), self.scale)
            for k, v in sums.items():
                int8_sums[k] = int8_sums.get(k, 0) + v
        if "logvar" in enc:
            out["logvar"] = fixed_size_list(enc["logvar"].astype(np.float16 if p["dtype"] != "float32" else np.float32),
                                            pa.float16() if p["dtype"] != "float32" else pa.float32())
        if "embedding" in enc:   # float16 beside a compressed μ, as logvar
            half = p["dtype"] != "float32"
            out["embedding"] = fixed_size_list(enc["embedding"].astype(np.float16 if half else np.float32),
                                               pa.float16() if half else pa.float32())
        if "score" in enc:
            out["score"] = pa.array(enc["score"].astype(np.float32))
        if "pred_prob" in enc:
            out["pred"] = self.classes.take(pa.array(enc["pred_prob"].argmax(1).astype(np.int64)))   # the class itself
            out["pred_prob"] = fixed_size_list(np.ascontiguousarray(enc["pred_prob"], np.float32), pa.float32())
        return pa.table(out).replace_schema_metadata(meta)

    def run_unit(self, unit: dict) -> dict:
        p = self.plan
        source = self.loc.full(unit["file"])
        staged = posixpath.join(p["staging"], posixpath.dirname(unit["rel"]), f"unit-{unit['index']:06d}.parquet")
        skipped_path = posixpath.join(p["staging"], "_skipped", f"unit-{unit['index']:06d}.parquet")
        parts = partition_values(unit["rel"])
        cols = list(dict.fromkeys([*self.spec.columns, *[c for c in p["keep"] if c not in parts]]))
        meta = {k.encode(): v.encode() for k, v in p["metadata"].items()}
        meta[b"vaepipe.source_file"] = source.encode()
        rows = skipped = 0
        writer: StagedWriter | None = None
        quarantined: list[pa.Table] = []
        int8_sums: dict[str, float] = {}
        t_start = time.time()
        with self.loc.fs.open(unit["file"], "rb") as f:
            pf = pq.ParquetFile(f, pre_buffer=True)   # one coalesced read per row group
            # Decode a row group in slices of ~16 MiB of values: Parquet list columns carry repetition
            # and definition levels per value, so decoding a whole 64k-row group of 784-byte images at
            # once peaks at ~15x its size; slices keep an actor's transient memory small.
            itemsize = np.dtype(raw_dtype(pf.schema_arrow, self.spec)).itemsize
            read_rows = max(1024, min(65_536, 2**24 // max(1, p["input_dim"] * itemsize)))

            def slices():   # (table, records) per slice; None closes a row group
                for rg in unit["row_groups"]:
                    for t in row_group_slices(pf, rg, cols, read_rows):
                        yield t, to_matrix(t, self.spec, p["input_dim"], source=source, id_column=p["id_column"],
                                           dtype=raw_dtype(t.schema, self.spec))
                    yield None

            pieces = []
            for item in prefetched(slices()):   # the next slice decodes while this one encodes
                if item is not None:
                    t, x = self.screen(*item, source, quarantined)
                    skipped += item[0].num_rows - t.num_rows
                    pieces.append(self.output_table(t, self.encode(x), meta, int8_sums))
                    del t, x, item
                    continue
                table = pa.concat_tables(pieces)   # one output row group per input row group
                writer = writer or StagedWriter(self.out.fs, staged, table.schema)
                writer.write(table)
                rows += table.num_rows
                del table
                pieces = []
                release_memory()
        if quarantined:   # every bad record of the unit, all row groups
            self.out.fs.makedirs(posixpath.dirname(skipped_path), exist_ok=True)
            with self.out.fs.open(skipped_path, "wb") as sf:
                pq.write_table(pa.concat_tables(quarantined), sf)
        if writer is not None:
            writer.close()
            pause_point("unit.written")   # crash tests: a driver killed while its actors work
        return {"index": unit["index"], "staged": staged if writer is not None else "", "rows": rows,
                "skipped": skipped, "skipped_file": skipped_path if skipped else "",
                "t_start": t_start, "t_end": time.time(), "int8_sums": json.dumps(int8_sums)}

    def screen(self, t: pa.Table, x: np.ndarray, source: str, quarantined: list) -> tuple[pa.Table, np.ndarray]:
        """Records with a NaN or ±inf value: an error naming the first (`--on-bad-record fail`), or
        left out, their ids (and file) appended to `quarantined` (`skip`)."""
        bad = nonfinite_rows(x)
        if not bad.any():
            return t, x
        p = self.plan
        if p["on_bad_record"] == "fail":
            check_finite(t, x, p["id_column"], source)
        ids = t.filter(pa.array(bad)).select([c for c in (p["id_column"],) if c in t.schema.names])
        quarantined.append(ids.append_column("source_file", pa.array([source] * ids.num_rows)))
        return t.filter(pa.array(~bad)), x[~bad]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        units = [json.loads(u) for u in batch["unit"]]
        res = [self.run_unit(u) for u in units]
        return {k: np.array([r[k] for r in res]) for k in res[0]}


@dataclass
class EncodeResult:
    output: str
    rows_in: int
    rows_out: int
    skipped: int
    files: int
    model_uri: str
    model_version: str
    wall_s: float
    manifest: dict = field(default_factory=dict)
    units_span_s: float = 0.0   # first unit's start → last unit's end (the encode proper, no actor start)
    int8_error: dict | None = None   # --dtype int8: rmse, relative_rmse, clipped_fraction over every value written

    @property
    def records_per_s(self) -> float:
        return self.rows_in / max(self.wall_s, 1e-9)


def int8_scales(model: VAE, loc: Location, units: list[Unit], spec: FeatureSpec, dim: int,
                sample_units: int = 8, rows: int = 20_000) -> np.ndarray:
    """Per-dimension int8 scale, max|μ_j| / 127, from a sample spread over the input: the first rows
    of up to `sample_units` evenly spaced units, `rows` in all (values beyond it clip; the run
    measures how many, on every record it encodes)."""
    picks = sorted({round(i * (len(units) - 1) / max(sample_units - 1, 1)) for i in range(min(sample_units, len(units)))})
    xs = []
    for u in (units[i] for i in picks):
        with loc.fs.open(u.file, "rb") as f:
            batch = next(pq.ParquetFile(f).iter_batches(batch_size=-(-rows // len(picks)), row_groups=u.row_groups[:1],
                                                        columns=list(spec.columns)), None)
        if batch is not None and batch.num_rows:
            x = to_matrix(pa.Table.from_batches([batch]), spec, dim)
            xs.append(x[~nonfinite_rows(x)])
    x = np.concatenate(xs) if xs else np.zeros((0, dim), np.float32)
    if not len(x):
        return int8_scale(np.zeros((1, model.config.latent_dim), np.float32))
    with torch.inference_mode():
        return int8_scale(model.embed(torch.from_numpy(x)).mean.numpy())


@dataclass
class Target:
    """Where a run commits, for a caller that already holds the output's lease (nightly)."""
    control: Location
    lease: Lease


def run_encode(cfg: EncodeConfig, models: tuple | None = None, files: list[str] | None = None,
               target: Target | None = None) -> EncodeResult:
    """Take the output's lease, check everything, encode on Ray Data, commit atomically.
    `models` = load_models(cfg) lets a caller that already resolved the models (nightly) pin the
    versions; `files` = the exact input files to encode (nightly: the file set it records); `target`:
    the caller holds the lease and names the control folder (a nightly partition's)."""
    so = cfg.storage_options_dict()
    loc, out = resolve(cfg.input, **so), resolve(cfg.output, **so)
    if loc.fs.exists(loc.path) and out.fs is loc.fs and out.path.rstrip("/") == loc.path.rstrip("/"):
        raise InputError(f"output {cfg.output!r} is the input folder; choose another folder")
    if target is not None:
        return _encode(cfg, loc, out, target.control, target.lease, models, files)
    refuse_partition_of_nightly(out)
    with hold_lease(control_of(out), out.uri, "encode", cfg.lease_ttl, cfg.wait) as lease:
        r = _encode(cfg, loc, out, control_of(out), lease, models, files)
        if cfg.index:
            build_index_locked(out, lease, cfg)
        return r


def build_index_locked(out: Location, lease: Lease, cfg: EncodeConfig, log=print) -> None:
    """The output's index, built under the lease the run holds (pipeline.search.ann)."""
    from pipeline.search.ann import IndexConfig, build_locked

    build_locked(out, lease, IndexConfig(latents=out.uri, kind=cfg.index, lease_ttl=cfg.lease_ttl), log)


def refuse_partition_of_nightly(out: Location) -> None:
    """OUT/<p> of a nightly output is written under the nightly run's lease only."""
    found = parent_table(out)
    if found is None:
        return
    up, name = found
    if out.fs.exists(partition_control(control_of(up), name).path):
        raise ConfigError(f"output {out.uri!r} is a partition of the nightly output {up.uri!r}; "
                          f"re-encode it with `vaepipe nightly` (which holds that output's lease)")


def _encode(cfg: EncodeConfig, loc: Location, out: Location, control: Location, lease: Lease,
            models: tuple | None, files: list[str] | None) -> EncodeResult:
    """plan → model and columns → run the units (here or on Ray Data) → validate → commit."""
    t0 = time.perf_counter()
    read_table_manifest(out, control)   # an untrusted manifest fails here, before any work or any write
    files = list_parquet_files(loc) if files is None else files
    units, schema, total = plan_units(loc, files, cfg.unit_rows)
    ref, blob, scorers = models or load_models(cfg)   # aliases resolved once
    model = model_from_checkpoint(load_checkpoint(blob))
    check_score_models(cfg, ref, model, blob, scorers)
    if cfg.predict and not isinstance(model, SemiVAE):
        raise ConfigError(f"--predict: model {ref.requested!r} ({ref.uri}) has no classifier; train one with "
                          f"`vaepipe train --labels COLUMN`")
    spec, keep = _columns(cfg, loc, model, schema, units)
    metadata = {"vaepipe.model_uri": ref.uri, "vaepipe.model_requested": ref.requested,
                "vaepipe.model_name": ref.name, "vaepipe.model_version": ref.version,
                "vaepipe.model_run_id": ref.run_id or "", "vaepipe.latent_dim": str(model.config.latent_dim),
                "vaepipe.dtype": cfg.dtype, "vaepipe.input": loc.uri}
    if cfg.score:   # what `score` is: the kind, and the models averaged
        metadata["vaepipe.score_kind"] = cfg.score_kind
        metadata["vaepipe.score_models"] = json.dumps([ref.uri] + [r.uri for r, _ in scorers])
    if cfg.predict:   # what pred_prob's positions mean
        metadata["vaepipe.classes"] = json.dumps(list(model.classes))
    commit = Commit(out, control=control, lease=lease)
    if not units:   # empty input: an explicit, committed, empty result
        manifest = commit.commit([], {**metadata, "rows_in": 0, "skipped": 0})
        return EncodeResult(cfg.output, 0, 0, 0, 0, ref.uri, ref.version, time.perf_counter() - t0, manifest)

    scale = int8_scales(model, loc, units, spec, model.config.input_dim) if cfg.dtype == "int8" else None
    if scale is not None:
        metadata["vaepipe.int8_scale"] = json.dumps([float(s) for s in scale])
    plan = {"input": cfg.input if "://" in cfg.input else loc.path, "output": cfg.output if "://" in cfg.output else out.path,
            "staging": commit.staging, "features": list(spec.columns), "layout": spec.layout,
            "input_dim": model.config.input_dim, "keep": keep, "id_column": cfg.id_column,
            "batch_size": cfg.batch_size, "logvar": cfg.logvar, "embedding": cfg.embedding, "score": cfg.score, "score_kind": cfg.score_kind,
            "score_blobs": [b for _, b in scorers], "predict": cfg.predict, "dtype": cfg.dtype,
            "int8_scale": scale.tolist() if scale is not None else None, "on_bad_record": cfg.on_bad_record,
            "metadata": metadata, "storage_options": cfg.storage_options_dict()}
    itemsize = np.dtype(raw_dtype(schema, spec)).itemsize
    executor, why = choose_executor(cfg, loc, out, units, model.config.input_dim * itemsize)
    log.info("encode: executor %s (%s)", executor, why)
    if executor == "local":
        # the GPU unless --no-use-gpu: "when the cluster has them" is, here, when this machine has one
        gpu = cfg.use_gpu is not False and torch.cuda.is_available()
        if cfg.use_gpu and not gpu:
            commit.abort()   # an explicit --use-gpu is never run on the CPU without a word
            raise ConfigError(f"--use-gpu: this process sees no CUDA GPU (torch {torch.__version__}), and the job "
                              f"runs in it ({why}); drop --use-gpu to encode on the CPU"
                              + ("" if in_process(loc, out) else ", or take --executor ray for a cluster's GPU actors"))
        res = _run_units_here(blob, {**plan, "use_gpu": gpu}, units, commit, total)
    else:
        res = _run_units_on_ray(cfg, blob, plan, units, commit, total)
    return _commit_units(cfg, out, commit, res, total, metadata, scale is not None, ref, t0)


def load_models(cfg: EncodeConfig) -> tuple[Any, bytes, list[tuple[Any, bytes]]]:
    """(ModelRef, checkpoint bytes) of --model, and of each --score-models: each alias resolved once."""
    tracking = cfg.resolved_tracking_uri()
    ref, blob = registry.load_model_bytes(cfg.model, tracking)
    return ref, blob, [registry.load_model_bytes(uri, tracking) for uri in cfg.score_models]


AUTO_SCORE = "sq_err+knn_z"
"""What --score-kind auto scores with: the kind the one-class MNIST protocol chose on its training split
(held-out ROC AUC 0.940 against −ELBO's 0.907 and IsolationForest's 0.913 on digits 0, 4, 7, same
models); on the breast-cancer table knn_z alone ranked first and sq_err+knn_z second (docs/quality.md)."""


def check_score_models(cfg: EncodeConfig, ref, model: VAE, blob: bytes, scorers: list[tuple[Any, bytes]]) -> None:
    """Before any work: every scoring model reads the same features as --model, and each has the
    latent reference a knn_z score needs."""
    if not cfg.score:
        return
    if cfg.score_kind == "auto":
        states = [load_checkpoint(b) for b in (blob, *(b for _, b in scorers))]
        cfg.score_kind = AUTO_SCORE if all(reference_from_checkpoint(st) is not None for st in states) else "neg_elbo"
        if cfg.score_kind == "neg_elbo":
            print(f"score: neg_elbo (--score-kind auto: model {ref.requested!r} has no latent reference for "
                  f"{AUTO_SCORE}; retrain it to get that score)", file=sys.stderr)
    main = model.config.preprocessing
    for i, (r, b) in enumerate([(ref, blob), *scorers]):
        state = load_checkpoint(b)
        pre = model_from_checkpoint(state).config.preprocessing if i else main
        if i and (list(pre.features), pre.layout) != (list(main.features), main.layout):
            raise ConfigError(f"--score-models {r.requested!r} ({r.uri}) reads features {list(pre.features)} "
                              f"({pre.layout}); --model {ref.requested!r} reads {list(main.features)} ({main.layout})")
        if cfg.score_kind in NEEDS_REFERENCE and reference_from_checkpoint(state) is None:
            raise ConfigError(f"--score-kind {cfg.score_kind}: model {r.requested!r} ({r.uri}) has no latent reference "
                              f"(μ of the records it was fit on, which `vaepipe train` stores with every model it "
                              f"registers); retrain it, or use --score-kind neg_elbo or sq_err")


def _columns(cfg: EncodeConfig, loc: Location, model: VAE, schema: pa.Schema | None,
             units: list[Unit]) -> tuple[FeatureSpec | None, list[str]]:
    """The model's feature columns in this input, checked against it, and the columns kept beside μ
    (hive partition values stay in the folder names)."""
    if schema is None:
        return None, []
    spec = check_model_against(model, schema, loc.uri, cfg.id_column)
    keep = cfg.keep or ([cfg.id_column] if cfg.id_column in schema.names else [])
    part_cols = set(partition_values(units[0].rel)) if units else set()
    for c in keep:
        if c not in schema.names and c not in part_cols:
            raise SchemaError(f"{loc.uri}: --keep column {c!r} not found; columns present: {schema.names}")
    return spec, [c for c in dict.fromkeys(keep) if c not in part_cols]


def _run_units_on_ray(cfg: EncodeConfig, blob: bytes, plan: dict[str, Any], units: list[Unit], commit: Commit,
                      total: int) -> list[dict]:
    """One Ray Data row per unit, through a pool of UnitEncoder actors sized from the cluster; any
    error aborts the run and comes out as itself."""
    import ray
    import ray.data

    from pipeline.runtime.ray_pool import strict_pool_dataset
    from pipeline.runtime.ray_runtime import (cluster_actors, cluster_calls_per_gpu, driver_stderr_filtered, init_ray,
                                      quiet_data_progress)

    init_ray(cfg.ray_address)
    quiet_data_progress()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    n_actors = cluster_actors("encode", use_gpu=use_gpu, requested=cfg.concurrency, units=len(units))
    plan = {**plan, "use_gpu": use_gpu, "threads": 1 if not use_gpu else 2}
    # A GPU actor runs several units at once, each thread decoding its own Parquet (what the GPU waits
    # on) and sharing the actor's model: as many as its node has CPUs per GPU, no more than its share
    # of the units. A CPU actor runs one unit at a time on one core.
    calls = min(cluster_calls_per_gpu(), -(-len(units) // n_actors)) if use_gpu else 1
    compute = (ray.data.ActorPoolStrategy(size=n_actors) if calls == 1 else
               ray.data.ActorPoolStrategy(size=n_actors, max_tasks_in_flight_per_actor=calls,
                                          max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True))
    if calls > 1:
        log.info("encode: %d units at once in each GPU actor", calls)
    items = [{"unit": json.dumps(u.__dict__)} for u in units]
    ds = strict_pool_dataset(ray.data.from_items(items, override_num_blocks=len(items)))
    ds = ds.map_batches(
        UnitEncoder, fn_constructor_args=(blob, plan), batch_size=1, compute=compute,
        num_gpus=1 if use_gpu else 0, num_cpus=0.5 if use_gpu else 1)
    try:
        res = []
        with Progress("encode", total, units=len(items)) as prog, driver_stderr_filtered():   # a line per unit
            for r in ds.iter_rows():
                res.append(r)
                prog.update(int(r["rows"]) + int(r["skipped"]))
        return res
    except Exception as e:
        commit.abort()
        del ds   # its execution holds the actor pool
        err = released_ray_failure(e)   # the actors' CPUs back before the caller goes on
    raise err


def _commit_units(cfg: EncodeConfig, out: Location, commit: Commit, res: list[dict], total: int, metadata: dict,
                  int8: bool, ref, t0: float) -> EncodeResult:
    """Every input row accounted for (written or quarantined), then the atomic commit."""
    res = sorted(res, key=lambda r: r["index"])
    staged = [(r["staged"], int(r["rows"])) for r in res if r["staged"]]
    skipped = int(sum(r["skipped"] for r in res))
    rows_out = sum(n for _, n in staged)
    if rows_out + skipped != total:   # validate before the commit point
        commit.abort()
        raise RuntimeError(f"encode wrote {rows_out} rows + {skipped} skipped for {total} input rows; nothing committed")
    quarantine = _merge_skipped(out, [r["skipped_file"] for r in res if r["skipped_file"]], commit) if skipped else None
    extra = {}
    if int8:
        sums: dict[str, float] = {}
        for r in res:
            for k, v in json.loads(str(r["int8_sums"])).items():
                sums[k] = sums.get(k, 0) + v
        extra["int8_error"] = error_report(sums)
    manifest = commit.commit(staged, {**metadata, "rows_in": total, "skipped": skipped, "dtype": cfg.dtype, **extra},
                             quarantine=quarantine)
    span = max(float(r["t_end"]) for r in res) - min(float(r["t_start"]) for r in res)
    return EncodeResult(cfg.output, total, rows_out, skipped, len(staged), ref.uri, ref.version,
                        time.perf_counter() - t0, manifest, span, extra.get("int8_error"))


def _run_units_here(blob: bytes, plan: dict[str, Any], units: list[Unit], commit: Commit, total: int) -> list[dict]:
    """The local executor (and memory://): the actor's code, run in this process. One thread per torch
    thread (a core), each with its own encoder on one torch thread, takes the next unit: as the Ray
    pool's one-thread actors do, without their processes (1 M records on 2 cores: the units took
    15-19 s this way against 21-29 s one unit at a time on 2 torch threads). On a GPU the same: each
    thread reads and decodes its unit's Parquet (the work that bounds a GPU encode; pyarrow releases
    the GIL) and runs its own copy of the model on the one GPU. Any error aborts the commit once no
    thread is writing."""
    threads = torch.get_num_threads()
    n = max(1, min(threads, len(units)))
    try:
        encoders = [UnitEncoder(blob, {**plan, "threads": threads if n == 1 else 1}) for _ in range(n)]
        with Progress("encode", total, units=len(units)) as prog:
            return each_unit(encoders, units, lambda r: prog.update(int(r["rows"]) + int(r["skipped"])))
    except BaseException:
        commit.abort()
        raise
    finally:
        torch.set_num_threads(threads)


def each_unit(encoders: list, units: list[Unit], done) -> list[dict]:
    """`encoder.run_unit` of every unit (results in unit order), the encoders in threads of their
    own, each taking the next unit not yet taken; `done(result)` after each (one at a time). The first
    error stops the others from taking more and is raised once every thread has finished the unit it
    was on, as is an interrupt of the calling thread (Ctrl-C): nothing is written after this returns."""
    res: list[dict | None] = [None] * len(units)
    if len(encoders) == 1:
        for i, u in enumerate(units):
            res[i] = encoders[0].run_unit(dict(u.__dict__))
            done(res[i])
        return res   # type: ignore[return-value]
    lock, stop, errors, nxt = threading.Lock(), threading.Event(), [], iter(range(len(units)))

    def work(enc) -> None:
        while not stop.is_set():
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            try:
                r = enc.run_unit(dict(units[i].__dict__))
            except BaseException as e:
                errors.append(e)
                stop.set()
                return
            res[i] = r
            with lock:
                done(r)

    workers = [threading.Thread(target=work, args=(e,), name=f"vaepipe-unit-{k}", daemon=True)
               for k, e in enumerate(encoders)]
    for t in workers:
        t.start()
    try:
        for t in workers:
            while t.is_alive():
                t.join(0.2)   # a timed wait: Ctrl-C reaches this thread
    except BaseException:
        stop.set()
        for t in workers:
            t.join()
        raise
    if errors:
        raise errors[0]
    return res   # type: ignore[return-value]


def _merge_skipped(out: Location, paths: list[str], commit: Commit) -> str:
    """Every unit's skipped records in one staged file (the commit moves it to the control folder)."""
    tables = []
    for p in paths:
        with out.fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    dst = commit.staged_path("skipped.parquet")
    out.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
    with out.fs.open(dst, "wb") as f:
        pq.write_table(pa.concat_tables(tables, promote_options="default"), f)
    return dst
