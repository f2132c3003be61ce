"""`vaepipe train`: Parquet → Ray Data → Ray Train (TorchTrainer, DDP) → MLflow run → registered
version → `production` alias when it beats the current one on the same validation data.

`run_train` reads as its steps: prepare the data (check inputs, fit preprocessing) → plan the run
folder (new, or resumed) → open the MLflow run → fit with Ray Train → pick the checkpoint → log the
model and figures → register and promote. Whatever fails after the MLflow run is opened closes it
as FAILED."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.models import registry
from pipeline.runtime.errors import (CollapseError, ConfigError, InputError, RegistryError, VaepipeError,
                                     unwrap_ray_error)
from pipeline.training.faults import FaultPlan
from pipeline.table.labels import check_label_column, read_classes
from pipeline.table.features import FeatureSpec, check_finite, feature_dtypes, infer_spec, split_table, to_matrix
from pipeline.table.parquet_io import check_inputs, list_parquet_files, read_table
from pipeline.runtime.redact import redact_uri
from pipeline.training.run_store import CHECKPOINT_FILE, RunStore
from pipeline.training.train_config import ModelOptions, TrainConfig
from pipeline.training.train_loop import KEEP_SCORE, RunRef, WorkerConfig, journal_metrics, train_loop_per_worker
from pipeline.table.uris import Location, arrow_filesystem, resolve
from vae.anomaly import LatentReference
from vae.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, with_reference
from vae.config import SemiConfig, VAEConfig
from vae.model import VAE
from vae.preprocess import Preprocessing
from vae import recipe
from vae.train_step import active_units, evaluate, round_trip

__all__ = ["TrainConfig", "TrainResult", "run_train", "prepare_data", "build_datasets", "promote"]

log = logging.getLogger(__name__)


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


@dataclass
class PreparedData:
    """The checked input: files, schema-derived feature spec, fitted model config and a sample."""
    loc: Location
    files: list[str]
    rows: int
    spec: FeatureSpec
    cols: list[str]          # columns read: the features and the id column when present
    model: VAEConfig
    sample: np.ndarray       # up to --sample-rows raw records (the preprocessing was fit on them)
    fingerprint: str
    val: tuple[Location, list[str]] | None


@dataclass
class RunPlan:
    """The run folder this training writes to, and which attempt (Ray run) of it this is."""
    name: str
    run_dir: str
    root: RunStore           # the storage root (--storage-path)
    store: RunStore          # the run folder
    meta: dict[str, Any]     # vaepipe_run.json as found ({} for a new run)
    attempt: int
    ray_name: str            # RUN_NAME for attempt 0, resume-K after
    ray_parent: RunStore
    resume_from: str | None


# Never recorded in MLflow: the tracking URI may carry a password, the storage options credentials.
UNLOGGED_FIELDS = ("tracking_uri", "storage_options")


def run_params(cfg: TrainConfig) -> dict[str, str]:
    """The MLflow params of a training run: its config, less UNLOGGED_FIELDS, URIs redacted
    (`user:***@`, sensitive query values masked)."""
    params = {}
    for k, v in cfg.to_dict().items():
        if k in UNLOGGED_FIELDS:
            continue
        v = [redact_uri(x) for x in v] if isinstance(v, list) else redact_uri(v)
        params[k] = (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000]
    return params


def lineage_tags(cfg: TrainConfig, data, run_dir: str) -> dict[str, str]:
    """The run's `vaepipe.*` lineage tags (input URI, data fingerprint, git commit, rows, run folder,
    model config), URIs redacted."""
    return {"input_uri": redact_uri(cfg.input), "data_fingerprint": data.fingerprint,
            "git_commit": registry.git_commit(), "input_rows": str(data.rows), "ray_run_dir": redact_uri(run_dir),
            "model_config": json.dumps(data.model.to_dict())[:5000]}


def _model_config(cfg: ModelOptions, pre: Preprocessing, dim: int, layout: str, sample_in_unit: bool) -> VAEConfig:
    """The architecture and likelihood for this data: vae.recipe decides what is left "auto"."""
    try:
        return recipe.model_config(pre, dim, layout, cfg.latent_dim, arch=cfg.arch, image_shape=cfg.image_shape,
                                   hidden=cfg.hidden, likelihood_choice=cfg.likelihood, sample_in_unit=sample_in_unit,
                                   linear_path=None if cfg.linear_path else False)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """Check the input before any work and fit the preprocessing on a sample."""
    so = cfg.storage_options_dict()   # e.g. an S3 endpoint: the input's store as well as the checkpoints'
    loc = resolve(cfg.input, **so)
    files = list_parquet_files(loc)
    schema, rows, per_file = check_inputs(loc, files)
    if rows == 0:
        raise InputError(f"input {cfg.input!r} has no records ({len(files)} file(s), 0 rows)")
    spec = infer_spec(schema, cfg.features, source=cfg.input)
    cols = list(spec.columns) + ([cfg.id_column] if cfg.id_column in schema.names else [])
    semi = None
    if cfg.labels:
        check_label_column(schema, cfg.labels, list(spec.columns), cfg.input)
        classes, labelled = read_classes(loc, files, cfg.labels, cfg.input)
        semi = SemiConfig(classes=classes)
        cols.append(cfg.labels)
        print(f"labels: {labelled:,} of {rows:,} records labelled in {cfg.labels!r}, {len(classes)} classes")
    x = _sample(loc, files, spec, cols, cfg)
    pre = Preprocessing.fit(x, list(spec.columns), spec.layout, cfg.scaling, dtypes=feature_dtypes(schema, spec))
    model_cfg = _model_config(cfg.model, pre, x.shape[1], spec.layout, bool(x.min() >= 0 and x.max() <= 1))
    model_cfg.semi = semi
    fp = registry.fingerprint([(loc.full(p), r, "") for p, r in zip(files, per_file)])
    val = None
    if cfg.val_input:
        vloc = resolve(cfg.val_input, **so)
        vfiles = list_parquet_files(vloc)
        vschema, _, _ = check_inputs(vloc, vfiles)
        infer_spec(vschema, cfg.features, source=cfg.val_input)
        val = (vloc, vfiles)
    return PreparedData(loc=loc, files=files, rows=rows, spec=spec, cols=cols, model=model_cfg, sample=x,
                        fingerprint=fp, val=val)


def _sample(loc: Location, files: list[str], spec: FeatureSpec, cols: list[str], cfg: TrainConfig) -> np.ndarray:
    """The first --sample-rows records, file by file, each checked for NaN/inf."""
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
    return np.concatenate(sample)[: cfg.sample_rows]


def _ray_train_log_level() -> str:
    """WARNING, or what VAEPIPE_LOG asks for when that is more detailed (INFO, DEBUG)."""
    import logging

    want = logging.getLevelName(os.environ.get("VAEPIPE_LOG", "WARNING").upper())
    return "WARNING" if not isinstance(want, int) or want >= logging.WARNING else logging.getLevelName(want)


def parquet_reader_v2() -> bool:
    """Whether train reads through Ray Data's DataSourceV2 Parquet path: only when
    RAY_DATA_USE_DATASOURCE_V2=1 asks for it. V2 (Ray 2.60's default) lists the files in a task that
    starts FooterReader actors and kills them again, on every execution: the files vaepipe hands it
    are already listed and their footers read (prepare_data). Measured on 2 cores, the 1,797 digits
    in 3 files, read + map + materialize: V2 5.6-13.5 s, the V1 datasource 0.7-3.0 s, per run; a
    train run materializes twice (training and validation split)."""
    return os.environ.get("RAY_DATA_USE_DATASOURCE_V2", "0").strip().lower() in ("1", "true")


def build_datasets(data: PreparedData, cfg: TrainConfig, labelled_train: bool = True):
    """(train, val or None) Ray datasets: --val-input, or a content-hash split of --input (with
    --labels and `labelled_train`, of its unlabelled records: every labelled one trains)."""
    import ray.data

    def read(loc: Location, files: list[str], cols: list[str] = data.cols):
        ctx = ray.data.DataContext.get_current()
        v2 = ctx.use_datasource_v2
        ctx.use_datasource_v2 = parquet_reader_v2()
        try:
            ds = ray.data.read_parquet([loc.full(p) if not loc.is_local else p for p in files],
                                       filesystem=loc.arrow_fs() if not loc.is_local else None,
                                       shuffle=None).select_columns(cols)   # projected at the read
        finally:
            ctx.use_datasource_v2 = v2
        # Blocks in file order, in every execution (materialize() included, which runs with the
        # dataset's own context, not DataConfig's): with the seeded local shuffle, a 1-worker run
        # then sees the same batches in the same order every time. The context is this dataset's
        # private copy (read_parquet copies DataContext.get_current()), shared by its map_batches.
        ds.context.execution_options.preserve_order = True
        return ds

    ds = read(data.loc, data.files)
    if data.val is not None:
        return ds, read(*data.val, [c for c in data.cols if c != cfg.labels])   # validation uses no labels
    if cfg.val_fraction == 0:
        return ds, None
    split = dict(spec=data.spec, fraction=cfg.val_fraction, labels=cfg.labels if labelled_train else None)
    train = ds.map_batches(split_table, batch_format="pyarrow", fn_kwargs=dict(split, want_val=False))
    val = ds.map_batches(split_table, batch_format="pyarrow", fn_kwargs=dict(split, want_val=True))
    return train, val


def plan_run(cfg: TrainConfig) -> RunPlan:
    """The run folder (new, or the one --resume continues) and this attempt's Ray run inside it."""
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
        run_name = root.latest_run(cfg.model_name)
        if run_name is None:
            raise InputError(f"--resume: no earlier run of {cfg.model_name!r} under {redact_uri(storage_uri)}")
    if not run_name:
        run_name = f"{cfg.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while root.exists(run_name):
            run_name = f"{run_name}-{os.urandom(2).hex()}"
    run_dir = root.join(run_name) if root.is_local else root.fs.unstrip_protocol(root.join(run_name))
    store = RunStore(run_dir, so)
    meta = store.read_meta()
    if meta and not cfg.resume:
        raise InputError(f"run {run_name!r} already exists under {redact_uri(storage_uri)}: pass --resume to continue it, "
                         f"or another --run-name")
    if cfg.resume and not meta:
        log.warning("--resume: run %s has no vaepipe_run.json; starting it fresh", run_name)
    # Attempt 0 is the Ray run RUN_NAME (its folder is the run folder); each --resume is a new Ray
    # run resume-K inside it, so Ray never restores (and re-validates) an earlier run's snapshot.
    if not meta:
        return RunPlan(run_name, run_dir, root, store, meta, 0, run_name, root, None)
    # (a run folder from before attempts were recorded: its first Ray run is attempt 0)
    attempt = max([a["attempt"] for a in meta.get("attempts", [])] or [0]) + 1
    found = store.newest_complete()
    resume_from = found[0] if found else None
    if found:
        print(f"resuming {run_name} from epoch {found[1]['epoch'] + 1} ({resume_from}) as Ray run resume-{attempt}")
    return RunPlan(run_name, run_dir, root, store, meta, attempt, f"resume-{attempt}", store, resume_from)


def open_mlflow_run(cfg: TrainConfig, plan: RunPlan, data: PreparedData, tracking: str) -> str:
    """One MLflow run for the whole training, across worker restarts and --resume: a resumed run
    reopens its own; a new one gets the config as params and the lineage as tags. The run folder's
    metadata records it, with this attempt."""
    import mlflow

    client = registry.client(tracking)
    if plan.meta.get("mlflow_run_id") and cfg.resume:
        run_id = plan.meta["mlflow_run_id"]
        client.update_run(run_id, status="RUNNING")
    else:
        exp = registry.experiment_id(tracking, cfg.experiment)
        run_id = client.create_run(exp, run_name=plan.name).info.run_id
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in run_params(cfg).items()])
        for k, v in lineage_tags(cfg, data, plan.run_dir).items():
            client.set_tag(run_id, f"vaepipe.{k}", v)
    attempts = plan.meta.get("attempts", []) + [{"attempt": plan.attempt, "ray_run": plan.ray_name,
                                                 "resume_from": plan.resume_from, "time": time.time()}]
    plan.store.write_meta({"mlflow_run_id": run_id, "model_name": cfg.model_name, "run_name": plan.name,
                           "created": plan.meta.get("created", time.time()), "attempts": attempts})
    return run_id


