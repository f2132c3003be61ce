"""The per-worker training loop, in torchtune's recipe shape: `TrainWorker(cfg)` is constructed,
`setup()` builds the model, optimiser and data (`_setup_model`, `_setup_optimizer`, `_setup_data`),
`train()` runs the epochs, `cleanup()` releases what setup took. Ray touches it at a few named
points only: get_context (rank), get_dataset_shard (data), get_checkpoint/report (checkpoints),
prepare_model (DDP) and get_device. The maths is vae.train_step, which tests run without Ray.

With `--labels`, `train()` has two phases, each epoch checkpointed and journalled alike, numbered on
from the VAE's: the VAE epochs (M1 and the M2 head in one loss), then `--head-epochs` that train the
M2 head alone on the frozen VAE's q(z1|x) of the cached shard (vae.semi.m2_epoch). A checkpoint's
`extra["phase"]` says which; a restarted or resumed run continues from its phase and epoch."""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.training.faults import FaultPlan
from pipeline.table.features import FeatureSpec, check_finite, raw_dtype, to_matrix
from pipeline.table.labels import label_indices
from pipeline.training.run_store import CHECKPOINT_FILE, RunStore
from pipeline.training.train_config import OptimConfig
from vae.checkpoint import checkpoint_state, load_checkpoint, state_bytes
from vae.config import VAEConfig
from vae.loss import kl_weight
from vae.model import VAE
from vae.recipe import NETS_MIN_GAIN, settle_nets
from vae.semi import M2_LR, build_model, m2_epoch
from vae.spreading import pseudo_label
from vae.train_step import EpochStats, active_units, evaluate, labelled_batches, round_trip, train_epoch

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FILE", "JOURNAL_META", "RunStore", "TrainWorker", "WorkerConfig", "journal_metrics",
           "train_loop_per_worker"]


