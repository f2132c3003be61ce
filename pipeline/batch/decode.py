"""`vaepipe decode`: latents → records in the original feature layout (the decompression half of
the round trip). One Ray Data actor per file batch loads the model once; output committed atomically."""
from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.models import registry
from pipeline.table.commit import Commit, control_of, read_table_manifest
from pipeline.runtime.config import WriterConfig, opt, parse_storage_options
from pipeline.runtime.errors import ConfigError, InputError, SchemaError, released_ray_failure
from pipeline.table.features import FeatureSpec, fixed_size_list, to_matrix
from pipeline.batch.encode import in_process, refuse_partition_of_nightly
from pipeline.table.lease import Lease, hold_lease
from pipeline.table.parquet_io import list_parquet_files, read_footer, read_table, write_options
from pipeline.table.quantize import dequantize
from pipeline.table.uris import resolve
from vae.train_step import active_units
from vae.checkpoint import load_checkpoint, model_from_checkpoint


@dataclass
class DecodeConfig(WriterConfig):
    model: str = opt("models:/vae@production", "registered model (the one that encoded the latents)")
    input: str = opt("", "latents folder written by encode/nightly")
    output: str = opt("", "output folder for reconstructed records")
    column: str = opt("mu", "latent column")
    batch_size: int = opt(4096, "latents per forward pass")
    concurrency: int | None = opt(None, "decoder actors (default: the cluster's CPU cores, at most one per file)")
    storage_options: str = opt("", "fsspec storage options as JSON, for input and output (see encode)")
    reference: str = opt("", "the original records: when given, report the reconstruction MSE against them "
                             "(in the model's input units, [0,1] for 8-bit images) next to PCA with as many "
                             "components as the latent size, fit on the same records (or on --pca-fit)")
    pca_fit: str = opt("", "with --reference: fit the PCA baseline on these records instead, e.g. the model's "
                           "training records, so that neither side has seen the records it is scored on (as "
                           "evaluate and the any-data panel compare); PCA fit on the reference itself is the "
                           "best any linear map can do on it, and on a small reference that is a hard bar")
    id_column: str = opt("id", "record id column joining --reference to the decoded records")

    def __post_init__(self) -> None:
        self.require("model", "input", "output")
        parse_storage_options(self.storage_options)
        if self.pca_fit and not self.reference:
            raise ConfigError("pca_fit is the PCA baseline of --reference's round trip: give --reference too")
        self.check_writer()


def latents_of(table: pa.Table, column: str, source: str) -> np.ndarray:
    """μ as float32 (N, L), dequantising float16 and int8 (scale from the file's metadata)."""
    if column not in table.schema.names:
        raise SchemaError(f"{source}: no latent column {column!r}; columns: {table.schema.names}")
    col = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise SchemaError(f"{source}: column {column!r} is {col.type}, expected fixed_size_list")
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), col.type.list_size)
    if pa.types.is_int8(col.type.value_type):
        scale = (table.schema.metadata or {}).get(b"vaepipe.int8_scale")
        if not scale:
            raise SchemaError(f"{source}: int8 latents without vaepipe.int8_scale metadata")
        x = dequantize(x, np.asarray(json.loads(scale), np.float32))
    return x


