"""`vaepipe train`'s configuration. Users keep one flat set of flags and YAML keys (`--lr`, `lr:`);
the fields are grouped (model, optimisation, data, checkpointing, registry, compute), `--help` shows
them under those groups, and code reads a group as a frozen, typed view (`cfg.optim`, `cfg.model`…),
the way litgpt passes typed argument groups instead of one bag of settings."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.runtime.config import RuntimeConfig, opt, parse_storage_options
from pipeline.runtime.errors import ConfigError
from vae.recipe import PSEUDO_LABELS
from vae.train_step import cosine_lr

G = TypeVar("G")

ARCHS = ("auto", "mlp", "conv", "resconv")
LIKELIHOODS = ("auto", "bernoulli", "gaussian")
SCALINGS = ("auto", "range", "uint8", "minmax", "standardize", "none")
AMPS = ("off", "bf16", "fp16")
PROMOTES = ("auto", "force", "never")
SCHEDULES = ("cosine", "constant")
CACHES = ("auto", "on", "off")


@dataclass(frozen=True)
class ModelOptions:
    """What to build: architecture, sizes, likelihood, input scaling ("auto" is decided from the data)."""
    arch: str
    image_shape: tuple[int, ...]
    latent_dim: int
    hidden: tuple[int, ...]
    likelihood: str
    scaling: str
    nets_min_gain: float
    linear_path: bool


@dataclass(frozen=True)
class OptimConfig:
    """How each worker optimises: the loss weights, the schedule, early stopping, precision, seed."""
    epochs: int
    batch_size: int
    lr: float
    lr_schedule: str
    weight_decay: float
    grad_clip: float
    beta: float
    warmup_epochs: float
    free_bits: float
    patience: int
    min_delta: float
    head_epochs: int
    amp: str
    compile: bool
    seed: int

    def lr_at(self, epoch: int) -> float:
        """The epoch's learning rate: constant, or cosine decay to 5 % over the run."""
        return cosine_lr(self.lr, epoch, self.epochs) if self.lr_schedule == "cosine" else self.lr


@dataclass(frozen=True)
class DataOptions:
    """Where the records are and how they are read, split, sampled and cached."""
    input: str
    features: tuple[str, ...]
    id_column: str
    val_input: str | None
    val_fraction: float
    shuffle_buffer: int
    sample_rows: int
    cache: str
    labels: str | None
    labelled_per_batch: int
    pseudo_labels: float


@dataclass(frozen=True)
class CheckpointOptions:
    """Where runs and checkpoints live, how many are kept, restarts, resume and fault injection."""
    storage_path: str | None
    storage_options: str | dict
    run_name: str | None
    resume: bool
    keep_checkpoints: int
    checkpoint_interval_s: float
    max_failures: int
    fail_at_epoch: int | None
    fail_rank: int


@dataclass(frozen=True)
class RegistryOptions:
    """The MLflow experiment, the registered model and when its alias moves."""
    experiment: str
    model_name: str
    alias: str
    promote: str
    min_active_units: int


@dataclass(frozen=True)
class ComputeOptions:
    """Ray Train workers and what each reserves."""
    workers: int
    use_gpu: bool | None
    cpus_per_worker: float


