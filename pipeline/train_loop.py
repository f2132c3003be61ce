"""The per-worker training loop. Ray touches it at a few named points only: get_context (rank),
get_dataset_shard (data), get_checkpoint/report (checkpoints), prepare_model (DDP) and get_device.
The maths is vae.train_step, which tests run without Ray."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings

import torch

from pipeline.features import FeatureSpec, check_finite, raw_dtype, to_matrix
from vae.checkpoint import checkpoint_bytes, load_checkpoint
from vae.config import VAEConfig
from vae.loss import kl_weight
from vae.model import VAE
from vae.train_step import EpochStats, active_units, evaluate, train_epoch

CHECKPOINT_FILE = "checkpoint.pt"


def lr_at(cfg: dict, epoch: int) -> float:
    """Learning rate for an epoch: constant, or cosine decay to 5 % over the run (a pure function of
    the epoch, so resuming needs no scheduler state)."""
    if cfg["lr_schedule"] == "cosine" and cfg["epochs"] > 1:
        return cfg["lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * epoch / (cfg["epochs"] - 1))))
    return cfg["lr"]


def batches(shard, cfg: dict, epoch: int, shuffle: bool, rank: int = 0):
    """Raw feature tensors (B, D) from a Ray Data shard, converted via Arrow (no object arrays).
    Integer vectors stay integers (`raw_dtype`): the model's scaler casts them, so no float copy here."""
    spec = FeatureSpec(tuple(cfg["features"]), cfg["layout"])
    dtype = None
    kw = {}
    if shuffle and cfg["shuffle_buffer"] > 0:
        kw = {"local_shuffle_buffer_size": cfg["shuffle_buffer"], "local_shuffle_seed": cfg["seed"] + epoch}
    for i, b in enumerate(shard.iter_batches(batch_size=cfg["batch_size"], batch_format="pyarrow", prefetch_batches=2, **kw)):
        if shuffle and i == 1:
            _maybe_fail(cfg, rank, epoch)   # dies mid-epoch, after checkpoint epoch-1 was reported
        dtype = dtype or raw_dtype(b.schema, spec)
        x = to_matrix(b, spec, cfg["input_dim"], source=cfg["input"], id_column=cfg["id_column"], dtype=dtype)
        check_finite(b, x, cfg["id_column"], cfg["input"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")   # Arrow's buffers: read-only, never written
            t = torch.from_numpy(x)
        yield t


def load_shard(shard, cfg: dict, device: torch.device) -> torch.Tensor:
    """A worker's whole shard as one raw tensor (N, D) on its device, read and checked once, in the
    shard's (deterministic) block order. Integer images stay integers: 1 byte per value."""
    parts = list(batches(shard, cfg, epoch=0, shuffle=False))
    x = torch.cat(parts) if parts else torch.zeros((0, cfg["input_dim"]), dtype=torch.float32)
    return x.to(device)


def cached_batches(x: torch.Tensor, cfg: dict, epoch: int, shuffle: bool, rank: int = 0):
    """Batches (B, D) of a cached shard, reshuffled each epoch by a permutation that is a pure
    function of (seed, epoch, rank): a resumed run sees the batches an uninterrupted one saw."""
    bs = cfg["batch_size"]
    if not shuffle or cfg["shuffle_buffer"] <= 0:
        yield from (x[i:i + bs] for i in range(0, len(x), bs))
        return
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch * 7919 + rank)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    for i in range(0, len(x), bs):
        if i == bs:
            _maybe_fail(cfg, rank, epoch)   # dies mid-epoch, after checkpoint epoch-1 was reported
        yield x[perm[i:i + bs]]


def _allreduce(stats: EpochStats, world: int, device) -> EpochStats:
    if world == 1:
        return stats
    import torch.distributed as dist

    t = torch.tensor([stats.records, stats.neg_elbo, stats.recon, stats.kl], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return EpochStats(int(t[0]), float(t[1]), float(t[2]), float(t[3]))


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    _quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg["threads"] or _threads_here(rank, world))
    torch.manual_seed(cfg["seed"])
    device = ray.train.torch.get_device()

    model = VAE(VAEConfig.from_dict(cfg["model"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    start_epoch, best, best_epoch, stale = 0, float("inf"), -1, 0

    # Resume: a restarted worker group gets Ray's latest checkpoint of this attempt; `--resume` starts
    # a new attempt (a new Ray run) and passes our own newest complete checkpoint explicitly.
    store = RunStore(cfg["run_dir"], cfg.get("storage_options"))
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(os.path.join(d, CHECKPOINT_FILE))
    elif cfg.get("resume_from"):
        state = store.load(cfg["resume_from"])
    # Ray registers a reported checkpoint asynchronously: a worker that dies right after a report
    # can be restarted with the previous one. Rank 0 persisted the newer one already; use it.
    newer = store.newest_complete(after=state["epoch"] if state else -1)
    state = newer[1] if newer else state
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        best, best_epoch, stale = state["extra"]["best"], state["extra"]["best_epoch"], state["extra"]["stale"]

    model = ray.train.torch.prepare_model(model)   # moves to device; DDP when world > 1
    core: VAE = getattr(model, "module", model)
    scaler = torch.amp.GradScaler(device.type) if cfg["amp"] == "fp16" else None
    step_fn = torch.compile(model) if cfg["compile"] else model

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg["has_val"] else None
    mlflow = None
    if rank == 0 and cfg.get("mlflow_run_id"):
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        mlflow = MlflowClient(tracking_uri=cfg["tracking_uri"])

    # With the cache on, each worker holds its shard on its device (the input fits: the driver checked),
    # so an epoch is a seeded permutation of one tensor, as in a plain PyTorch loop; otherwise stream.
    cached = {"train": load_shard(train_shard, cfg, device)} if cfg.get("worker_cache") else None
    if cached is not None and val_shard is not None:
        cached["val"] = load_shard(val_shard, cfg, device)

    def epoch_batches(name: str, epoch: int, shuffle: bool):
        if cached is not None:
            return cached_batches(cached[name], cfg, epoch, shuffle, rank)
        return batches(train_shard if name == "train" else val_shard, cfg, epoch, shuffle, rank)

    for epoch in range(start_epoch, cfg["epochs"]):
        torch.manual_seed(cfg["seed"] * 100_003 + epoch * 1009 + rank)   # ε draws: a function of (seed, epoch, rank)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(cfg, epoch)
        beta = kl_weight(cfg["beta"], epoch + 1, cfg["warmup_epochs"])
        t0 = time.perf_counter()
        stats = train_epoch(step_fn, epoch_batches("train", epoch, shuffle=True), optimizer, beta,
                            cfg["free_bits"], device, cfg["amp"], scaler, cfg["grad_clip"])
        wall = time.perf_counter() - t0
        stats = _allreduce(stats, world, device)
        metrics = {"epoch": epoch, "beta": beta, "lr": lr_at(cfg, epoch), "epoch_time_s": wall,
                   "samples_per_s": stats.records / max(wall, 1e-9), **stats.means("train_")}
        if val_shard is not None:
            vstats, kl_dims = evaluate(model, epoch_batches("val", epoch, shuffle=False), device, seed=cfg["seed"])
            vstats = _allreduce(vstats, world, device)
            metrics.update(vstats.means("val_"))
            metrics["active_units"] = active_units(kl_dims)
        score = metrics.get("val_neg_elbo", metrics["train_neg_elbo"])
        if score < best - cfg["min_delta"]:
            best, best_epoch, stale = score, epoch, 0
        else:
            stale += 1
        metrics.update(best_neg_elbo=best, best_epoch=best_epoch)
        stop = cfg["patience"] > 0 and stale >= cfg["patience"]

        if rank == 0:
            if mlflow is not None:
                ts = int(time.time() * 1000)
                mlflow.log_batch(cfg["mlflow_run_id"], metrics=[
                    Metric(k, float(v), ts, epoch) for k, v in metrics.items() if k != "epoch"])
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, CHECKPOINT_FILE), "wb") as f:
                    f.write(checkpoint_bytes(core, optimizer, epoch,
                                             {"best": best, "best_epoch": best_epoch, "stale": stale,
                                              "metrics": {k: float(v) for k, v in metrics.items()}}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"epoch_{epoch:04d}")
            print(f"epoch {epoch + 1}/{cfg['epochs']}: train -ELBO {metrics['train_neg_elbo']:.3f}"
                  + (f" val -ELBO {metrics['val_neg_elbo']:.3f}" if "val_neg_elbo" in metrics else "")
                  + f" lr {metrics['lr']:.2e} {metrics['samples_per_s']:.0f} samples/s {wall:.1f}s", flush=True)
            # An append-only journal of finished epochs in the run folder, across restarts and resumes.
            store.append_journal({"epoch": epoch, "time": time.time(), "attempt": cfg.get("attempt", 0),
                                  **{k: float(v) for k, v in metrics.items()}})
        else:
            ray.train.report(metrics)
        if stop:
            break


def _threads_here(rank: int, world: int) -> int:
    """Torch threads from the Ray node this worker landed on: its CPUs / the group's workers on it.
    Workers are counted by Ray node id (gathered over the process group), not by IP as Ray Train's
    local world size is: several nodes may share a host (and an IP)."""
    import ray

    from pipeline.ray_runtime import worker_threads

    node_id = ray.get_runtime_context().get_node_id()
    here = 1
    if world > 1:
        import torch.distributed as dist

        ids: list = [None] * world
        dist.all_gather_object(ids, node_id)
        here = ids.count(node_id)
    n, why = worker_threads(here)
    print(f"worker {rank}/{world} on {why}", flush=True)
    return n


def _quiet_ray_train_logs() -> None:
    """Ray Train V2 logs "Reporting training result …" at INFO for every report, from a logger named
    by its module's *file path* (logging.getLogger(__file__)), so quieting "ray.train" misses it."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as _ctx

        logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)
    except Exception:   # a Ray without that module: noise, not an error
        pass


class RunStore:
    """A vaepipe run folder on any fsspec filesystem (a local path or a URI):

        RUN/vaepipe_run.json        the MLflow run id, model name, attempts
        RUN/journal.jsonl           one line per finished epoch, every attempt appends
        RUN/epoch_NNNN/             checkpoints of the first attempt (Ray run RUN_NAME)
        RUN/resume-K/epoch_NNNN/    checkpoints of the K-th `--resume` (a new Ray run, resume-K)

    Each `--resume` is a new Ray Train run under RUN/, so Ray never restores its own snapshot
    (which refuses to start when a checkpoint it lists was deleted); we pick the checkpoint."""

    META = "vaepipe_run.json"
    JOURNAL = "journal.jsonl"

    def __init__(self, uri: str, storage_options: dict | None = None):
        import fsspec

        self.uri = uri
        self.fs, self.path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.path = self.path.rstrip("/")

    @property
    def is_local(self) -> bool:
        p = self.fs.protocol
        return (p[0] if isinstance(p, (tuple, list)) else p) in ("file", "local")

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.join(*parts))

    def read_meta(self) -> dict:
        p = self.join(self.META)
        return json.loads(self.fs.cat_file(p)) if self.fs.exists(p) else {}

    def write_meta(self, meta: dict) -> None:
        self.fs.makedirs(self.path, exist_ok=True)
        self.fs.pipe_file(self.join(self.META), json.dumps(meta, indent=1).encode())

    def journal(self) -> list[dict]:
        p = self.join(self.JOURNAL)
        self.fs.invalidate_cache()
        if not self.fs.exists(p):
            return []
        return [json.loads(line) for line in self.fs.cat_file(p).decode().splitlines() if line.strip()]

    def append_journal(self, entry: dict) -> None:
        line = (json.dumps(entry) + "\n").encode()
        p = self.join(self.JOURNAL)
        if self.is_local:
            with open(p, "ab") as f:
                f.write(line)
        else:   # object stores cannot append; the journal is small and rank 0 is its only writer
            old = self.fs.cat_file(p) if self.fs.exists(p) else b""
            self.fs.pipe_file(p, old + line)

    def checkpoints(self) -> dict[int, str]:
        """{epoch: path of its checkpoint file}; a later attempt's checkpoint of an epoch wins."""
        found: dict[int, tuple[int, str]] = {}
        self.fs.invalidate_cache()   # object-store listings are cached; Ray and rank 0 write meanwhile
        for pattern in (self.join("epoch_*", CHECKPOINT_FILE), self.join("resume-*", "epoch_*", CHECKPOINT_FILE)):
            for path in self.fs.glob(pattern):
                parts = path.rstrip("/").split("/")
                try:
                    epoch = int(parts[-2].split("_", 1)[1])
                    attempt = int(parts[-3].split("-", 1)[1]) if parts[-3].startswith("resume-") else 0
                except (IndexError, ValueError):
                    continue
                if epoch not in found or attempt > found[epoch][0]:
                    found[epoch] = (attempt, path)
        return {e: p for e, (_, p) in sorted(found.items())}

    def load(self, path: str) -> dict:
        return load_checkpoint(path if self.is_local else self.fs.cat_file(path))

    def newest_complete(self, after: int = -1) -> tuple[str, dict] | None:
        """(path, state) of the newest checkpoint with epoch > `after` that loads completely."""
        for epoch, path in sorted(self.checkpoints().items(), reverse=True):
            if epoch <= after:
                return None
            try:
                return path, self.load(path)
            except Exception:   # a checkpoint cut off mid-copy: fall back to the one before
                continue
        return None


def _maybe_fail(cfg: dict, rank: int, epoch: int) -> None:
    """Fault injection for tests and drills: rank `fail_rank` exits hard, once, at `fail_at_epoch`."""
    if cfg.get("fail_at_epoch") is None or epoch != cfg["fail_at_epoch"] or rank != cfg["fail_rank"]:
        return
    store = RunStore(cfg["run_dir"], cfg.get("storage_options"))
    if store.exists(".fault_injected"):
        return
    store.fs.pipe_file(store.join(".fault_injected"), b"")
    os._exit(1)
