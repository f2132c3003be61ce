"""The VAE: preprocess → encode q(z|x) → sample z → decode p(x|z); loss, sampling, anomaly scores."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vae.config import VAEConfig
from vae.conv import ConvDecoder, ConvEncoder
from vae.distributions import DiagonalGaussian, standard_normal_log_prob
from vae.loss import kl_objective, reconstruction_nll
from vae.mlp import MLPDecoder, MLPEncoder
from vae.preprocess import Scaler


@dataclass
class VAEOutput:
    loss: torch.Tensor          # ()   the objective to minimise: mean of recon + β·KL (free bits applied)
    neg_elbo: torch.Tensor      # (B,) -ELBO per record = recon + KL, in nats (β = 1, no free bits)
    recon: torch.Tensor         # (B,) -log p(x|z) per record
    kl: torch.Tensor            # (B,) KL(q(z|x) || p(z)) per record
    posterior: DiagonalGaussian


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        d, lat = config.input_dim, config.latent_dim
        self.scaler = Scaler(config.preprocessing, d)
        if config.arch == "mlp":
            self.encoder = MLPEncoder(d, config.hidden, lat)
            self.decoder = MLPDecoder(d, config.hidden, lat)
        else:
            self.encoder = ConvEncoder(config.input_shape, config.hidden, lat)
            self.decoder = ConvDecoder(config.input_shape, config.hidden, lat)

    # --- the model in its own space: x (B, D) preprocessed ---------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(x)                                          # (B, L), (B, L)
        return DiagonalGaussian(mean, logvar, self.config.logvar_min, self.config.logvar_max)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters p(x|z): logits (bernoulli) or means (gaussian), (B, L) -> (B, D)."""
        return self.decoder(z)

    def mean_of(self, params: torch.Tensor) -> torch.Tensor:
        """E[x|z] in model space from likelihood parameters."""
        return torch.sigmoid(params) if self.config.likelihood == "bernoulli" else params

    def forward(self, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0,
                generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> VAEOutput:
        """`eps` (B, L): the noise for z = μ + σ·ε (default: drawn from `generator`)."""
        q = self.encode(x)
        z = q.sample(generator, eps)                                             # (B, L)
        recon = reconstruction_nll(self.decode(z), x, self.config.likelihood)    # (B,)
        kl_dims = q.kl_per_dim()                                                 # (B, L)
        kl = kl_dims.sum(-1)                                                     # (B,)
        loss = (recon + beta * kl_objective(kl_dims, free_bits)).mean()
        return VAEOutput(loss=loss, neg_elbo=recon + kl, recon=recon, kl=kl, posterior=q)

    # --- raw records in, raw records out (what batch jobs call) ----------------------------------
    def preprocess(self, raw: torch.Tensor) -> torch.Tensor:
        return self.scaler(raw)

    @torch.no_grad()
    def embed(self, raw: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for raw records (B, D); batch jobs write its mean μ, never a sampled z."""
        return self.encode(self.preprocess(raw))

    @torch.no_grad()
    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """Records in raw feature units from latents: E[x|z], (B, L) -> (B, D)."""
        return self.scaler.inverse(self.mean_of(self.decode(z)))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n new records in raw units from the prior: z ~ N(0, I), x = E[x|z]."""
        p = next(self.parameters())
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.reconstruct(z)

    @torch.no_grad()
    def score(self, raw: torch.Tensor, samples: int = 1, generator: torch.Generator | None = None,
              eps: torch.Tensor | None = None) -> torch.Tensor:
        """Anomaly score per record: -ELBO in nats (higher = less likely under the model), (B,).
        With samples > 1 the reconstruction term is averaged over that many draws of z; `eps`
        (samples, B, L) supplies the noise (per-record: the same score in any batch)."""
        x = self.preprocess(raw)
        q = self.encode(x)
        recon = torch.stack([reconstruction_nll(self.decode(q.sample(generator, None if eps is None else eps[s])),
                                                x, self.config.likelihood)
                             for s in range(samples)]).mean(0)
        return recon + q.kl()

    @torch.no_grad()
    def iw_log_likelihood(self, raw: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance-weighted estimate of log p(x) with k samples (Burda et al. 2016), (B,).
        k = 1 gives the ELBO; the estimate tightens towards log p(x) as k grows."""
        x = self.preprocess(raw)
        q = self.encode(x)
        z = torch.stack([q.sample(generator) for _ in range(k)])                 # (K, B, L)
        params = self.decode(z.flatten(0, 1)).view(k, x.shape[0], -1)           # (K, B, D)
        log_px_z = -reconstruction_nll(params, x.expand(k, *x.shape), self.config.likelihood)  # (K, B)
        log_w = log_px_z + standard_normal_log_prob(z) - q.log_prob(z)          # (K, B)
        return torch.logsumexp(log_w, 0) - torch.log(torch.tensor(float(k)))