@dataclass(frozen=True)
class RunRef:
    """Where this training run is recorded: the run folder (checkpoints and the journal; the driver
    copies the journal to MLflow, so workers need no MLflow client or access to the tracking server)."""
    run_dir: str
    storage_options: dict = field(default_factory=dict)
    attempt: int = 0


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a train worker needs, typed and frozen (built once by the driver)."""
    model: dict                  # VAEConfig.to_dict(): the fitted preprocessing and architecture
    spec: FeatureSpec            # feature columns and layout
    input_dim: int
    source: str                  # the input URI, named in bad-record errors
    id_column: str
    optim: OptimConfig
    shuffle_buffer: int
    has_val: bool
    run: RunRef
    faults: FaultPlan
    resume_from: str | None = None   # `--resume`: our own newest complete checkpoint
    labels: str | None = None    # `--labels`: the label column (the classes are in `model`)
    labelled_per_batch: int = 32
    pseudo_labels: float = 0.0   # `--pseudo-labels`: the fraction label spreading labels before the head
    threads: int | None = None   # None: the CPUs of the Ray node this worker lands on / the workers there
    # The cache on: the driver's materialized datasets by name ("train", "val") as their blocks in order,
    # (ObjectRef, first row, end row) each; every worker holds its own share on its device (load_shard).
    # None: the cache off, each epoch streams the worker's Ray Data shard.
    blocks: dict[str, tuple[tuple[Any, int, int], ...]] | None = None
    # A model with a linear path starts it here (vae.linear.PPCA, fit by the driver on the sample the
    # preprocessing was fit on); None: no linear path, or a run that continues from a checkpoint.
    start: Any = None
    nets_min_gain: float = NETS_MIN_GAIN   # --nets-min-gain (vae.recipe.keep_nets)
    checkpoint_interval_s: float = 0.0     # --checkpoint-interval-s (TrainWorker._report); 0: every epoch

    @property
    def cache(self) -> bool:
        return self.blocks is not None


# --- batches -----------------------------------------------------------------------------------------

def _tensors(tables: Iterator, cfg: WorkerConfig, with_labels: bool = False) -> Iterator:
    """Raw feature tensors (B, D) from Arrow tables, converted via Arrow (no object arrays), each
    record checked. Integer vectors stay integers (`raw_dtype`): the model's scaler casts them, so no
    float copy here. `with_labels`: ((B, D), (B,) class indices, -1 = unlabelled) pairs."""
    classes = tuple(cfg.model["semi"]["classes"]) if with_labels else ()
    dtype = None
    for b in tables:
        dtype = dtype or raw_dtype(b.schema, cfg.spec)
        x = to_matrix(b, cfg.spec, cfg.input_dim, source=cfg.source, id_column=cfg.id_column, dtype=dtype)
        check_finite(b, x, cfg.id_column, cfg.source)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")   # Arrow's buffers: read-only, never written
            t = torch.from_numpy(x)
        yield (t, torch.from_numpy(label_indices(b, cfg.labels, classes))) if with_labels else t


def batches(shard, cfg: WorkerConfig, epoch: int, shuffle: bool,
            mid_epoch: Callable[[], None] | None = None) -> Iterator[torch.Tensor]:
    """Raw feature tensors (B, D) streamed from a Ray Data shard (the cache off).
    `mid_epoch` runs before the second batch (fault injection)."""
    kw = {}
    if shuffle and cfg.shuffle_buffer > 0:
        kw = {"local_shuffle_buffer_size": cfg.shuffle_buffer, "local_shuffle_seed": cfg.optim.seed + epoch}
    tables = shard.iter_batches(batch_size=cfg.optim.batch_size, batch_format="pyarrow", prefetch_batches=2, **kw)
    return _before_second(_tensors(tables, cfg), mid_epoch)


def shard_blocks(blocks: tuple[tuple[Any, int, int], ...], rank: int, world: int) -> list[tuple[Any, int, int]]:
    """This rank's share of a cached dataset's blocks, each (block, start, end) rows of that block:
    the rows [rank·m, (rank + 1)·m) of the whole, m = rows // world. Equal shares, as Ray Train's own
    split (streaming_split(equal=True)) makes them: DDP needs the same number of steps on every
    worker, so the last rows % world rows sit out. Contiguous and a pure function of the blocks, so a
    restarted worker gets the rows it had."""
    total = sum(end - start for _, start, end in blocks)
    m = total // world
    lo, hi = rank * m, rank * m + m
    out, at = [], 0
    for ref, start, end in blocks:
        a, b = max(lo, at), min(hi, at + end - start)
        if a < b:
            out.append((ref, start + a - at, start + b - at))
        at += end - start
    return out


def load_shard(blocks: tuple[tuple[Any, int, int], ...], cfg: WorkerConfig, device: torch.device, rank: int = 0,
               world: int = 1, with_labels: bool = False):
    """This worker's share of a cached dataset as one raw tensor (N, D) on its device, fetched from
    the object store straight from the driver's materialized blocks (no Ray Data execution, dataset
    manager or split coordinator actors per run) and checked once, in block order. Integer images stay
    integers: 1 byte per value. `with_labels`: (records, class indices (N,)) instead."""
    import ray
    from ray.data.block import BlockAccessor

    share = shard_blocks(blocks, rank, world)
    tables = (BlockAccessor.for_block(b).to_arrow().slice(a, z - a)
              for b, (_, a, z) in zip(ray.get([ref for ref, _, _ in share]), share))
    parts = list(_tensors(tables, cfg, with_labels=with_labels))
    if with_labels:
        xs, ys = [p[0] for p in parts], [p[1] for p in parts]
        x = torch.cat(xs) if xs else torch.zeros((0, cfg.input_dim), dtype=torch.float32)
        y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)
        return x.to(device), y.to(device)
    x = torch.cat(parts) if parts else torch.zeros((0, cfg.input_dim), dtype=torch.float32)
    return x.to(device)


def cached_batches(x: torch.Tensor, batch_size: int, epoch: int, shuffle: bool, rank: int = 0, *, seed: int,
                   shuffle_buffer: int, mid_epoch: Callable[[], None] | None = None) -> Iterator[torch.Tensor]:
    """Batches (B, D) of a cached shard, reshuffled each epoch by a permutation that is a pure
    function of (seed, epoch, rank): a resumed run sees the batches an uninterrupted one saw.
    `shuffle_buffer` 0 keeps the order (as it does when streaming)."""
    if not shuffle or shuffle_buffer <= 0:
        yield from (x[i:i + batch_size] for i in range(0, len(x), batch_size))
        return
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + rank)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    for i in range(0, len(x), batch_size):
        if i == batch_size and mid_epoch is not None:
            mid_epoch()
        yield x[perm[i:i + batch_size]]


def _before_second(it: Iterator, mid_epoch: Callable[[], None] | None) -> Iterator:
    """`it`, running `mid_epoch` before its second item (fault injection, as the other batch streams)."""
    for i, b in enumerate(it):
        if i == 1 and mid_epoch is not None:
            mid_epoch()
        yield b


def _sum_over_workers(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _allreduce(stats: EpochStats, world: int, device) -> EpochStats:
    if world == 1:
        return stats
    t = torch.tensor([stats.records, stats.neg_elbo, stats.recon, stats.kl], dtype=torch.float64, device=device)
    t = _sum_over_workers(t, world)
    return EpochStats(int(t[0]), float(t[1]), float(t[2]), float(t[3]))


def _average_grads(params, world: int) -> None:
    """Average gradients over the workers: the head-only epochs step M2 outside DDP's forward."""
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            _sum_over_workers(p.grad, world).div_(world)