def training_datasets(data: PreparedData, cfg: TrainConfig):
    """(train, val or None, cache): build_datasets' datasets, materialized when the cache is on. With
    --labels, a split that held out no unlabelled record (every record labelled) falls back to a split
    of all records, so validation is never silently empty (an empty one reads as a -ELBO of 0)."""
    train_ds, val_ds = build_datasets(data, cfg)
    cache = _use_cache(cfg, data)
    if cache:
        # Read and split once, in a fixed block order; each worker then copies its shard to its
        # device (train_loop.load_shard), and promotion re-reads the validation set from here.
        train_ds = train_ds.materialize()
        val_ds = val_ds.materialize() if val_ds is not None else None
        if cfg.labels and not cfg.val_input and val_ds is not None and val_ds.count() == 0:
            print(f"no unlabelled record fell in the --val-fraction split: validating on "
                  f"{cfg.val_fraction:.0%} of all records, labelled ones included")
            train_ds, val_ds = (ds.materialize() for ds in build_datasets(data, cfg, labelled_train=False))
    return train_ds, val_ds, cache


def _use_cache(cfg: TrainConfig, data: PreparedData) -> bool:
    return cfg.cache == "on" or (cfg.cache == "auto" and data.rows * data.model.input_dim * 4 < 2**31)


