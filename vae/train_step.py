"""One epoch of training and one pass of evaluation, in plain PyTorch: the Ray worker loop calls
these, and tests call them without Ray."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from vae.distributions import record_keys, record_normal
from vae.model import VAE


@dataclass
class EpochStats:
    records: int = 0
    neg_elbo: float = 0.0   # sums over records, in nats
    recon: float = 0.0
    kl: float = 0.0

    def add(self, n: int, neg_elbo: torch.Tensor, recon: torch.Tensor, kl: torch.Tensor) -> None:
        self.records += n
        self.neg_elbo += float(neg_elbo.double().sum())   # float64 sums: batching barely matters
        self.recon += float(recon.double().sum())
        self.kl += float(kl.double().sum())

    def means(self, prefix: str = "") -> dict[str, float]:
        n = max(self.records, 1)
        return {f"{prefix}neg_elbo": self.neg_elbo / n, f"{prefix}elbo": -self.neg_elbo / n,
                f"{prefix}recon": self.recon / n, f"{prefix}kl": self.kl / n}


def autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast context, or nothing for amp='off'."""
    if amp == "off":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_epoch(model: torch.nn.Module, batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
                optimizer: torch.optim.Optimizer, beta: float, free_bits: float = 0.0,
                device: torch.device | str = "cpu", amp: str = "off",
                scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0) -> EpochStats:
    """batches yield raw records (B, D), or (records, class indices (B,), -1 = unlabelled) for a
    semi-supervised model (vae.semi); the model preprocesses them. Returns sums over the epoch."""
    device = torch.device(device)
    model.train()
    core: VAE = getattr(model, "module", model)
    stats = EpochStats()
    for batch in batches:
        raw, kw = (batch[0], {"y": batch[1]}) if isinstance(batch, (tuple, list)) else (batch, {})
        x = core.preprocess(raw.to(device, non_blocking=True))
        with autocast(device, amp):
            out = model(x, beta=beta, free_bits=free_bits, **kw)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(out.loss).backward()
            scaler.unscale_(optimizer)
        else:
            out.loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        stats.add(x.shape[0], out.neg_elbo.detach(), out.recon.detach(), out.kl.detach())
    return stats


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu",
             seed: int = 0) -> tuple[EpochStats, torch.Tensor]:
    """-ELBO, reconstruction and KL on held-out records (β = 1, one z per record), plus the
    per-dimension mean KL (L,) used to count active latent units. Each record's ε is a pure function
    of its content and `seed` (vae.distributions.record_normal), so the result does not depend on
    how the records are batched, ordered or sharded."""
    device = torch.device(device)
    core: VAE = getattr(model, "module", model)
    core.eval()
    stats = EpochStats()
    kl_dims = torch.zeros(core.config.latent_dim, device=device, dtype=torch.float64)
    for raw in batches:
        eps = record_normal(record_keys(raw), core.config.latent_dim, seed)
        x = core.preprocess(raw.to(device))
        out = core(x, eps=eps)
        stats.add(x.shape[0], out.neg_elbo, out.recon, out.kl)
        kl_dims += out.posterior.kl_per_dim().sum(0).double()
    return stats, (kl_dims / max(stats.records, 1)).float().cpu()


@torch.no_grad()
def round_trip(model: torch.nn.Module, batches: Iterable[torch.Tensor],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Over raw held-out records, the sums vae.recipe.keep_nets decides on, (4,) float64 on `device`
    (sums, so workers can add theirs): the whole model's squared round-trip errors, its linear part's,
    the squares of each record's difference of the two, and the record count. A model without a
    linear path gets the whole model's errors twice."""
    device = torch.device(device)
    core: VAE = getattr(model, "module", model)
    core.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for raw in batches:
        full, lin = core.round_trip_errors(core.preprocess(raw.to(device)))
        full, lin = full.double(), (full if lin is None else lin).double()
        sums += torch.stack([full.sum(), lin.sum(), (lin - full).pow(2).sum(), full.new_tensor(float(len(full)))])
    return sums


def active_units(kl_per_dim: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose mean KL exceeds `threshold` nats (they carry information)."""
    return int((kl_per_dim > threshold).sum())


def cosine_lr(peak: float, epoch: int, epochs: int, floor: float = 0.05) -> float:
    """Cosine decay from `peak` at epoch 0 to `floor`·peak at the last epoch, a pure function of the
    epoch (so resuming needs no scheduler state); `peak` throughout a 1-epoch run."""
    if epochs <= 1:
        return peak
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / (epochs - 1))))


def labelled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, labelled_per_batch: int, *, seed: int,
                     epoch: int, rank: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for a semi-supervised model: every record once per epoch in a seeded permutation
    (labelled ones keep their label), each batch topped up with `labelled_per_batch` labelled records
    drawn with replacement, so a few hundred labels among thousands of records reach every step.
    x (N, D) raw, y (N,) class indices with -1 = unlabelled; yields ((B', D), (B',)). A pure function
    of (seed, epoch, rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + rank)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    pool = torch.nonzero(y >= 0).flatten()
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        if len(pool) and labelled_per_batch > 0:
            extra = pool[torch.randint(len(pool), (labelled_per_batch,), generator=g).to(pool.device)]
            idx = torch.cat([idx, extra])
        yield x[idx], y[idx]