# --- the recipe --------------------------------------------------------------------------------------

@dataclass
class _Progress:
    """Where training stands: restored from a checkpoint's `extra`, saved into the next one."""
    start_epoch: int = 0
    best: float = float("inf")
    best_epoch: int = -1
    stale: int = 0
    head_done: int = 0       # head-only epochs finished (train --labels)

    def update(self, score: float, epoch: int, min_delta: float) -> None:
        if score < self.best - min_delta:
            self.best, self.best_epoch, self.stale = score, epoch, 0
        else:
            self.stale += 1

    def keep_score(self, score: float, epoch: int) -> float:
        """What Ray Train ranks VAE epoch `epoch`'s checkpoint by (KEEP_SCORE, lowest first; Ray keeps
        the --keep-checkpoints lowest and always the newest): its -ELBO `score`, but never at or below
        the best epoch's unless it is the best epoch (an improvement under --min-delta does not
        outrank it), so the best epoch is never the one deleted."""
        return score if epoch == self.best_epoch else max(score, math.nextafter(self.best, math.inf))


KEEP_SCORE = "keep_score"
"""The metric Ray Train's CheckpointConfig keeps checkpoints by (pipeline.training.train), lowest first."""
KEEP_LAST = 1e300
"""A head epoch's keep score: behind every VAE epoch (the newest is kept anyway, and each head
checkpoint carries the best epoch's VAE); finite, as Ray saves its checkpoint manager's state."""


@dataclass
class _Held:
    """A best VAE epoch that went into no checkpoint yet (TrainWorker._report): what Ray gets for it,
    how many of the pending journal lines are its and earlier, and (rank 0) its checkpoint."""
    epoch: int
    metrics: dict[str, Any]
    lines: int
    checkpoint: dict | None