def cached_blocks(ds) -> tuple[tuple[Any, int, int], ...]:
    """A materialized dataset's blocks in order, as (ObjectRef, first row, end row) (a bundle may
    hold a slice of a block): what train workers fetch their cached shares from (train_loop.load_shard)."""
    return tuple((e.ref, sl.start_offset, sl.end_offset) if sl is not None else (e.ref, 0, e.metadata.num_rows)
                 for bundle in ds.iter_internal_ref_bundles() for e, sl in zip(bundle.blocks, bundle.slices))


def worker_config(cfg: TrainConfig, data: PreparedData, plan: RunPlan, has_val: bool, use_gpu: bool,
                  blocks: dict | None) -> WorkerConfig:
    so = cfg.storage_options_dict()
    return WorkerConfig(
        model=data.model.to_dict(), spec=FeatureSpec(tuple(data.spec.columns), data.spec.layout),
        input_dim=data.model.input_dim, source=cfg.input, id_column=cfg.id_column, optim=cfg.optim,
        shuffle_buffer=cfg.shuffle_buffer, has_val=has_val,
        run=RunRef(plan.run_dir, so, plan.attempt),
        faults=FaultPlan(cfg.fail_at_epoch, cfg.fail_rank, plan.run_dir, so),
        resume_from=plan.resume_from, labels=cfg.labels, labelled_per_batch=cfg.labelled_per_batch,
        pseudo_labels=cfg.pseudo_labels,
        threads=None if not use_gpu else 4,   # None: from the CPUs of the node each worker lands on
        blocks=blocks, start=_ppca_start(data, cfg), nets_min_gain=cfg.nets_min_gain,
        checkpoint_interval_s=cfg.checkpoint_interval_s)


