"""`vaepipe train`: Parquet → Ray Data → Ray Train (TorchTrainer, DDP) → MLflow run → registered
version → `production` alias when it beats the current one on the same validation data."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline import registry
from pipeline.config import RuntimeConfig, opt
from pipeline.errors import ConfigError, InputError
from pipeline.features import check_finite, infer_spec, split_table, to_matrix
from pipeline.parquet_io import check_inputs, list_parquet_files, read_table
from pipeline.train_loop import CHECKPOINT_FILE, RunStore, train_loop_per_worker
from pipeline.uris import Location, arrow_filesystem, resolve
from vae.checkpoint import load_checkpoint, model_from_checkpoint
from vae.config import VAEConfig
from vae.model import VAE
from vae.preprocess import Preprocessing
from vae.train_step import evaluate

log = logging.getLogger(__name__)


@dataclass
class TrainConfig(RuntimeConfig):
    input: str = opt("", "Parquet file or folder (any fsspec URI) of training records")
    features: list[str] = opt(help="one list column, or several numeric scalar columns", factory=list)
    id_column: str = opt("id", "record id column (named in errors)")
    val_input: str | None = opt(None, "validation Parquet (default: a content-hash split of --input)")
    val_fraction: float = opt(0.1, "fraction of --input held out for validation when no --val-input")
    arch: str = opt("auto", "model: mlp, conv, or auto (conv for square images ≥ 8×8)", choices=("auto", "mlp", "conv"))
    image_shape: list[int] = opt(help="C,H,W of image records for conv (default: 1,√D,√D)", factory=list)
    latent_dim: int = opt(16, "latent size (μ has this many floats)")
    hidden: list[int] = opt(help="MLP widths or conv channels (default: 512,256 / 32,64)", factory=list)
    likelihood: str = opt("auto", "bernoulli, gaussian, or auto (bernoulli for data in [0, 1])",
                          choices=("auto", "bernoulli", "gaussian"))
    scaling: str = opt("auto", "uint8, minmax, standardize, none, or auto",
                       choices=("auto", "uint8", "minmax", "standardize", "none"))
    beta: float = opt(1.0, "weight of the KL term (β-VAE)")
    warmup_epochs: float = opt(0.0, "epochs over which β ramps up from 0 (KL warm-up)")
    free_bits: float = opt(0.0, "free bits λ per latent dimension, nats (0 = off)")
    epochs: int = opt(20, "training epochs")
    batch_size: int = opt(128, "records per batch per worker")
    lr: float = opt(2e-3, "peak learning rate (AdamW)")
    lr_schedule: str = opt("cosine", "cosine or constant", choices=("cosine", "constant"))
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(0.0, "gradient-norm clip (0 = off)")
    patience: int = opt(0, "early stopping: epochs without val ELBO improvement (0 = off)")
    min_delta: float = opt(0.0, "early stopping: improvement smaller than this (nats) does not count")
    shuffle_buffer: int = opt(4096, "Ray Data local shuffle buffer when streaming (cache off), records; "
                                     "0 = no shuffle (with the cache as well)")
    seed: int = opt(0, "seed: a 1-worker CPU run is reproducible")
    workers: int = opt(1, "Ray Train workers (DDP); one per GPU with --use-gpu")
    use_gpu: bool | None = opt(None, "train on GPUs (default: when the cluster has them)")
    cpus_per_worker: float = opt(1.0, "CPUs each train worker reserves")
    amp: str = opt("off", "mixed precision: off, bf16, fp16", choices=("off", "bf16", "fp16"))
    compile: bool = opt(False, "torch.compile the model")
    storage_path: str | None = opt(None, "checkpoint storage (local path or any fsspec URI; default: WORKDIR/ray_results)")
    storage_options: str = opt("", "fsspec storage options for --input, --val-input and --storage-path as JSON, e.g. "
                                   '\'{"endpoint_url": "http://minio:9000"}\'')
    run_name: str | None = opt(None, "run name: the folder under --storage-path (default: MODEL_NAME-TIMESTAMP)")
    resume: bool = opt(False, "continue the latest run of --model-name (or --run-name) from its newest complete "
                              "checkpoint, as a new Ray Train run in the same folder and the same MLflow run")
    max_failures: int = opt(1, "worker-group restarts after a failure (from the last checkpoint)")
    fail_at_epoch: int | None = opt(None, "fault injection: rank --fail-rank exits once at this epoch")
    fail_rank: int = opt(0, "fault injection: which rank exits")
    experiment: str = opt("vaepipe", "MLflow experiment")
    model_name: str = opt("vae", "registered model name")
    alias: str = opt("production", "alias to move when the new version wins")
    promote: str = opt("auto", "auto: move the alias if val ELBO beats it; force; never",
                       choices=("auto", "force", "never"))
    sample_rows: int = opt(10_000, "records read up front to fit the preprocessing")
    cache: str = opt("auto", "read the input once: Ray's object store keeps it across epochs and each "
                             "worker holds its shard on its device, shuffled by a seeded permutation per "
                             "epoch; auto (when under 2 GB as float32), on, off (stream every epoch through "
                             "the local shuffle buffer)", choices=("auto", "on", "off"))

    def __post_init__(self) -> None:
        self.require("input", "features")
        for name, allowed in [("arch", ("auto", "mlp", "conv")), ("likelihood", ("auto", "bernoulli", "gaussian")),
                              ("scaling", ("auto", "uint8", "minmax", "standardize", "none")),
                              ("amp", ("off", "bf16", "fp16")), ("promote", ("auto", "force", "never")),
                              ("lr_schedule", ("cosine", "constant"))]:
            self.choice(name, allowed)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("epochs", "batch_size", "workers", "latent_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.beta < 0 or self.free_bits < 0 or self.lr <= 0:
            raise ConfigError("beta and free_bits must be ≥ 0 and lr > 0")
        if self.image_shape and len(self.image_shape) != 3:
            raise ConfigError(f"image_shape must be C,H,W, got {self.image_shape}")
        self.storage_options_dict()

    def storage_options_dict(self) -> dict:
        if not self.storage_options:
            return {}
        try:
            so = json.loads(self.storage_options) if isinstance(self.storage_options, str) else dict(self.storage_options)
        except ValueError as e:
            raise ConfigError(f"storage_options must be a JSON object: {e}") from None
        if not isinstance(so, dict):
            raise ConfigError(f"storage_options must be a JSON object, got {self.storage_options!r}")
        return so


@dataclass
class TrainResult:
    run_id: str
    model_uri: str
    version: str
    promoted: bool
    metrics: dict[str, float]
    checkpoint: str          # a local checkpoint file (downloaded when the storage is remote)
    epochs_run: int
    wall_s: float
    run_dir: str = ""        # the run folder (local path or URI): vaepipe_run.json, journal.jsonl, checkpoints


def _model_config(cfg: TrainConfig, pre: Preprocessing, dim: int, layout: str, sample_in_unit: bool) -> VAEConfig:
    side = math.isqrt(dim)
    arch = cfg.arch
    if arch == "auto":
        arch = "conv" if layout == "list" and side * side == dim and side >= 8 and side % 4 == 0 else "mlp"
    shape: tuple[int, ...] = (dim,)
    if arch == "conv":
        shape = tuple(cfg.image_shape) if cfg.image_shape else (1, side, side)
        if math.prod(shape) != dim:
            raise ConfigError(f"image_shape {shape} does not match {dim} features")
    hidden = tuple(cfg.hidden) or ((32, 64) if arch == "conv" else (512, 256))
    likelihood = cfg.likelihood
    if likelihood == "auto":
        in_unit = pre.unit_interval or (pre.scaling == "none" and sample_in_unit)
        likelihood = "bernoulli" if in_unit else "gaussian"
    return VAEConfig(input_shape=shape, arch=arch, latent_dim=cfg.latent_dim, hidden=hidden,
                     likelihood=likelihood, preprocessing=pre)


def prepare_data(cfg: TrainConfig) -> dict[str, Any]:
    """Check the input before any work and fit the preprocessing on a sample."""
    so = cfg.storage_options_dict()   # e.g. an S3 endpoint: the input's store as well as the checkpoints'
    loc = resolve(cfg.input, **so)
    files = list_parquet_files(loc)
    schema, rows, per_file = check_inputs(loc, files)
    if rows == 0:
        raise InputError(f"input {cfg.input!r} has no records ({len(files)} file(s), 0 rows)")
    spec = infer_spec(schema, cfg.features, source=cfg.input)
    cols = list(spec.columns) + ([cfg.id_column] if cfg.id_column in schema.names else [])
    sample, n = [], 0
    for path in files:
        t = read_table(loc, path, cols)
        if t.num_rows:
            x = to_matrix(t, spec, spec.dim, source=loc.full(path), id_column=cfg.id_column)
            check_finite(t, x, cfg.id_column, loc.full(path))
            sample.append(x)
            n += len(x)
        if n >= cfg.sample_rows:
            break
    x = np.concatenate(sample)[: cfg.sample_rows]
    pre = Preprocessing.fit(x, list(spec.columns), spec.layout, cfg.scaling)
    model_cfg = _model_config(cfg, pre, x.shape[1], spec.layout, bool(x.min() >= 0 and x.max() <= 1))
    fp = registry.fingerprint([(loc.full(p), r, "") for p, r in zip(files, per_file)])
    val = None
    if cfg.val_input:
        vloc = resolve(cfg.val_input, **so)
        vfiles = list_parquet_files(vloc)
        vschema, vrows, _ = check_inputs(vloc, vfiles)
        infer_spec(vschema, cfg.features, source=cfg.val_input)
        val = (vloc, vfiles)
    return {"loc": loc, "files": files, "rows": rows, "spec": spec, "cols": cols, "model": model_cfg,
            "sample": x, "fingerprint": fp, "val": val}


def build_datasets(data: dict, cfg: TrainConfig):
    import ray.data

    def read(loc: Location, files: list[str]):
        ds = ray.data.read_parquet([loc.full(p) if not loc.is_local else p for p in files],
                                   filesystem=loc.arrow_fs() if not loc.is_local else None,
                                   columns=data["cols"], shuffle=None)
        # Blocks in file order, in every execution (materialize() included, which runs with the
        # dataset's own context, not DataConfig's): with the seeded local shuffle, a 1-worker run
        # then sees the same batches in the same order every time. The context is this dataset's
        # private copy (read_parquet copies DataContext.get_current()), shared by its map_batches.
        ds.context.execution_options.preserve_order = True
        return ds

    ds = read(data["loc"], data["files"])
    if data["val"] is not None:
        return ds, read(*data["val"])
    if cfg.val_fraction == 0:
        return ds, None
    spec, f = data["spec"], cfg.val_fraction
    train = ds.map_batches(split_table, batch_format="pyarrow", fn_kwargs=dict(spec=spec, fraction=f, want_val=False))
    val = ds.map_batches(split_table, batch_format="pyarrow", fn_kwargs=dict(spec=spec, fraction=f, want_val=True))
    return train, val


def _latest_run(storage: RunStore, model_name: str) -> str | None:
    """The name of the newest run of `model_name` under the storage root (by its creation time)."""
    best = None
    for meta_path in storage.fs.glob(storage.join("*", RunStore.META)):
        try:
            meta = json.loads(storage.fs.cat_file(meta_path))
        except Exception:
            continue
        if meta.get("model_name") == model_name:
            key = (meta.get("created", 0.0), meta_path)
            best = max(best, key) if best else key
    return best[1].rstrip("/").split("/")[-2] if best else None


def latest_checkpoint(run_dir: str, storage_options: dict | None = None) -> str | None:
    """The newest complete checkpoint file of a run folder (any attempt), or None."""
    found = RunStore(run_dir, storage_options).newest_complete()
    return found[0] if found else None


def run_train(cfg: TrainConfig) -> TrainResult:
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from pipeline.ray_runtime import init_ray, plan_train, quiet_data_progress

    t_start = time.perf_counter()
    os.makedirs(cfg.workdir, exist_ok=True)
    tracking = cfg.resolved_tracking_uri()
    data = prepare_data(cfg)
    init_ray(cfg.ray_address, reserve_cpus=cfg.workers * cfg.cpus_per_worker + 1)
    quiet_data_progress()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    log.info(plan_train(ray.nodes(), cfg.workers, cfg.cpus_per_worker))

    so = cfg.storage_options_dict()
    storage_uri = cfg.storage_path or os.path.join(cfg.workdir, "ray_results")
    if "://" not in storage_uri:
        storage_uri = os.path.abspath(storage_uri)
    else:
        resolve(storage_uri)   # the scheme allowlist and `..` check
    root = RunStore(storage_uri, so)
    root.fs.makedirs(root.path, exist_ok=True)
    run_name = cfg.run_name
    if cfg.resume and not run_name:
        run_name = _latest_run(root, cfg.model_name)
        if run_name is None:
            raise InputError(f"--resume: no earlier run of {cfg.model_name!r} under {storage_uri}")
    if not run_name:
        run_name = f"{cfg.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while root.exists(run_name):
            run_name = f"{run_name}-{os.urandom(2).hex()}"
    run_dir = root.join(run_name) if root.is_local else root.fs.unstrip_protocol(root.join(run_name))
    store = RunStore(run_dir, so)
    meta = store.read_meta()
    if meta and not cfg.resume:
        raise InputError(f"run {run_name!r} already exists under {storage_uri}: pass --resume to continue it, "
                         f"or another --run-name")
    if cfg.resume and not meta:
        log.warning("--resume: run %s has no vaepipe_run.json; starting it fresh", run_name)
    attempts = meta.get("attempts", [])
    # Attempt 0 is the Ray run RUN_NAME (its folder is the run folder); each --resume is a new Ray
    # run resume-K inside it, so Ray never restores (and re-validates) an earlier run's snapshot.
    if not meta:
        attempt, ray_name, ray_parent = 0, run_name, root
    else:   # (a run folder from before attempts were recorded: its first Ray run is attempt 0)
        attempt = max([a["attempt"] for a in attempts] or [0]) + 1
        ray_name, ray_parent = f"resume-{attempt}", store
    resume_from = None
    if cfg.resume and meta:
        found = store.newest_complete()
        resume_from = found[0] if found else None
        if found:
            print(f"resuming {run_name} from epoch {found[1]['epoch'] + 1} ({resume_from}) as Ray run {ray_name}")

    # One MLflow run for the whole training, across worker restarts and --resume.
    import mlflow

    client = registry.client(tracking)
    exp = registry.experiment_id(tracking, cfg.experiment)
    if meta.get("mlflow_run_id") and cfg.resume:
        run_id = meta["mlflow_run_id"]
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp, run_name=run_name).info.run_id
        params = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in cfg.to_dict().items()
                  if k not in ("tracking_uri", "storage_options")}   # options may hold credentials
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
        for k, v in {"input_uri": cfg.input, "data_fingerprint": data["fingerprint"], "git_commit": registry.git_commit(),
                     "input_rows": str(data["rows"]), "ray_run_dir": run_dir, "model_config": json.dumps(data["model"].to_dict())[:5000]}.items():
            client.set_tag(run_id, f"vaepipe.{k}", v)
    attempts.append({"attempt": attempt, "ray_run": ray_name, "resume_from": resume_from, "time": time.time()})
    store.write_meta({"mlflow_run_id": run_id, "model_name": cfg.model_name, "run_name": run_name,
                      "created": meta.get("created", time.time()), "attempts": attempts})

    train_ds, val_ds = build_datasets(data, cfg)
    cache = cfg.cache == "on" or (cfg.cache == "auto" and data["rows"] * data["model"].input_dim * 4 < 2**31)
    if cache:
        # Read and split once, in a fixed block order; each worker then copies its shard to its device
        # (train_loop.load_shard), and promotion re-reads the validation set from here.
        train_ds = train_ds.materialize()
        val_ds = val_ds.materialize() if val_ds is not None else None
    loop_cfg = {
        "model": data["model"].to_dict(), "features": list(data["spec"].columns), "layout": data["spec"].layout,
        "input_dim": data["model"].input_dim, "input": cfg.input, "id_column": cfg.id_column,
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
        "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip, "beta": cfg.beta,
        "warmup_epochs": cfg.warmup_epochs, "free_bits": cfg.free_bits, "patience": cfg.patience,
        "min_delta": cfg.min_delta, "shuffle_buffer": cfg.shuffle_buffer, "seed": cfg.seed, "amp": cfg.amp,
        "compile": cfg.compile, "has_val": val_ds is not None, "resume_from": resume_from, "worker_cache": cache,
        "mlflow_run_id": run_id, "tracking_uri": tracking, "run_dir": run_dir, "storage_options": so,
        "attempt": attempt,
        "fail_at_epoch": cfg.fail_at_epoch, "fail_rank": cfg.fail_rank,
        "threads": None if not use_gpu else 4,   # None: from the CPUs of the node each worker lands on
    }
    datasets = {"train": train_ds} | ({"val": val_ds} if val_ds is not None else {})
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_cfg, datasets=datasets,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=ray_name, storage_path=ray_parent.path,
                                       storage_filesystem=None if root.is_local else arrow_filesystem(root.fs),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] + (["val"] if val_ds is not None else []),
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )
    try:
        trainer.fit()
    except Exception as e:
        client.set_terminated(run_id, status="FAILED")
        raise _unwrap_error(e) from None
    found = store.newest_complete()
    if found is None:
        client.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"training {run_name} finished without a checkpoint in {run_dir}")
    ckpt_path, state = found
    ckpts = store.checkpoints()
    best_epoch = state["extra"]["best_epoch"]
    if best_epoch in ckpts and best_epoch != state["epoch"]:   # restore the best epoch's weights
        try:
            ckpt_path, state = ckpts[best_epoch], store.load(ckpts[best_epoch])
        except Exception as e:
            log.warning("best epoch %d's checkpoint is unreadable (%s); keeping the last", best_epoch, e)
    model = model_from_checkpoint(state)
    metrics = dict(state["extra"]["metrics"])
    epochs_run = len(ckpts)

    # Figures, model, lineage.
    from pipeline import plots

    art = os.path.join(cfg.workdir, "artifacts", run_id)
    os.makedirs(art, exist_ok=True)
    sample = torch.from_numpy(data["sample"][:2000])
    mu = model.embed(sample).mean.numpy()
    pngs = [plots.samples_and_reconstructions(model, sample[:16], os.path.join(art, "samples_reconstructions.png")),
            plots.latent_scatter(mu, None, os.path.join(art, "latent_2d.png"))]
    for p in pngs:
        client.log_artifact(run_id, p, "figures")
    ckpt_file = ckpt_path
    if not store.is_local:   # registry.log_model and callers read a local file
        ckpt_file = os.path.join(art, CHECKPOINT_FILE)
        store.fs.get_file(ckpt_path, ckpt_file)
    model_uri = registry.log_model(run_id, ckpt_file, model.config.input_dim, model.config.latent_dim, tracking,
                                   example=data["sample"][:2])
    client.log_metric(run_id, "wall_time_s", time.perf_counter() - t_start)

    # Registry: register, then move the alias only when the new version wins on the same val data.
    mv = registry.register(model_uri, cfg.model_name, tracking, run_id,
                           tags={"input_uri": cfg.input, "data_fingerprint": data["fingerprint"],
                                 "git_commit": registry.git_commit()})
    promoted = promote(cfg, mv.version, model, data, val_ds, tracking)
    client.set_terminated(run_id, status="FINISHED")
    return TrainResult(run_id=run_id, model_uri=f"models:/{cfg.model_name}/{mv.version}", version=str(mv.version),
                       promoted=promoted, metrics=metrics, checkpoint=ckpt_file, epochs_run=epochs_run,
                       wall_s=time.perf_counter() - t_start, run_dir=run_dir)


def _val_batches(val_ds, data, batch_size=1024):
    spec, dim = data["spec"], data["model"].input_dim
    for b in val_ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        yield torch.from_numpy(to_matrix(b, spec, dim, source="validation"))


def promote(cfg: TrainConfig, version: str, model: VAE, data: dict, val_ds, tracking: str) -> bool:
    """Move `alias` to `version` if it has none yet, with --promote force, or (auto) when the new
    model's validation -ELBO is lower than the current alias holder's on the same validation data."""
    client = registry.client(tracking)
    current = registry.current_alias_version(cfg.model_name, cfg.alias, tracking)
    new_s, cur_s = None, None
    if val_ds is not None and cfg.promote != "never":
        new_s = evaluate(model, _val_batches(val_ds, data), seed=cfg.seed)[0].means()["neg_elbo"]
    if current is not None and cfg.promote == "auto" and val_ds is not None:
        try:
            ref = registry.resolve_model(f"models:/{cfg.model_name}/{current}", tracking)
            _, blob = registry.load_model_bytes(ref.uri, tracking)
            cur_model = model_from_checkpoint(load_checkpoint(blob))
            if cur_model.config.input_dim == model.config.input_dim:
                cur_s = evaluate(cur_model, _val_batches(val_ds, data), seed=cfg.seed)[0].means()["neg_elbo"]
        except Exception as e:  # an unusable current version never blocks a good new one
            log.warning("could not score current %s version %s: %s", cfg.alias, current, e)
    if cfg.promote == "never":
        ok, why = False, "--promote never"
    elif current is None:
        ok, why = True, f"no version holds alias {cfg.alias!r} yet"
    elif cfg.promote == "force":
        ok, why = True, "--promote force"
    elif new_s is None:
        ok, why = False, "no validation data to compare on"
    elif cur_s is None:
        ok, why = True, f"current version {current} could not be scored on this data"
    else:
        ok = new_s < cur_s
        why = f"val -ELBO {new_s:.3f} vs current v{current} {cur_s:.3f} nats"
    if ok:
        registry.set_alias_when_ready(cfg.model_name, cfg.alias, version, tracking)
    tags = {"vaepipe.promotion": "promoted" if ok else "kept", "vaepipe.promotion_reason": why,
            "vaepipe.val_neg_elbo": "" if new_s is None else f"{new_s:.4f}",
            "vaepipe.incumbent_version": current or "", "vaepipe.incumbent_val_neg_elbo": "" if cur_s is None else f"{cur_s:.4f}"}
    for k, v in tags.items():
        client.set_model_version_tag(cfg.model_name, version, k, v)
    print(f"registry: {cfg.model_name} v{version} {'→ ' + cfg.alias if ok else 'not promoted'} ({why})")
    return ok


def _unwrap_error(e: Exception) -> Exception:
    """Surface our own typed errors from inside Ray's TrainingFailedError wrappers."""
    from pipeline.errors import VaepipeError

    seen = set()
    stack = [e]
    while stack:
        cur = stack.pop()
        if id(cur) in seen or cur is None:
            continue
        seen.add(id(cur))
        if isinstance(cur, VaepipeError):
            return cur
        for attr in ("__cause__", "__context__", "cause"):
            stack.append(getattr(cur, attr, None))
        for sub in (getattr(cur, "worker_failures", None) or {}).values() if isinstance(getattr(cur, "worker_failures", None), dict) else []:
            stack.append(sub)
    text = str(e)
    for cls_name in ("BadRecordError", "SchemaError", "InputError"):
        if cls_name in text:
            from pipeline import errors

            line = next((l for l in text.splitlines() if cls_name + ":" in l), text.splitlines()[-1])
            return getattr(errors, cls_name)(line.split(cls_name + ":", 1)[-1].strip())
    return e