class TrainWorker:
    """One Ray Train worker. Rank 0 also writes the checkpoints and the journal (which the driver
    copies to MLflow: pipeline.training.train.journal_to_mlflow)."""

    def __init__(self, cfg: WorkerConfig):
        import ray.train
        import ray.train.torch

        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.store = RunStore(cfg.run.run_dir, cfg.run.storage_options)
        self.progress = _Progress()
        self.cached: dict[str, torch.Tensor] | None = None
        self.vae_metrics: dict[str, float] = {}   # the kept VAE epoch's figures: head checkpoints carry them
        # Epochs shorter than --checkpoint-interval-s go into one checkpoint (_report): their journal
        # lines wait here (rank 0), and the best VAE epoch among them is held as its checkpoint.
        self.pending: list[dict] = []
        self.held: _Held | None = None
        self.last_report = time.perf_counter()

    # setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        _quiet_ray_train_logs()
        torch.set_num_threads(self.cfg.threads or _threads_here(self.rank, self.world))
        torch.manual_seed(self.cfg.optim.seed)
        state = self._load_state()
        self._setup_model(state)
        self._setup_optimizer(state)
        self._setup_data()

    def _load_state(self) -> dict | None:
        """The checkpoint to continue from, if any. A restarted worker group gets Ray's latest
        checkpoint of this attempt; `--resume` starts a new attempt (a new Ray run) and passes our
        own newest complete checkpoint. Ray registers a reported checkpoint asynchronously, so a
        worker that dies right after a report can be handed the previous one: rank 0 persisted the
        newer one already, so use that."""
        import ray.train

        state = None
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = load_checkpoint(os.path.join(d, CHECKPOINT_FILE))
        elif self.cfg.resume_from:
            state = self.store.load(self.cfg.resume_from)
        newer = self.store.newest_complete(after=state["epoch"] if state else -1)
        state = newer[1] if newer else state
        if state is not None:
            extra = state["extra"]
            self.progress = _Progress(state["epoch"] + 1, extra["best"], extra["best_epoch"], extra["stale"],
                                      extra.get("head_done", 0))
            self.vae_metrics = {k: v for k, v in extra["metrics"].items() if not k.startswith("head_")}
            if self.rank == 0 and "journal" in extra:   # one line, or the lines of the epochs it holds
                lines = extra["journal"]
                self.store.ensure_journal(*(lines if isinstance(lines, list) else [lines]))
        return state

    def _setup_model(self, state: dict | None) -> None:
        import ray.train.torch

        model = build_model(VAEConfig.from_dict(self.cfg.model))
        if state is not None:
            model.load_state_dict(state["model"])
        elif self.cfg.start is not None:
            model.start_at(self.cfg.start)
        self.model = ray.train.torch.prepare_model(model)   # moves to device; DDP when world > 1
        self.core: VAE = getattr(self.model, "module", self.model)
        self.step_fn = torch.compile(self.model) if self.cfg.optim.compile else self.model

    def _setup_optimizer(self, state: dict | None) -> None:
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(self.core.param_groups(), lr=o.lr, weight_decay=o.weight_decay)
        # --labels: the head-only epochs' own optimiser, over M2's parameters only (the VAE stays frozen)
        self.head_optimizer = torch.optim.AdamW(self.core.m2.parameters(), lr=M2_LR) if self.cfg.labels else None
        if state is not None:   # a checkpoint holds the optimiser of its phase; its state moves to the device
            head = state["extra"].get("phase") == "head"
            (self.head_optimizer if head else self.optimizer).load_state_dict(state["optimizer"])
        self.scaler = torch.amp.GradScaler(self.device.type) if o.amp == "fp16" else None

    def _setup_data(self) -> None:
        """Shards of the train (and val) datasets. With the cache on, each worker holds its share of
        the driver's materialized blocks on its device (the input fits: the driver checked), so an
        epoch is a seeded permutation of one tensor, as in a plain PyTorch loop; otherwise batches
        stream from Ray Data's shards every epoch."""
        import ray.train

        if self.cfg.cache:
            # --labels: the train shard comes with its class indices (train_config refuses --labels without the cache)
            self.cached = {name: load_shard(b, self.cfg, self.device, self.rank, self.world,
                                            with_labels=bool(self.cfg.labels) and name == "train")
                           for name, b in self.cfg.blocks.items()}
        else:
            self.shards = {"train": ray.train.get_dataset_shard("train")}
            if self.cfg.has_val:
                self.shards["val"] = ray.train.get_dataset_shard("val")
        if self.cfg.labels:
            y = self.cached["train"][1]
            print(f"worker {self.rank}: {int((y >= 0).sum()):,} of {len(y):,} training records labelled", flush=True)

    # train ---------------------------------------------------------------------------------------

    def epoch_batches(self, name: str, epoch: int, shuffle: bool) -> Iterator[torch.Tensor]:
        fail = (lambda: self.cfg.faults.maybe_fail(self.rank, epoch)) if shuffle else None
        if self.cfg.labels and name == "train":
            x, y = self.cached["train"]
            if not shuffle:
                return iter([x[i:i + self.cfg.optim.batch_size] for i in range(0, len(x), self.cfg.optim.batch_size)])
            return _before_second(labelled_batches(x, y, self.cfg.optim.batch_size, self.cfg.labelled_per_batch,
                                                   seed=self.cfg.optim.seed, epoch=epoch, rank=self.rank), fail)
        if self.cached is not None:
            return cached_batches(self.cached[name], self.cfg.optim.batch_size, epoch, shuffle, self.rank,
                                  seed=self.cfg.optim.seed, shuffle_buffer=self.cfg.shuffle_buffer, mid_epoch=fail)
        return batches(self.shards[name], self.cfg, epoch, shuffle, mid_epoch=fail)

    def train(self) -> None:
        """The VAE epochs, then (with --labels) the head-only epochs; each skipped once done."""
        self.last_report = time.perf_counter()   # --checkpoint-interval-s counts epochs, not the setup
        if not self._vae_done():
            self._train_vae()
        if self.cfg.labels and self.progress.head_done < self.cfg.optim.head_epochs:
            self._train_head()

    def _vae_done(self) -> bool:
        o, p = self.cfg.optim, self.progress
        return p.start_epoch >= o.epochs or p.head_done > 0 or (o.patience > 0 and p.stale >= o.patience)

    def _train_vae(self) -> None:
        o = self.cfg.optim
        for epoch in range(self.progress.start_epoch, o.epochs):
            metrics = self._run_epoch(epoch)
            score = metrics.get("val_neg_elbo", metrics["train_neg_elbo"])
            self.progress.update(score, epoch, o.min_delta)
            metrics.update(best_neg_elbo=self.progress.best, best_epoch=self.progress.best_epoch)
            self.progress.start_epoch = epoch + 1
            self.vae_metrics = metrics
            stop = o.patience > 0 and self.progress.stale >= o.patience
            self._report(epoch, metrics, metrics, self._vae_line(metrics),
                         keep=self.progress.keep_score(score, epoch), last=stop or epoch == o.epochs - 1)
            if stop:
                break

    def _train_head(self) -> None:
        """Head-only epochs: M2 alone on the frozen VAE's q(z1|x) of this worker's cached shard
        (one encoder pass, then no VAE work at all), numbered on from the VAE's epochs."""
        o = self.cfg.optim
        self._restore_best_vae()
        if self.progress.head_done == 0:
            self._check_nets()
        stats, y = self._shard_posterior(), self.cached["train"][1]
        y_head = self._pseudo_labels(stats, y)
        for h in range(self.progress.head_done, o.head_epochs):
            epoch = self.progress.start_epoch
            head = self._run_head_epoch(epoch, h, stats, y, y_head)
            self.progress.start_epoch, self.progress.head_done = epoch + 1, h + 1
            self._report(epoch, {**self.vae_metrics, **head, "epoch": epoch}, head,
                         f"head epoch {h + 1}/{o.head_epochs}: M2 loss {head['head_loss']:.3f}, labelled training "
                         f"records right {head['head_train_acc']:.1%} {head['head_epoch_time_s']:.1f}s",
                         phase="head", last=h == o.head_epochs - 1)

    def _check_nets(self) -> None:
        """Before the head trains on it, the kept VAE's nets are checked as the driver checks a run
        without labels (pipeline.training.train.check_nets; vae.recipe.keep_nets): the sums are
        added over the workers' validation shards, so every worker decides alike, and a model whose
        nets do not earn their place goes back to its pPCA start. The figures ride in the head
        checkpoints' metrics, where the driver reads them."""
        if not self.cfg.has_val or self.cfg.start is None:
            return
        epoch = self.progress.start_epoch
        sums = _sum_over_workers(round_trip(self.model, self.epoch_batches("val", epoch, shuffle=False), self.device),
                                 self.world)
        nets = settle_nets(self.core, sums, self.cfg.start, self.cfg.nets_min_gain)
        self.vae_metrics = {**self.vae_metrics, **nets}
        if not nets["nets_kept"]:   # the head checkpoints carry the pPCA model's own figures
            seed = self.cfg.optim.seed
            vstats, kl_dims = evaluate(self.model, self.epoch_batches("val", epoch, shuffle=False), self.device,
                                       seed=seed)
            tstats, _ = evaluate(self.model, self.epoch_batches("train", epoch, shuffle=False), self.device, seed=seed)
            self.vae_metrics.update(_allreduce(vstats, self.world, self.device).means("val_")
                                    | _allreduce(tstats, self.world, self.device).means("train_"),
                                    active_units=active_units(kl_dims))

    def _restore_best_vae(self) -> None:
        """The head trains on the VAE the run keeps: when training ended after the best epoch (early
        stopping, or a validation -ELBO that rose later), that epoch's weights (pick_checkpoint would
        register them without head epochs)."""
        p = self.progress
        if p.head_done or p.best_epoch in (-1, p.start_epoch - 1):
            return
        path = self.store.checkpoints().get(p.best_epoch)
        if path is None:
            log.warning("best epoch %d's checkpoint is gone from the run folder; the head trains on the last",
                        p.best_epoch)
            return
        state = self.store.load(path)
        self.core.load_state_dict(state["model"])
        self.vae_metrics = state["extra"]["metrics"]

    @torch.no_grad()
    def _shard_posterior(self, batch: int = 1024) -> torch.Tensor:
        """[μ, log σ²] (N, 2·L) of q(z1|x) for every record of the cached train shard."""
        x = self.cached["train"][0]
        self.core.eval()
        qs = [self.core.embed(x[i:i + batch]) for i in range(0, len(x), batch)]
        return torch.cat([torch.cat([q.mean, q.logvar], -1) for q in qs]) if qs else \
            torch.zeros((0, 2 * self.core.config.latent_dim), device=self.device)

    def _pseudo_labels(self, stats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The head's labels: y plus, with --pseudo-labels, the classes label spreading over the frozen
        VAE's μ gives the unlabelled records it is surest of (vae.spreading.pseudo_label). Over this
        worker's shard, so a deterministic function of the shard and the VAE: a resumed head gets the
        same ones."""
        if self.cfg.pseudo_labels <= 0:
            return y
        g = torch.Generator().manual_seed(self.cfg.optim.seed * 1_000_003 + self.rank)
        out = pseudo_label(stats.chunk(2, -1)[0].float().cpu(), y.cpu(), self.core.m2.num_classes,
                           self.cfg.pseudo_labels, generator=g).to(y.device)
        n = _sum_over_workers(torch.tensor([float(((out >= 0) & (y < 0)).sum()), float((y < 0).sum())],
                                           dtype=torch.float64, device=self.device), self.world)
        self.vae_metrics = {**self.vae_metrics, "pseudo_labelled": float(n[0]),
                            "pseudo_labelled_share": float(n[0] / max(n[1], 1))}
        return out

    def _run_head_epoch(self, epoch: int, h: int, stats: torch.Tensor, y: torch.Tensor,
                        y_head: torch.Tensor | None = None) -> dict[str, float]:
        o, m2 = self.cfg.optim, self.core.m2
        torch.manual_seed(o.seed * 100_003 + epoch * 1009 + self.rank)   # z1 and z2 draws, as _run_epoch's ε
        self.cfg.faults.maybe_fail(self.rank, epoch)
        t0 = time.perf_counter()
        loss, records = m2_epoch(m2, stats, y if y_head is None else y_head, self.head_optimizer, o.batch_size,
                                 self.cfg.labelled_per_batch, seed=o.seed, epoch=h, rank=self.rank,
                                 after_backward=lambda: _average_grads(m2.parameters(), self.world))
        wall = time.perf_counter() - t0
        lab = y >= 0
        with torch.no_grad():
            right = (m2.logits(stats[lab].chunk(2, -1)[0]).argmax(-1) == y[lab]).sum()
        t = _sum_over_workers(torch.tensor([loss, records, float(right), float(lab.sum())], dtype=torch.float64,
                                            device=self.device), self.world)
        return {"head_loss": float(t[0] / max(t[1], 1)), "head_train_acc": float(t[2] / max(t[3], 1)),
                "head_lr": M2_LR, "head_epoch_time_s": wall}

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        o = self.cfg.optim
        torch.manual_seed(o.seed * 100_003 + epoch * 1009 + self.rank)   # ε draws: a function of (seed, epoch, rank)
        lr = o.lr_at(epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        beta = kl_weight(o.beta, epoch + 1, o.warmup_epochs)
        t0 = time.perf_counter()
        stats = train_epoch(self.step_fn, self.epoch_batches("train", epoch, shuffle=True), self.optimizer, beta,
                            o.free_bits, self.device, o.amp, self.scaler, o.grad_clip)
        wall = time.perf_counter() - t0
        stats = _allreduce(stats, self.world, self.device)
        metrics = {"epoch": epoch, "beta": beta, "lr": lr, "epoch_time_s": wall,
                   "samples_per_s": stats.records / max(wall, 1e-9), **stats.means("train_")}
        if self.cfg.has_val:
            vstats, kl_dims = evaluate(self.model, self.epoch_batches("val", epoch, shuffle=False), self.device,
                                       seed=o.seed)
            metrics.update(_allreduce(vstats, self.world, self.device).means("val_"))
            metrics["active_units"] = active_units(kl_dims)
        return metrics

    def _vae_line(self, metrics: dict[str, Any]) -> str:
        return (f"epoch {int(metrics['epoch']) + 1}/{self.cfg.optim.epochs}: train -ELBO {metrics['train_neg_elbo']:.3f}"
                + (f" val -ELBO {metrics['val_neg_elbo']:.3f}" if "val_neg_elbo" in metrics else "")
                + f" lr {metrics['lr']:.2e} {metrics['samples_per_s']:.0f} samples/s {metrics['epoch_time_s']:.1f}s")

    def _report(self, epoch: int, metrics: dict[str, Any], logged: dict[str, Any], line: str,
                phase: str = "vae", keep: float = KEEP_LAST, last: bool = False) -> None:
        """The end of an epoch: rank 0 prints its progress line; a checkpoint of this phase carrying
        `metrics` is reported to Ray, ranked by `keep` (_Progress.keep_score); then rank 0 appends the
        journal lines of the epochs it holds (their `logged` figures: the driver copies them to MLflow).

        Ray Train V2 takes one report per poll of its controller (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S),
        so an epoch of a small table (milliseconds) would wait for it: 1,200 epochs of a 125-record
        table took 330 s for about 2 s of work. So epochs are checkpointed together until
        --checkpoint-interval-s has passed since the last report (0: every epoch), and always at a
        phase's `last` epoch. The best VAE epoch among them is held as its checkpoint and reported
        first, so the epoch train registers is never lost. A failure in between goes back to the
        last checkpoint and reruns the epochs since, which give the same figures (each epoch's
        shuffle and ε are functions of the seed and the epoch)."""
        if self.rank == 0:
            print(line, flush=True)
            self.pending.append({"epoch": epoch, "phase": phase, "time": time.time(),
                                 "attempt": self.cfg.run.attempt, "world_size": self.world,
                                 **journal_metrics(logged)})
        best = phase == "vae" and epoch == self.progress.best_epoch
        if not (last or self._interval_passed()):
            if best:   # held (every rank knows it is; rank 0 keeps its checkpoint) until the next report
                self.held = _Held(epoch, {**metrics, KEEP_SCORE: keep}, len(self.pending),
                                  self._checkpoint(epoch, metrics, phase, copy=True) if self.rank == 0 else None)
            return
        if self.held is not None and self.held.epoch != epoch:
            h = self.held
            self._commit(h.epoch, h.metrics, h.checkpoint, self.pending[:h.lines])
            self.pending = self.pending[h.lines:]
        self.held = None
        self._commit(epoch, {**metrics, KEEP_SCORE: keep},
                     self._checkpoint(epoch, metrics, phase) if self.rank == 0 else None, self.pending)
        self.pending = []
        self.last_report = time.perf_counter()

    def _interval_passed(self) -> bool:
        """Whether --checkpoint-interval-s has passed since the last report, by rank 0's clock
        (every rank must report alike)."""
        interval = self.cfg.checkpoint_interval_s
        if interval <= 0:
            return True
        passed = time.perf_counter() - self.last_report >= interval
        if self.world == 1:
            return passed
        flag = torch.tensor([float(passed and self.rank == 0)], device=self.device)
        return bool(_sum_over_workers(flag, self.world).item() > 0)

    def _checkpoint(self, epoch: int, metrics: dict[str, Any], phase: str, copy: bool = False) -> dict:
        """Rank 0: this epoch's checkpoint (_commit adds the journal lines it commits); `copy` for
        one held while training goes on."""
        p = self.progress
        return checkpoint_state(self.core, self.head_optimizer if phase == "head" else self.optimizer, epoch,
                                {"best": p.best, "best_epoch": p.best_epoch, "stale": p.stale, "phase": phase,
                                 "head_done": p.head_done, "metrics": {k: float(v) for k, v in metrics.items()}},
                                copy=copy)

    def _commit(self, epoch: int, metrics: dict[str, Any], checkpoint: dict | None, lines: list[dict]) -> None:
        """Report epoch `epoch`'s checkpoint to Ray (the commit point), then (rank 0) append the
        journal `lines` it commits. The checkpoint carries them too: a worker group torn down between
        the two gets them back from the checkpoint it resumes from (_load_state)."""
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, CHECKPOINT_FILE), "wb") as f:
                f.write(state_bytes({**checkpoint, "extra": {**checkpoint["extra"], "journal": lines}}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"epoch_{epoch:04d}")
        self.store.append_journal(*lines)

    # cleanup -------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Drop the device-resident shards (the largest thing a worker holds) before Ray reuses it."""
        self.cached = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# A journal line is these fields, then the epoch's figures (floats), each logged to MLflow at step = epoch.
JOURNAL_META = ("epoch", "phase", "time", "attempt", "world_size", "recovered")


def journal_metrics(entry: dict) -> dict[str, float]:
    """The figures of a journal line (what MLflow gets for its epoch)."""
    return {k: float(v) for k, v in entry.items() if k not in JOURNAL_META}


def train_loop_per_worker(cfg: WorkerConfig) -> None:
    """construct → setup → train → cleanup."""
    worker = TrainWorker(cfg)
    try:
        worker.setup()
        worker.train()
    finally:
        worker.cleanup()


def _threads_here(rank: int, world: int) -> int:
    """Torch threads from the Ray node this worker landed on: its CPUs / the group's workers on it.
    Workers are counted by Ray node id (gathered over the process group), not by IP as Ray Train's
    local world size is: several nodes may share a host (and an IP). Rank 0 prints every worker's line,
    in rank order: Ray forwards each worker's output on its own schedule, and another rank's line
    reached the driver after the job had ended."""
    import ray

    from pipeline.runtime.ray_runtime import worker_threads

    node_id = ray.get_runtime_context().get_node_id()
    here = 1
    if world > 1:
        import torch.distributed as dist

        ids: list = [None] * world
        dist.all_gather_object(ids, node_id)
        here = ids.count(node_id)
    n, why = worker_threads(here)
    line = f"worker {rank}/{world} on {why}"
    lines = [line] * world   # every rank's, gathered below
    if world > 1:
        dist.all_gather_object(lines, line)
    if rank == 0:
        print("\n".join(lines), flush=True)
    return n


def _quiet_ray_train_logs() -> None:
    """Ray Train V2 logs "Reporting training result …" at INFO for every report, from a logger named
    by its module's *file path* (logging.getLogger(__file__)), so quieting "ray.train" misses it."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as _ctx
    except ImportError:   # a Ray without that module: the noise stays, nothing breaks
        return
    logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)