@dataclass
class TrainConfig(RuntimeConfig):
    # data
    input: str = opt("", "Parquet file or folder (any fsspec URI) of training records", group="data")
    features: list[str] = opt(help="one list column, or several numeric scalar columns", factory=list, group="data")
    id_column: str = opt("id", "record id column (named in errors)", group="data")
    val_input: str | None = opt(None, "validation Parquet (default: a content-hash split of --input)", group="data")
    val_fraction: float = opt(0.1, "fraction of --input held out for validation when no --val-input, by a hash of "
                                  "each record's content; with --labels only unlabelled records are held out "
                                  "(validation uses no labels, so every labelled record trains), or all records "
                                  "when that leaves none (e.g. every record labelled)", group="data")
    shuffle_buffer: int = opt(4096, "Ray Data local shuffle buffer when streaming (cache off), records; "
                                     "0 = no shuffle (with the cache as well)", group="data")
    sample_rows: int = opt(10_000, "records read up front to fit the preprocessing", group="data")
    labels: str | None = opt(None, "label column (integers or strings, null where a record has none, as most are): "
                                   "trains the semi-supervised VAE (vae.semi, M1+M2) whose classifier `encode "
                                   "--predict` applies; the class list is stored in the model", group="data")
    labelled_per_batch: int = opt(32, "with --labels: labelled records drawn (with replacement) into every batch "
                                      "on top of --batch-size, so a few labels reach every step", group="data")
    pseudo_labels: float = opt(PSEUDO_LABELS, "with --labels: before the head epochs, label spreading over the "
                                              "frozen VAE's μ (vae.spreading) gives this fraction of the "
                                              "unlabelled records of each class, those it is surest of, their "
                                              "class as a pseudo-label for the head; 0 = off, the default: it helps "
                                              "where spreading's labels are sure (the digits, 0.6: 9.5 to "
                                              "6.8 per cent error) and hurts where classes overlap (iris; docs/quality.md)",
                               group="data")
    cache: str = opt("auto", "read the input once: Ray's object store keeps it across epochs and each "
                             "worker holds its shard on its device, shuffled by a seeded permutation per "
                             "epoch; auto (when under 2 GB as float32), on, off (stream every epoch through "
                             "the local shuffle buffer)", choices=CACHES, group="data")
    # model
    arch: str = opt("auto", "model: mlp, conv, resconv (conv with residual blocks, as diffusers' autoencoders), or "
                            "auto (conv for a list column given --image-shape, or holding square grey images ≥ 8×8)", choices=ARCHS, group="model")
    image_shape: list[int] = opt(help="C,H,W of image records, colour included (default: 1,√D,√D for a square D)",
                                 factory=list, group="model")
    latent_dim: int = opt(16, "latent size (μ has this many floats)", group="model")
    hidden: list[int] = opt(help="MLP widths or conv channels (default: 512,256 / 32,64)", factory=list, group="model")
    likelihood: str = opt("auto", "gaussian (calibrated: the decoder's σ is fitted to the data, σ-VAE), bernoulli "
                                  "(data in [0, 1]), or auto (the calibrated gaussian)",
                          choices=LIKELIHOODS, group="model")
    scaling: str = opt("auto", "range (the data's own range to [0, 1]), uint8, minmax, standardize, none, or "
                               "auto (none for data in [0, 1], range for a list column of integers, "
                               "standardize otherwise)", choices=SCALINGS, group="model")
    nets_min_gain: float = opt(0.10, "the share of the linear (pPCA) part's validation round-trip error the "
                                     "trained nets must remove (less two standard errors) to be kept; otherwise "
                                     "the model is its pPCA start (vae.recipe.keep_nets). Negative: keep them "
                                     "whatever they do", group="model")
    linear_path: bool = opt(True, "Gaussian models: a linear encoder and decoder beside the nets, training started at "
                                  "the pPCA of the sample (vae.linear). --no-linear-path: the nets alone from their "
                                  "seeded start (no pPCA start, no nets' check), so models of different seeds differ, "
                                  "as an ensemble of --score-models wants (docs/quality.md, breast cancer)",
                            group="model")
    min_active_units: int = opt(1, "a model with fewer active latent units (mean KL > 0.01 nats on validation) is "
                                   "registered but never promoted, and train exits 4 (0 = no check)", group="registry")
    # optimisation
    beta: float = opt(1.0, "weight of the KL term (β-VAE)", group="optimisation")
    warmup_epochs: float = opt(0.0, "epochs over which β ramps up from 0 (KL warm-up)", group="optimisation")
    free_bits: float = opt(0.0, "free bits λ per latent dimension, nats (0 = off)", group="optimisation")
    epochs: int = opt(0, "training epochs; 0 = auto: about 2,000 optimizer steps whatever the table's size "
                         "(vae.recipe.auto_epochs: MNIST's 7,200 training records get 36, a 500-row table 400)",
                      group="optimisation")
    batch_size: int = opt(128, "records per batch per worker", group="optimisation")
    lr: float = opt(2e-3, "peak learning rate (AdamW)", group="optimisation")
    lr_schedule: str = opt("cosine", "cosine or constant", choices=SCHEDULES, group="optimisation")
    weight_decay: float = opt(0.0, "AdamW weight decay", group="optimisation")
    grad_clip: float = opt(0.0, "gradient-norm clip (0 = off)", group="optimisation")
    patience: int = opt(0, "early stopping: epochs without val ELBO improvement (0 = off)", group="optimisation")
    min_delta: float = opt(0.0, "early stopping: improvement smaller than this (nats) does not count",
                           group="optimisation")
    head_epochs: int = opt(800, "with --labels: epochs after the VAE's that train only the M2 head (AdamW 1e-3, "
                                 "the VAE frozen) on each record's q(z1|x), computed once from the cached "
                                 "shard: no decoder passes of the VAE; 0 = none. 800 (over 50, 200, then 400) "
                                 "chosen on a validation split of MNIST's training records (docs/quality.md)",
                           group="optimisation")
    seed: int = opt(0, "seed: a 1-worker CPU run is reproducible", group="optimisation")
    amp: str = opt("off", "mixed precision: off, bf16, fp16", choices=AMPS, group="optimisation")
    compile: bool = opt(False, "torch.compile the model", group="optimisation")
    # compute
    workers: int = opt(1, "Ray Train workers (DDP); one per GPU with --use-gpu", group="compute")
    use_gpu: bool | None = opt(None, "train on GPUs (default: when the cluster has them)", group="compute")
    cpus_per_worker: float = opt(1.0, "CPUs each train worker reserves", group="compute")
    # checkpointing
    storage_path: str | None = opt(None, "checkpoint storage (local path or any fsspec URI; default: "
                                         "WORKDIR/ray_results)", group="checkpointing")
    storage_options: str | dict = opt("", "fsspec storage options for --input, --val-input and --storage-path as JSON, e.g. "
                                          '\'{"endpoint_url": "http://minio:9000"}\'', group="checkpointing")
    run_name: str | None = opt(None, "run name: the folder under --storage-path (default: MODEL_NAME-TIMESTAMP)",
                               group="checkpointing")
    resume: bool = opt(False, "continue the latest run of --model-name (or --run-name) from its newest complete "
                              "checkpoint, as a new Ray Train run in the same folder and the same MLflow run",
                       group="checkpointing")
    keep_checkpoints: int = opt(3, "checkpoints each Ray run keeps: the N epochs with the best validation -ELBO "
                                   "(the best one is what train registers) and the newest (what resume and a "
                                   "restarted worker group continue from); the others are deleted",
                                group="checkpointing")
    checkpoint_interval_s: float = opt(1.0, "epochs shorter than this many seconds share one checkpoint (each "
                                            "phase's last epoch and the best one always get theirs; a failure "
                                            "reruns the epochs since, identically); 0: a checkpoint every epoch",
                                       group="checkpointing")
    max_failures: int = opt(1, "worker-group restarts after a failure (from the last checkpoint)", group="checkpointing")
    fail_at_epoch: int | None = opt(None, "fault injection: rank --fail-rank exits once at this epoch",
                                    group="checkpointing")
    fail_rank: int = opt(0, "fault injection: which rank exits", group="checkpointing")
    # registry
    experiment: str = opt("vaepipe", "MLflow experiment", group="registry")
    model_name: str = opt("vae", "registered model name", group="registry")
    alias: str = opt("production", "alias to move when the new version wins", group="registry")
    promote: str = opt("auto", "auto: move the alias if val ELBO beats it; force; never", choices=PROMOTES,
                       group="registry")

    def __post_init__(self) -> None:
        self.require("input", "features")
        for name, allowed in [("arch", ARCHS), ("likelihood", LIKELIHOODS), ("scaling", SCALINGS), ("amp", AMPS),
                              ("promote", PROMOTES), ("lr_schedule", SCHEDULES), ("cache", CACHES)]:
            self.choice(name, allowed)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be ≥ 0 (0 = auto), got {self.epochs}")
        for name in ("batch_size", "workers", "latent_dim", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.nets_min_gain < 1:
            raise ConfigError(f"nets_min_gain must be below 1 (a share of the linear part's error), got {self.nets_min_gain}")
        if self.min_active_units < 0 or self.min_active_units > self.latent_dim:
            raise ConfigError(f"min_active_units must be in [0, latent_dim={self.latent_dim}], got {self.min_active_units}")
        if self.head_epochs < 0:
            raise ConfigError(f"head_epochs must be ≥ 0, got {self.head_epochs}")
        if not 0 <= self.checkpoint_interval_s < math.inf:
            raise ConfigError(f"checkpoint_interval_s must be ≥ 0 seconds (0: a checkpoint every epoch), "
                              f"got {self.checkpoint_interval_s}")
        if self.beta < 0 or self.free_bits < 0 or self.lr <= 0:
            raise ConfigError("beta and free_bits must be ≥ 0 and lr > 0")
        if self.image_shape and len(self.image_shape) != 3:
            raise ConfigError(f"image_shape must be C,H,W, got {self.image_shape}")
        if self.labels is not None:
            if self.labels in self.features:
                raise ConfigError(f"labels column {self.labels!r} is also in features {self.features}")
            if self.cache == "off":
                raise ConfigError("--labels needs the cache (--cache auto or on): labelled records are drawn into "
                                  "every batch from the cached shard")
            if self.labelled_per_batch < 1:
                raise ConfigError(f"labelled_per_batch must be ≥ 1, got {self.labelled_per_batch}")
        if not 0.0 <= self.pseudo_labels < 1.0:
            raise ConfigError(f"pseudo_labels must be in [0, 1) (a fraction of each class's unlabelled records; "
                              f"some stay unlabelled for the head's unlabelled term), got {self.pseudo_labels}")
        self.storage_options_dict()

    def storage_options_dict(self) -> dict[str, Any]:
        return parse_storage_options(self.storage_options)

    def _group(self, cls: type[G]) -> G:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @property
    def model(self) -> ModelOptions:
        return self._group(ModelOptions)

    @property
    def optim(self) -> OptimConfig:
        return self._group(OptimConfig)

    @property
    def data(self) -> DataOptions:
        return self._group(DataOptions)

    @property
    def checkpointing(self) -> CheckpointOptions:
        return self._group(CheckpointOptions)

    @property
    def registry(self) -> RegistryOptions:
        return self._group(RegistryOptions)

    @property
    def compute(self) -> ComputeOptions:
        return self._group(ComputeOptions)