def _ppca_start(data: PreparedData, cfg: TrainConfig):
    """Where a model with a linear path starts: the pPCA of the sample the preprocessing was fit on."""
    return recipe.ppca_start(VAE(data.model), np.ascontiguousarray(data.sample), cfg.seed)


def _trainer_class():
    """TorchTrainer; for a run given no datasets (the cache on: workers fetch their blocks themselves),
    one without Ray Train's datasets callback, which otherwise starts a DatasetManager actor (a process,
    ~3 CPU-seconds, measured) per run even when it has nothing to hand out. The hook is Ray Train V2's
    internal callback list: where it is missing or named otherwise, the plain TorchTrainer runs."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
    except ImportError:
        return TorchTrainer

    class _Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return _Trainer


def fit(cfg: TrainConfig, plan: RunPlan, worker_cfg: WorkerConfig, train_ds, val_ds, use_gpu: bool) -> None:
    """Ray Train: `cfg.workers` DDP workers, the newest `--keep-checkpoints` checkpoints kept, the
    worker group restarted up to `--max-failures` times. Our own typed errors surface unwrapped."""
    import ray.train
    from ray.data import ExecutionOptions

    from pipeline.runtime.ray_runtime import train_env_inherited

    # With the cache on, the workers fetch their shares of the materialized blocks themselves
    # (worker_cfg.blocks): no datasets for Ray Train, so no DatasetManager actor (_trainer_class) and,
    # with more than one worker, no SplitCoordinator per dataset.
    datasets = {} if worker_cfg.cache else {"train": train_ds} | ({"val": val_ds} if val_ds is not None else {})
    trainer = _trainer_class()(
        functools.partial(train_loop_per_worker, worker_cfg), datasets=datasets or None,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=plan.ray_name, storage_path=plan.ray_parent.path,
            storage_filesystem=None if plan.root.is_local else arrow_filesystem(plan.root.fs),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # the N best epochs by -ELBO (train_loop._Progress.keep_score) and, always, the newest
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute=KEEP_SCORE,
                                                         checkpoint_score_order="min"),
            # Ray Train's own INFO lines ("Started training worker group …") stay in its log files
            # unless VAEPIPE_LOG asks for INFO; its warnings and errors still reach the console
            logging_config=ray.train.LoggingConfig(log_level=_ray_train_log_level())),
        # Streaming (the cache off): one worker reads each dataset whole, no split, so no
        # SplitCoordinator actor per dataset; the rows and their order are the same.
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets) if cfg.workers > 1 else [],
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )
    try:
        with train_env_inherited():
            trainer.fit()
    except Exception as e:
        raise unwrap_ray_error(e) from None


JOURNAL_LOGGED_TAG = "vaepipe.journal_lines_logged"


@contextlib.contextmanager
def journal_to_mlflow(store: RunStore, run_id: str, tracking: str, every_s: float = 1.0) -> Iterator[None]:
    """While the block runs (training), a driver thread copies each new line of the run journal to the
    MLflow run: the epoch's figures at step = epoch, timestamped when the epoch finished; once more when
    the block ends, however it ends. Rank 0 writes a line after its epoch's checkpoint, so MLflow gets
    committed epochs only (an epoch lost with its worker group and trained again is logged once), and
    the workers need no MLflow client: no import and no connection per run, and no access to the
    tracking server from worker nodes. The lines logged are counted in a tag written in the same
    log_batch as their figures, so a --resume, or a driver that died part-way, goes on from there
    without logging a line twice (a run from before the tag existed: its workers logged every line)."""
    from mlflow.entities import Metric, RunTag

    client = registry.client(tracking)
    tags = client.get_run(run_id).data.tags
    done = int(tags[JOURNAL_LOGGED_TAG]) if JOURNAL_LOGGED_TAG in tags else len(store.journal())
    stop = threading.Event()

    def copy_new_lines() -> None:
        nonlocal done
        lines = store.journal()
        for start in range(done, len(lines), 50):           # log_batch takes up to 1,000 metrics
            chunk = lines[start:start + 50]
            metrics = [Metric(k, v, int(e["time"] * 1000), int(e["epoch"]))
                       for e in chunk for k, v in journal_metrics(e).items()]
            client.log_batch(run_id, metrics=metrics, tags=[
                RunTag(JOURNAL_LOGGED_TAG, str(start + len(chunk))),
                RunTag("vaepipe.world_size", str(chunk[-1]["world_size"]))])
            done = start + len(chunk)

    def follow() -> None:
        while not stop.wait(every_s):
            try:
                copy_new_lines()
            except Exception as e:   # a tracking server briefly away: the next poll (or the last) catches up
                log.warning("copying the journal to MLflow run %s: %s (retrying)", run_id, e)

    thread = threading.Thread(target=follow, name="vaepipe-journal-to-mlflow", daemon=True)
    thread.start()
    failed = True
    try:
        yield
        failed = False
    finally:
        stop.set()
        thread.join()
        try:
            copy_new_lines()
        except Exception as e:
            if not failed:
                raise
            log.warning("copying the journal to MLflow run %s after the failure: %s", run_id, e)   # keep that error


def pick_checkpoint(plan: RunPlan) -> tuple[str, dict, int]:
    """(path, state, epochs run): the best epoch's checkpoint (Ray Train keeps it: KEEP_SCORE) when it
    loads, else the newest complete one; after head-only epochs (train --labels), the newest: they
    trained the head on the best epoch's VAE (train_loop.TrainWorker._restore_best_vae)."""
    found = plan.store.newest_complete()
    if found is None:
        raise RuntimeError(f"training {plan.name} finished without a checkpoint in {plan.run_dir}")
    path, state = found
    if state["extra"].get("phase") == "head":
        return path, state, state["epoch"] + 1
    ckpts = plan.store.checkpoints()
    best_epoch = state["extra"]["best_epoch"]
    if best_epoch != state["epoch"]:
        if best_epoch in ckpts:
            try:
                path, state = ckpts[best_epoch], plan.store.load(ckpts[best_epoch])
            except (CheckpointError, OSError) as e:
                log.warning("best epoch %d's checkpoint is unreadable (%s); keeping the last", best_epoch, e)
        else:
            log.warning("best epoch %d's checkpoint is gone from %s; keeping the last", best_epoch,
                        redact_uri(plan.run_dir))
    return path, state, found[1]["epoch"] + 1