class FileDecoder:
    def __init__(self, blob: bytes, plan: dict):
        torch.set_num_threads(1)
        self.model = model_from_checkpoint(load_checkpoint(blob))
        self.plan = plan
        so = plan.get("storage_options", {})
        self.loc, self.out = resolve(plan["input"], **so), resolve(plan["output"], **so)

    def run(self, index: int, path: str) -> dict:
        p, pre = self.plan, self.model.config.preprocessing
        source = self.loc.full(path)
        with self.loc.fs.open(path, "rb") as f:
            t = pq.read_table(f)
        z = latents_of(t, p["column"], source)
        if z.shape[1] != self.model.config.latent_dim:
            raise SchemaError(f"{source}: latents have {z.shape[1]} dims, the model has {self.model.config.latent_dim}")
        x = np.concatenate([self.model.reconstruct(torch.from_numpy(z[i:i + p["batch_size"]])).numpy()
                            for i in range(0, len(z), p["batch_size"])]) if len(z) else np.zeros((0, self.model.config.input_dim), np.float32)
        out = {c: t.column(c) for c in t.schema.names if c not in (p["column"], "logvar", "embedding", "score")}
        if pre.layout == "list":
            out[pre.features[0]] = fixed_size_list(x.astype(np.float32))
        else:
            for j, name in enumerate(pre.features):
                out[name] = pa.array(x[:, j].astype(np.float32))
        meta = {b"vaepipe.decoded_with": p["model_uri"].encode(), b"vaepipe.source_file": source.encode()}
        rel = posixpath.relpath(path, self.loc.path)
        staged = posixpath.join(p["staging"], posixpath.dirname(rel), f"unit-{index:06d}.parquet")
        self.out.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
        with self.out.fs.open(staged, "wb") as f:
            table = pa.table(out).replace_schema_metadata(meta)
            pq.write_table(table, f, **write_options(table.schema))
        return {"index": index, "staged": staged, "rows": len(x)}

    def __call__(self, batch: dict) -> dict:
        res = [self.run(int(i), str(p)) for i, p in zip(batch["index"], batch["path"])]
        return {k: np.array([r[k] for r in res]) for k in res[0]}


def run_decode(cfg: DecodeConfig) -> dict:
    """Take the output's lease, decode every latent, commit atomically."""
    so = parse_storage_options(cfg.storage_options)
    out = resolve(cfg.output, **so)
    refuse_partition_of_nightly(out)
    with hold_lease(control_of(out), out.uri, "decode", cfg.lease_ttl, cfg.wait) as lease:
        return _decode(cfg, lease)


def _decode(cfg: DecodeConfig, lease: Lease) -> dict:
    import ray
    import ray.data

    from pipeline.runtime.progress import Progress
    from pipeline.runtime.ray_pool import strict_pool_dataset
    from pipeline.runtime.ray_runtime import cluster_actors, driver_stderr_filtered, init_ray, quiet_data_progress

    t0 = time.perf_counter()
    so = parse_storage_options(cfg.storage_options)
    loc, out = resolve(cfg.input, **so), resolve(cfg.output, **so)
    files = list_parquet_files(loc)
    total = sum(read_footer(loc, f).num_rows for f in files)   # a corrupt file fails here, named
    ref, blob = registry.load_model_bytes(cfg.model, cfg.resolved_tracking_uri())
    commit = Commit(out, lease=lease)
    read_table_manifest(out, commit.control)   # an untrusted manifest fails here, before any work
    meta = {"vaepipe.decoded_with": ref.uri, "rows_in": total}
    if not files:
        return commit.commit([], meta)
    plan = {"input": cfg.input if "://" in cfg.input else loc.path, "output": cfg.output if "://" in cfg.output else out.path,
            "staging": commit.staging, "column": cfg.column, "batch_size": cfg.batch_size, "model_uri": ref.uri,
            "storage_options": so}
    if in_process(loc, out):   # memory:// is per process: decode here (see encode.in_process)
        threads = torch.get_num_threads()
        try:
            dec = FileDecoder(blob, plan)
            res = [dec.run(i, p) for i, p in enumerate(files)]
        except Exception:
            commit.abort()
            raise
        finally:
            torch.set_num_threads(threads)
        return _finish(commit, res, total, meta, t0)
    init_ray(cfg.ray_address)
    quiet_data_progress()
    n = cluster_actors("decode", requested=cfg.concurrency, units=len(files))
    ds = strict_pool_dataset(ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(files)],
                                                 override_num_blocks=len(files)))
    ds = ds.map_batches(FileDecoder, fn_constructor_args=(blob, plan), batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=n))
    try:
        with Progress("decode", total, units=len(files)) as prog, driver_stderr_filtered():   # a line per file
            res = []
            for r in ds.iter_rows():
                res.append(r)
                prog.update(int(r["rows"]))
    except Exception as e:   # any failure: nothing is committed, and our own typed error surfaces
        commit.abort()
        del ds   # its execution holds the actor pool
        err = released_ray_failure(e)   # the actors' CPUs back before the caller goes on
    else:
        return _finish(commit, res, total, meta, t0)
    raise err


