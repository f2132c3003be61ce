"""Likelihoods and the β-weighted objective: -ELBO = E_q[-log p(x|z)] + KL(q(z|x) || N(0, I))."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


LOG_SIGMA_MIN = -7.0
"""Floor of a calibrated decoder's log σ (σ ≥ 0.0009 in model units): a perfect reconstruction of a
constant feature must not send the likelihood to infinity."""


def reconstruction_nll(params: torch.Tensor, x: torch.Tensor, likelihood: str,
                       log_sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
    """-log p(x|z) per record in nats: (B, D), (B, D) -> (B,).
    bernoulli: params are logits, x in [0, 1] (binary cross-entropy).
    gaussian: params are means, one shared standard deviation σ = exp(log_sigma) (unit variance by
    default): 0.5·(x - x̂)²/σ² + log σ + 0.5·log 2π per dimension."""
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(params, x, reduction="none").sum(-1)
    if likelihood == "gaussian":
        log_sigma = torch.as_tensor(log_sigma, dtype=params.dtype, device=params.device)
        sq = ((params - x) ** 2).sum(-1)
        return 0.5 * sq * torch.exp(-2 * log_sigma) + x.shape[-1] * (log_sigma + 0.5 * math.log(2 * math.pi))
    raise ValueError(f"unknown likelihood {likelihood!r}")


def optimal_log_sigma(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The σ that maximises a shared-variance Gaussian likelihood of this batch, log σ* = ½·log mean (x - x̂)²
    (Rybkin et al. 2021's "optimal σ-VAE"), floored at LOG_SIGMA_MIN, without gradient: (B, D) -> ().
    With it the reconstruction term is ½·D·log MSE + const., so the balance against β·KL follows the
    data's own error scale and β = 1 means the same on data in any units."""
    with torch.no_grad():
        return (0.5 * ((params - x) ** 2).mean().clamp_min(1e-30).log()).clamp_min(LOG_SIGMA_MIN)


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
