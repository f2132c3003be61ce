"""The encoder's output: a diagonal Gaussian q(z|x) = N(μ, diag(σ²))."""
from __future__ import annotations

import math

import numpy as np
import torch

from vae.hashing import record_hash, splitmix64


class DiagonalGaussian:
    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, logvar_min: float = -30.0,
                 logvar_max: float = 20.0):
        self.mean = mean                                         # (B, L)
        self.logvar = logvar.clamp(logvar_min, logvar_max)       # (B, L), clamped for stability
        self.std = torch.exp(0.5 * self.logvar)                  # (B, L)

    def sample(self, generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised sample z = μ + σ·ε, ε ~ N(0, I): differentiable in μ and σ. `eps` (B, L)
        supplies the noise (e.g. per-record noise from `record_normal`) instead of drawing it."""
        if eps is None:
            eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                              dtype=self.mean.dtype)
        else:
            eps = eps.to(device=self.mean.device, dtype=self.mean.dtype)
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


# --- per-record noise: ε as a pure function of (record, seed), whatever the batching or order ------

def record_keys(raw: torch.Tensor) -> np.ndarray:
    """A 64-bit key per record (B, D) -> (B,) uint64 (vae.hashing.record_hash of its float32 values)."""
    return record_hash(raw.detach().reshape(raw.shape[0], -1).float().cpu().numpy())


def record_normal(keys: np.ndarray, dim: int, seed: int = 0) -> torch.Tensor:
    """Standard-normal noise (B, dim), row i a pure function of (keys[i], seed): Box–Muller on a
    counter-based hash, so a record's ε is the same in any batch, order, shard or process."""
    keys = np.asarray(keys, dtype=np.uint64)
    base = splitmix64(keys ^ splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)))   # (B,)
    ctr = np.arange(2 * dim, dtype=np.uint64)                                                         # (2L,)
    with np.errstate(over="ignore"):
        bits = splitmix64(base[:, None] + ctr[None, :] * np.uint64(0xD1B54A32D192ED03))              # (B, 2L)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53                              # (0, 1]
    u1, u2 = u[:, :dim], u[:, dim:]
    return torch.from_numpy(np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)).float()