def _finish(commit: Commit, res: list[dict], total: int, meta: dict, t0: float) -> dict:
    res.sort(key=lambda r: r["index"])
    if sum(int(r["rows"]) for r in res) != total:
        commit.abort()
        raise InputError(f"decode wrote {sum(int(r['rows']) for r in res)} of {total} rows; nothing committed")
    manifest = commit.commit([(r["staged"], int(r["rows"])) for r in res], meta)
    manifest["wall_s"] = time.perf_counter() - t0
    return manifest


def _committed_table(uri: str, so: dict) -> pa.Table:
    loc = resolve(uri, **so)
    return pa.concat_tables([read_table(loc, f) for f in list_parquet_files(loc)], promote_options="default")


def roundtrip_report(model_uri: str, reference: str, decoded: str, tracking_uri: str, id_column: str = "id",
                     storage_options: dict | None = None, latents: str | None = None, pca_fit: str = "") -> dict:
    """Reconstruction quality of a committed decode: MSE per value between the original records
    (`reference`) and the decoded ones, joined on `id_column`, in the model's input units (x/255 for
    8-bit images, i.e. [0,1] pixels), next to PCA with k = latent size fit on the same records, or on
    the records of `pca_fit` (the linear baseline at the same number of floats per record). Also
    reports the latent type and the model's active units on these records (0: μ carries nothing, the
    decoded records are all alike), and for a model with a linear path the round trip of that path
    alone (`linear_path_mse`, jobs/decode warns when the whole model does worse: its nets do not carry
    over to these records)."""
    from sklearn.decomposition import PCA

    so = storage_options or {}
    _, blob = registry.load_model_bytes(model_uri, tracking_uri)
    model = model_from_checkpoint(load_checkpoint(blob))
    pre, dim, k = model.config.preprocessing, model.config.input_dim, model.config.latent_dim
    spec = FeatureSpec(tuple(pre.features), pre.layout)
    ref, dec = _committed_table(reference, so), _committed_table(decoded, so)
    for t, what in ((ref, reference), (dec, decoded)):
        if id_column not in t.schema.names:
            raise SchemaError(f"{what}: no id column {id_column!r} to join on; columns: {t.schema.names}")
    ids_r, ids_d = ref.column(id_column).to_numpy(), dec.column(id_column).to_numpy()
    if len(ids_d) != len(ids_r) or set(ids_d.tolist()) != set(ids_r.tolist()):
        raise InputError(f"{decoded}: {len(ids_d)} decoded records do not match the {len(ids_r)} records of {reference}")
    x = to_matrix(ref.take(np.argsort(ids_r, kind="stable")), spec, dim, source=reference)
    y = to_matrix(dec.take(np.argsort(ids_d, kind="stable")), spec, dim, source=decoded)
    with torch.no_grad():
        xt = torch.from_numpy(np.array(x, copy=True))
        xs = model.preprocess(xt).numpy()
        ys = model.preprocess(torch.from_numpy(np.array(y, copy=True))).numpy()
        kl_dims = torch.cat([model.embed(xt[i:i + 4096]).kl_per_dim() for i in range(0, len(xt), 4096)]).mean(0)
        lin = [model.linear_round_trip(torch.from_numpy(xs[i:i + 4096])) for i in range(0, len(xs), 4096)]
    fit_on = xs
    if pca_fit:
        xf = to_matrix(_committed_table(pca_fit, so), spec, dim, source=pca_fit)
        fit_on = model.preprocess(torch.from_numpy(np.array(xf, copy=True))).numpy()
    pca = PCA(n_components=k, random_state=0).fit(fit_on)
    pca_mse = float(((pca.inverse_transform(pca.transform(xs)) - xs) ** 2).mean())
    vae_mse = float(((ys - xs) ** 2).mean())
    out = {"records": int(len(xs)), "latent_dim": k, "vae_mse": vae_mse, "pca_mse": pca_mse,
           "pca_fit_on": pca_fit or "the reference",
           "vae_over_pca": vae_mse / pca_mse if pca_mse else float("inf"),
           "active_units": active_units(kl_dims)}
    if lin and lin[0] is not None:
        out["linear_path_mse"] = float(((torch.cat(lin).numpy() - xs) ** 2).mean())
    if latents:
        loc = resolve(latents, **so)
        first = list_parquet_files(loc)[0]
        out["latent_type"] = str(read_footer(loc, first).schema.to_arrow_schema().field("mu").type)
    return out
