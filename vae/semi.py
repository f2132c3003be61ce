"""Semi-supervised VAE (Kingma et al. 2014, M1+M2): the VAE (M1) learns z1 ~ q(z1|x) from every
record; an M2 model over z1 learns from the few labels and from the unlabelled records alike.

M2, for a class y (one-hot, C classes) and a second latent z2:
    classifier  q(y|z1)            the prediction (`pred`, `pred_prob`)
    encoder     q(z2|z1, y)        a diagonal Gaussian
    decoder     p(z1|z2, y)        a diagonal Gaussian with a learned variance
    prior       p(y) uniform, p(z2) = N(0, I)
labelled record:   L(z1, y) = -ELBO(z1, y) = -log p(z1|z2, y) + KL(q(z2|z1, y) || p(z2)) - log p(y)
                   + α·(unlabelled / labelled records in the batch)·(-log q(y|z1))
unlabelled record: U(z1) = Σ_y q(y|z1)·L(z1, y) - H(q(y|z1))       (y marginalised, C decoder passes)
M1 is trained on its own -ELBO; M2 sees a sample of z1 with the gradient stopped, so the VAE's
latents (μ, what batch jobs write) are those of the unsupervised model, as in the paper's stacking."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vae.config import SemiConfig, VAEConfig
from vae.distributions import DiagonalGaussian
from vae.mlp import mlp
from vae.model import VAE, VAEOutput

UNLABELLED = -1
"""The class index of a record without a label."""


class M2(nn.Module):
    def __init__(self, in_dim: int, cfg: SemiConfig):
        super().__init__()
        self.cfg = cfg
        c, h, z2 = len(cfg.classes), list(cfg.hidden), cfg.latent_dim
        self.num_classes = c
        self.classifier = mlp([in_dim, *h, c])                          # z1 -> logits (C)
        self.encoder = mlp([in_dim + c, *h, 2 * z2])                    # (z1, y) -> μ2, log σ2²
        self.decoder = mlp([z2 + c, *reversed(h), 2 * in_dim])         # (z2, y) -> mean, log-variance of z1

    def logits(self, z1: torch.Tensor) -> torch.Tensor:                # (B, L1) -> (B, C)
        return self.classifier(z1)

    def neg_elbo_per_class(self, z1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """-ELBO(z1, y) for every class y: (B, L1) -> (B, C), nats (y's prior term included)."""
        b, c = z1.shape[0], self.num_classes
        zc = z1.unsqueeze(0).expand(c, b, -1).reshape(c * b, -1)                           # (C·B, L1)
        y = torch.eye(c, device=z1.device, dtype=z1.dtype).repeat_interleave(b, dim=0)     # (C·B, C)
        mean, logvar = self.encoder(torch.cat([zc, y], -1)).chunk(2, dim=-1)               # (C·B, L2) ×2
        q = DiagonalGaussian(mean, logvar)
        z2 = q.sample(generator)                                                            # (C·B, L2)
        m, lv = self.decoder(torch.cat([z2, y], -1)).chunk(2, dim=-1)                      # (C·B, L1) ×2
        lv = lv.clamp(-10.0, 5.0)
        nll = 0.5 * ((zc - m) ** 2 / lv.exp() + lv + math.log(2 * math.pi)).sum(-1)        # (C·B,)
        return (nll + q.kl() + math.log(c)).view(c, b).T                                   # (B, C)

    def loss(self, z1: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The M2 objective per record (B,): L for labelled records (y ≥ 0), U for the others (y = -1)."""
        neg_elbo = self.neg_elbo_per_class(z1, generator)                   # (B, C)
        log_q = F.log_softmax(self.logits(z1), -1)                          # (B, C)
        q = log_q.exp()
        labelled = y >= 0
        yi = y.clamp(min=0)
        n_lab = int(labelled.sum())
        weight = self.cfg.alpha * (len(y) - n_lab) / max(n_lab, 1)
        lab = neg_elbo.gather(1, yi[:, None])[:, 0] - weight * log_q.gather(1, yi[:, None])[:, 0]
        unl = (q * neg_elbo).sum(-1) + (q * log_q).sum(-1)                  # E_q[L] - H(q)
        return torch.where(labelled, lab, unl)


class SemiVAE(VAE):
    """A VAE with an M2 head: everything a VAE does (μ, scores, decoding), plus class predictions."""

    def __init__(self, config: VAEConfig):
        if config.semi is None:
            raise ValueError("SemiVAE needs config.semi (the class list and head sizes)")
        super().__init__(config)
        self.m2 = M2(config.latent_dim, config.semi)

    @property
    def classes(self) -> tuple:
        return self.config.semi.classes

    def forward(self, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0,
                generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> VAEOutput:
        """The VAE's output; with `y` (B,) class indices (-1 = unlabelled) its loss adds M2's mean."""
        out = super().forward(x, beta=beta, free_bits=free_bits, generator=generator, eps=eps)
        if y is None:
            return out
        z1 = out.posterior.sample(generator).detach()                      # (B, L1): M2's data
        out.loss = out.loss + self.m2.loss(z1, y.to(z1.device), generator).mean()
        return out

    @torch.no_grad()
    def class_probs(self, mu: torch.Tensor) -> torch.Tensor:
        """q(y|μ) for records' μ: (B, L) -> (B, C), rows sum to 1, columns in `classes` order."""
        return F.softmax(self.m2.logits(mu), -1)

    @torch.no_grad()
    def predict_proba(self, raw: torch.Tensor) -> torch.Tensor:
        """q(y|μ) for raw records: (B, D) -> (B, C)."""
        return self.class_probs(self.embed(raw).mean)


def build_model(config: VAEConfig) -> VAE:
    """The module a config describes: SemiVAE when it has a semi-supervised head, else VAE."""
    return SemiVAE(config) if config.semi is not None else VAE(config)


M2_LR = 1e-3
"""AdamW learning rate of an M2 head trained alone (fit_m2, and `train --labels`'s head-only epochs)."""


def m2_epoch(m2: M2, stats: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, batch_size: int,
             labelled_per_batch: int, *, seed: int, epoch: int, rank: int = 0,
             generator: torch.Generator | None = None, after_backward=None) -> tuple[float, int]:
    """One epoch of an M2 head alone on a frozen VAE's q(z1|x): stats (N, 2·L1) = [μ, log σ²] of every
    record, y (N,) class indices with -1 = unlabelled. Each step draws a fresh z1 ~ q(z1|x); batches
    as vae.train_step.labelled_batches. `after_backward` runs before each optimiser step (e.g. to
    average gradients over workers). Returns (summed loss, records seen)."""
    from vae.train_step import labelled_batches

    m2.train()
    total, records = 0.0, 0
    for s, yb in labelled_batches(stats, y, batch_size, labelled_per_batch, seed=seed, epoch=epoch, rank=rank):
        m, lv = s.chunk(2, dim=-1)
        z1 = m + (0.5 * lv).exp() * torch.randn(m.shape, generator=generator).to(m.device)
        loss = m2.loss(z1, yb, generator).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        total, records = total + float(loss.detach()) * len(yb), records + len(yb)
    m2.eval()
    return total, records


def fit_m2(m2: M2, mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 128,
           labelled_per_batch: int = 32, lr: float = M2_LR, seed: int = 0) -> None:
    """Train an M2 head alone on a frozen VAE's q(z1|x) (the paper's two-stage M1+M2): mu, logvar
    (N, L1) of every record, y (N,) class indices with -1 = unlabelled; `epochs` of m2_epoch."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(m2.parameters(), lr=lr)
    stats = torch.cat([mu, logvar], -1)                                       # (N, 2·L1)
    for epoch in range(epochs):
        m2_epoch(m2, stats, y, opt, batch_size, labelled_per_batch, seed=seed, epoch=epoch, generator=g)
