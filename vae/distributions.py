"""The encoder's output: a diagonal Gaussian q(z|x) = N(μ, diag(σ²))."""
from __future__ import annotations

import math

import torch


class DiagonalGaussian:
    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, logvar_min: float = -30.0,
                 logvar_max: float = 20.0):
        self.mean = mean                                         # (B, L)
        self.logvar = logvar.clamp(logvar_min, logvar_max)       # (B, L), clamped for stability
        self.std = torch.exp(0.5 * self.logvar)                  # (B, L)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample z = μ + σ·ε, ε ~ N(0, I): differentiable in μ and σ."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl_per_dim(self) -> torch.Tensor:
        """KL(q || N(0, I)) for each latent dimension, in nats: (B, L)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent dimensions: (B,)."""
        return self.kl_per_dim().sum(-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) for z: (..., B, L) -> (..., B)."""
        return (-0.5 * ((z - self.mean) ** 2 / self.logvar.exp() + self.logvar + math.log(2 * math.pi))).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I): (..., L) -> (...)."""
    return (-0.5 * (z.pow(2) + math.log(2 * math.pi))).sum(-1)