def log_model_and_figures(cfg: TrainConfig, run_id: str, state: dict, model: VAE, data: PreparedData,
                          tracking: str) -> tuple[str, str]:
    """PNGs of samples and μ, then the model (weights + config + latent reference, pyfunc from code).
    Returns the model URI and the local checkpoint file it was logged from."""
    from pipeline.models import plots

    client = registry.client(tracking)
    art = os.path.join(cfg.workdir, "artifacts", run_id)
    os.makedirs(art, exist_ok=True)
    sample = torch.from_numpy(data.sample[:2000])
    with torch.no_grad():
        mu = model.embed(sample).mean.numpy()
    pngs = [plots.samples_and_reconstructions(model, sample[:16], os.path.join(art, "samples_reconstructions.png")),
            plots.latent_scatter(mu, None, os.path.join(art, "latent_2d.png"))]
    for p in pngs:
        client.log_artifact(run_id, p, "figures")
    # The registered checkpoint: the picked one plus the model's latent reference (the knn_z anomaly
    # scores of encode/nightly), μ of the records the preprocessing was fit on (up to --sample-rows).
    reference = LatentReference.fit(model, torch.from_numpy(np.ascontiguousarray(data.sample)))
    ckpt_file = os.path.join(art, CHECKPOINT_FILE)
    with open(ckpt_file + ".tmp", "wb") as f:
        f.write(with_reference(state, reference))
    os.replace(ckpt_file + ".tmp", ckpt_file)
    client.log_param(run_id, "anomaly_reference_rows", len(reference.mu))
    model_uri = registry.log_model(run_id, ckpt_file, model.config.input_dim, model.config.latent_dim, tracking,
                                   example=data.sample[:2])
    return model_uri, ckpt_file


