"""Likelihoods and the β-weighted objective: -ELBO = E_q[-log p(x|z)] + KL(q(z|x) || N(0, I))."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reconstruction_nll(params: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """-log p(x|z) per record in nats: (B, D), (B, D) -> (B,).
    bernoulli: params are logits, x in [0, 1] (binary cross-entropy).
    gaussian: params are means, unit variance (0.5·squared error + 0.5·log 2π per dimension)."""
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(params, x, reduction="none").sum(-1)
    if likelihood == "gaussian":
        return 0.5 * ((params - x) ** 2).sum(-1) + 0.5 * x.shape[-1] * math.log(2 * math.pi)
    raise ValueError(f"unknown likelihood {likelihood!r}")


def kl_weight(beta: float, epoch: float, warmup_epochs: float) -> float:
    """β, ramped linearly from 0 over the first `warmup_epochs` (KL warm-up / annealing)."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, epoch / warmup_epochs)


def kl_objective(kl_per_dim: torch.Tensor, free_bits: float) -> torch.Tensor:
    """The KL term the optimiser sees, per record: (B, L) -> (B,). With free bits λ > 0 each latent
    dimension's batch-mean KL below λ nats is not penalised (Kingma et al. 2016)."""
    if free_bits <= 0:
        return kl_per_dim.sum(-1)
    per_dim = kl_per_dim.mean(0).clamp(min=free_bits)          # (L,)
    return per_dim.sum().expand(kl_per_dim.shape[0])           # same value for every record
