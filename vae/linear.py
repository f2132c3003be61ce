"""Probabilistic PCA (Tipping & Bishop 1999): the linear VAE's optimum, in closed form.

A VAE with a Gaussian likelihood whose encoder and decoder are linear is probabilistic PCA; its ELBO
is maximal at the pPCA solution. The default recipe gives the model a linear path (VAEConfig.linear_path)
beside its nonlinear nets and starts that path here, with the nets' last layers at zero: training
starts from what PCA keeps and the nets learn what PCA cannot. On data where a linear code is about
all there is to have (natural image patches), the model does not have to find it by gradient descent."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PPCA:
    mean: torch.Tensor          # (D,)   the data's mean
    weight: torch.Tensor        # (D, L) W = U_L (Λ_L − σ²I)^½: the decoder's map z → x − mean
    encoder: torch.Tensor       # (L, D) M⁻¹Wᵀ: the posterior mean's map x − mean → μ
    logvar: torch.Tensor        # (L,)   log of the posterior variance σ²/λ_i (the same for every record)
    sigma2: float               # the noise variance: the mean of the discarded eigenvalues


@torch.no_grad()
def fit_ppca(x: torch.Tensor, latent_dim: int, seed: int = 0) -> PPCA:
    """pPCA of records x (N, D) in model space, via a randomised SVD of the top latent_dim components
    (torch.svd_lowrank, 4 power iterations: exact enough for a starting point, seconds for D = 3,072)."""
    x = x.double()
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    torch.manual_seed(seed)
    _, s, v = torch.svd_lowrank(xc, q=min(latent_dim + 10, n, d), niter=4)      # v: (D, q)
    lam = (s[:latent_dim] ** 2 / max(n - 1, 1)).clamp_min(1e-12)                # (L,)
    total = float(xc.pow(2).sum()) / max(n - 1, 1)
    sigma2 = max((total - float(lam.sum())) / max(d - latent_dim, 1), 1e-8)
    lam = torch.maximum(lam, torch.full_like(lam, 2 * sigma2))                  # components above the noise
    u = v[:, :latent_dim]                                                       # (D, L)
    scale = (lam - sigma2).sqrt()                                               # (L,)
    return PPCA(mean=mean.float(), weight=(u * scale).float(), encoder=((scale / lam)[:, None] * u.T).float(),
                logvar=torch.log(sigma2 / lam).float(), sigma2=sigma2)