def run_train(cfg: TrainConfig) -> TrainResult:
    import ray

    from pipeline.runtime.ray_runtime import init_ray, plan_train, quiet_data_progress

    t_start = time.perf_counter()
    os.makedirs(cfg.workdir, exist_ok=True)
    tracking = cfg.resolved_tracking_uri()
    data = prepare_data(cfg)
    if cfg.epochs == 0:
        cfg.epochs = recipe.auto_epochs(int(data.rows * (1 - cfg.val_fraction)) if not cfg.val_input else data.rows,
                                        cfg.batch_size, cfg.workers)
        print(f"epochs: {cfg.epochs} (auto: about {recipe.STEP_BUDGET:,} optimizer steps over {data.rows:,} records)")
    init_ray(cfg.ray_address, reserve_cpus=cfg.workers * cfg.cpus_per_worker + 1)
    quiet_data_progress()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    log.info(plan_train(ray.nodes(), cfg.workers, cfg.cpus_per_worker))
    plan = plan_run(cfg)
    run_id = open_mlflow_run(cfg, plan, data, tracking)
    client = registry.client(tracking)
    try:
        train_ds, val_ds, cache = training_datasets(data, cfg)
        named = {"train": train_ds} | ({"val": val_ds} if val_ds is not None else {})
        blocks = {name: cached_blocks(ds) for name, ds in named.items()} if cache else None
        wcfg = worker_config(cfg, data, plan, val_ds is not None, use_gpu, blocks)
        with journal_to_mlflow(plan.store, run_id, tracking):
            fit(cfg, plan, wcfg, train_ds, val_ds, use_gpu)
        _, state, epochs_run = pick_checkpoint(plan)
        model = model_from_checkpoint(state)
        nets = check_nets(cfg, model, state, data, train_ds, val_ds, wcfg.start)
        model.fit_round_trip(torch.from_numpy(np.ascontiguousarray(data.sample)))   # vae.model: E[x|μ] for decode
        state = {**state, "model": model.state_dict(),
                 "extra": {**state["extra"], "metrics": {**state["extra"]["metrics"], **nets}}}
        for k in NETS_METRICS:   # after the epochs' curves, at the next step
            if k in nets:
                client.log_metric(run_id, k, nets[k], step=epochs_run)
        model_uri, ckpt_file = log_model_and_figures(cfg, run_id, state, model, data, tracking)
        client.log_metric(run_id, "wall_time_s", time.perf_counter() - t_start)
        # Registry: register, then move the alias only when the new version wins on the same val data.
        mv = registry.register(model_uri, cfg.model_name, tracking, run_id,
                               tags={"input_uri": redact_uri(cfg.input), "data_fingerprint": data.fingerprint,
                                     "git_commit": registry.git_commit()})
        collapsed = _collapse(cfg, state)
        try:
            promoted = promote(cfg, mv.version, model, data, val_ds, tracking, collapsed)
        except RegistryError as e:   # a store that failed mid-decision: the user told what moved
            raise RegistryError(f"model {cfg.model_name} v{mv.version} is registered but {e}") from e
    except BaseException as e:   # the MLflow run never stays RUNNING after a failure
        client.set_terminated(run_id, status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    if collapsed:
        raise CollapseError(f"model {cfg.model_name} v{mv.version} is registered but not promoted: {collapsed}")
    return TrainResult(run_id=run_id, model_uri=f"models:/{cfg.model_name}/{mv.version}", version=str(mv.version),
                       promoted=promoted, metrics=dict(state["extra"]["metrics"]), checkpoint=ckpt_file,
                       epochs_run=epochs_run, wall_s=time.perf_counter() - t_start, run_dir=plan.run_dir)


def _record_batches(ds, data: PreparedData, batch_size=1024, source="validation"):
    spec, dim = data.spec, data.model.input_dim
    for b in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        yield torch.from_numpy(to_matrix(b, spec, dim, source=source))


NETS_METRICS = ("nets_kept", "val_round_trip_mse", "val_linear_round_trip_mse", "nets_gain", "nets_gain_lower")


def check_nets(cfg: TrainConfig, model: VAE, state: dict, data: PreparedData, train_ds, val_ds,
               start) -> dict[str, float]:
    """The picked model's nets earn their place or go (vae.recipe.keep_nets): its validation round trip
    against its linear part's alone; a model whose nets fail goes back to its pPCA start `start` (in
    place), and its ELBOs on the training and validation records replace the picked epoch's, so the
    figures registered and printed are the registered model's. A run with --labels checked before its
    head trained (train_loop.TrainWorker._check_nets): its figures are read from the checkpoint.
    Returns the figures (vae.recipe.settle_nets), {} when there is nothing to check (no validation
    records, no linear path); prints the outcome."""
    m = state["extra"]["metrics"]
    if "nets_kept" in m:
        nets = {k: m[k] for k in NETS_METRICS}
    elif val_ds is None or start is None:
        return {}
    else:
        nets = recipe.settle_nets(model, round_trip(model, _record_batches(val_ds, data)), start, cfg.nets_min_gain)
        if not nets["nets_kept"]:   # the pPCA model's own figures replace the picked epoch's
            stats, kl_dims = evaluate(model, _record_batches(val_ds, data), seed=cfg.seed)
            tstats, _ = evaluate(model, _record_batches(train_ds, data, source="training"), seed=cfg.seed)
            nets.update(stats.means("val_") | tstats.means("train_"), active_units=active_units(kl_dims))
    print(f"nets: {'kept' if nets['nets_kept'] else 'dropped, the model is its pPCA start'} (validation round trip "
          f"{nets['val_round_trip_mse']:.4g} against the linear part's {nets['val_linear_round_trip_mse']:.4g} per "
          f"record; the gain's lower bound {nets['nets_gain_lower']:.1%}, --nets-min-gain {cfg.nets_min_gain:g})")
    return nets


def _collapse(cfg: TrainConfig, state: dict) -> str | None:
    """Why the picked checkpoint counts as collapsed (fewer than --min-active-units active latent
    units on validation), naming the flags that help, or None."""
    active = state["extra"]["metrics"].get("active_units")
    if active is None or int(active) >= cfg.min_active_units:
        return None
    return (f"posterior collapse: {int(active)} of {cfg.latent_dim} latent units active (mean KL > 0.01 nats on "
            f"validation), fewer than --min-active-units {cfg.min_active_units}; μ carries (almost) nothing. "
            f"Try a lower --beta (now {cfg.beta:g}), --free-bits 0.1-0.5 (now {cfg.free_bits:g}) or "
            f"--warmup-epochs 5-20 (now {cfg.warmup_epochs:g})")


def promote(cfg: TrainConfig, version: str, model: VAE, data: PreparedData, val_ds, tracking: str,
            collapsed: str | None = None) -> bool:
    """Move `alias` to `version` if it has none yet, with --promote force, or (auto) when the new
    model's validation -ELBO is lower than the current alias holder's on the same validation data;
    never when the model collapsed (`collapsed` says how). A store that fails is a RegistryError
    saying whether the alias moved."""
    try:
        ok, why, current, new_s, cur_s = _decide(cfg, version, model, data, val_ds, tracking, collapsed)
    except RegistryError as e:   # the store failed or stayed busy: no decision on a guess
        raise RegistryError(f"alias {cfg.alias!r} was not moved: {e}") from e
    client = registry.client(tracking)
    tags = {"vaepipe.promotion": "promoted" if ok else "kept", "vaepipe.promotion_reason": why,
            # the figures the decision was made on, exactly (a rounded copy can round differently from
            # the reason's: 39.6725 → "39.672" there, "39.673" here)
            "vaepipe.val_neg_elbo": "" if new_s is None else repr(float(new_s)),
            "vaepipe.incumbent_version": current or "",
            "vaepipe.incumbent_val_neg_elbo": "" if cur_s is None else repr(float(cur_s))}
    try:
        for k, v in tags.items():
            registry.ask(lambda: client.set_model_version_tag(cfg.model_name, version, k, v),   # idempotent
                         f"tag {k} of model {cfg.model_name!r} v{version}", tracking)
    except RegistryError as e:
        raise RegistryError(f"alias {cfg.alias!r} {'points at it' if ok else 'was not moved'} ({why}); the "
                            f"decision's tags were not written: {e}") from e
    print(f"registry: {cfg.model_name} v{version} {'→ ' + cfg.alias if ok else 'not promoted'} ({why})")
    return ok


def _decide(cfg: TrainConfig, version: str, model: VAE, data: PreparedData, val_ds, tracking: str,
            collapsed: str | None):
    """promote's decision, and the alias moved when it says so: (moved, why, incumbent version,
    new and incumbent validation -ELBO)."""
    from mlflow.exceptions import MlflowException

    current = registry.current_alias_version(cfg.model_name, cfg.alias, tracking)
    new_s, cur_s = None, None
    if val_ds is not None and cfg.promote != "never" and not collapsed:
        new_s = evaluate(model, _record_batches(val_ds, data), seed=cfg.seed)[0].means()["neg_elbo"]
    if current is not None and cfg.promote == "auto" and val_ds is not None:
        try:
            ref = registry.resolve_model(f"models:/{cfg.model_name}/{current}", tracking)
            _, blob = registry.load_model_bytes(ref.uri, tracking)
            cur_model = model_from_checkpoint(load_checkpoint(blob))
            if cur_model.config.input_dim == model.config.input_dim:
                cur_s = evaluate(cur_model, _record_batches(val_ds, data), seed=cfg.seed)[0].means()["neg_elbo"]
        except RegistryError:   # the store failed or stayed busy: no decision on a guess
            raise
        except (VaepipeError, CheckpointError, MlflowException, OSError) as e:
            # an unusable current version (missing artifacts, not a vaepipe checkpoint, other
            # features) never blocks a good new one
            log.warning("could not score current %s version %s: %s", cfg.alias, current, e)
    if collapsed:
        ok, why = False, collapsed.split(";")[0]
    elif cfg.promote == "never":
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
    return ok, why, current, new_s, cur_s
