"""The VAE: preprocess → encode q(z|x) → sample z → decode p(x|z); loss, sampling, anomaly scores."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vae.config import VAEConfig
from vae.conv import ConvDecoder, ConvEncoder
from vae.distributions import DiagonalGaussian, standard_normal_log_prob
from vae.linear import PPCA
from vae.loss import kl_objective, optimal_log_sigma, reconstruction_nll
from vae.mlp import MLPDecoder, MLPEncoder
from vae.preprocess import Scaler
from vae.resconv import ResConvDecoder, ResConvEncoder


LINEAR_LR_SCALE = 0.0
"""The linear path's learning rate relative to the nets': 0, it stays at pPCA (the linear optimum) and
the nets learn what it leaves. On the any-data panel's colour patches, training it too (at the full
rate or 0.1×) kept no more than freezing it; the ablations are in docs/quality.md."""
METRIC_ROWS = 2048
"""Records of the training sample the latent metric (VAE.fit_metric) averages over."""
SIGMA_MOMENTUM = 0.05
"""How far each training batch moves a calibrated decoder's stored log σ towards its own optimum."""


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
        elif config.arch == "resconv":
            self.encoder = ResConvEncoder(config.input_shape, config.hidden, lat)
            self.decoder = ResConvDecoder(config.input_shape, config.hidden, lat)
        else:
            self.encoder = ConvEncoder(config.input_shape, config.hidden, lat)
            self.decoder = ConvDecoder(config.input_shape, config.hidden, lat)
        # The linear path (config.linear_path): μ, log σ² and x̂ each add a linear map of the input.
        self.linear_encoder = nn.Linear(d, 2 * lat) if config.linear_path else None
        self.linear_decoder = nn.Linear(lat, d) if config.linear_path else None
        # log σ of a calibrated Gaussian p(x|z) = N(x̂, σ²I): a running mean of each training batch's
        # optimal σ (vae.loss.optimal_log_sigma), saved with the model; None for a fixed likelihood.
        calibrated = config.likelihood == "gaussian" and config.calibrated
        self.register_buffer("log_sigma", torch.zeros(()) if calibrated else None)
        # The round-trip map: E[x|μ] ≈ E[x|z=μ] + A·μ + b in model space, a least-squares fit on training
        # records after training (fit_round_trip); zeros until then. The decoder's mean at the posterior
        # mean shrinks every record towards the data's mean (pPCA's by (λ−σ²)/λ per direction: on small
        # tables 1–18 % more error than PCA's projection); reconstruct(μ) adds this map, sample() does not.
        self.register_buffer("round_trip_weight", torch.zeros(d, lat))          # (D, L)
        self.register_buffer("round_trip_bias", torch.zeros(d))                 # (D,)
        # The latent metric: a factor F (L, L) of the round trip's mean pullback metric G = F·Fᵀ, fitted
        # with the round-trip map (fit_metric); embedding(μ) = μ·F. Identity until then (the embedding is μ).
        self.register_buffer("metric_factor", torch.eye(lat))                  # (L, L)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the round-trip map existed load with none (zeros)
        # and those from before the latent metric with the identity (their embedding is μ)
        for name in ("round_trip_weight", "round_trip_bias", "metric_factor"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- the model in its own space: x (B, D) preprocessed ---------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(x)                                          # (B, L), (B, L)
        if self.linear_encoder is not None:
            lin_mean, lin_logvar = self.linear_encoder(x).chunk(2, dim=-1)       # (B, L), (B, L)
            mean, logvar = mean + lin_mean, logvar + lin_logvar
        return DiagonalGaussian(mean, logvar, self.config.logvar_min, self.config.logvar_max)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters p(x|z): logits (bernoulli) or means (gaussian), (B, L) -> (B, D)."""
        params = self.decoder(z)                                                # (B, D)
        return params if self.linear_decoder is None else params + self.linear_decoder(z)

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups: the linear path at LINEAR_LR_SCALE × the learning rate ("lr_scale",
        which the epoch's schedule multiplies in), everything else at 1×."""
        linear = [p for m in (self.linear_encoder, self.linear_decoder) if m is not None for p in m.parameters()]
        ids = {id(p) for p in linear}
        groups = [{"params": [p for p in self.parameters() if id(p) not in ids], "lr_scale": 1.0}]
        return groups + ([{"params": linear, "lr_scale": LINEAR_LR_SCALE}] if linear else [])

    @torch.no_grad()
    def start_at(self, ppca: PPCA) -> None:
        """Start the linear path at probabilistic PCA and the nonlinear nets' last layers at zero, so the
        model begins as pPCA (a calibrated decoder's σ at pPCA's noise level); training goes on from there."""
        if self.linear_encoder is None:
            raise ValueError("start_at needs a model with config.linear_path")
        lat = self.config.latent_dim
        w, b = self.linear_encoder.weight, self.linear_encoder.bias               # (2L, D), (2L,)
        w.zero_(), b.zero_()
        w[:lat] = ppca.encoder
        b[:lat] = -ppca.encoder @ ppca.mean
        b[lat:] = ppca.logvar
        self.linear_decoder.weight.copy_(ppca.weight)
        self.linear_decoder.bias.copy_(ppca.mean)
        for net in (self.encoder, self.decoder):
            last = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))][-1]
            last.weight.zero_(), last.bias.zero_()
        if self.log_sigma is not None:
            self.log_sigma.fill_(0.5 * float(torch.log(torch.tensor(ppca.sigma2))))

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per record, nats: (..., B, D), (..., B, D) -> (..., B). A calibrated decoder uses the
        batch's optimal σ while training (and moves its stored σ towards it), the stored σ otherwise."""
        if self.log_sigma is None:
            return reconstruction_nll(params, x, self.config.likelihood)
        if self.training:
            log_sigma = optimal_log_sigma(params, x)
            self.log_sigma.lerp_(log_sigma.to(self.log_sigma.dtype), SIGMA_MOMENTUM)
        else:
            log_sigma = self.log_sigma
        return reconstruction_nll(params, x, self.config.likelihood, log_sigma)

    def mean_of(self, params: torch.Tensor) -> torch.Tensor:
        """E[x|z] in model space from likelihood parameters."""
        return torch.sigmoid(params) if self.config.likelihood == "bernoulli" else params

    def forward(self, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0,
                generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> VAEOutput:
        """`eps` (B, L): the noise for z = μ + σ·ε (default: drawn from `generator`)."""
        q = self.encode(x)
        z = q.sample(generator, eps)                                             # (B, L)
        recon = self.nll(self.decode(z), x)                                      # (B,)
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
    def reconstruct(self, mu: torch.Tensor) -> torch.Tensor:
        """Records in raw feature units from posterior means (the compression round trip): E[x|z=μ]
        plus the round-trip map, (B, L) -> (B, D). For data scaled into [0, 1] (pixels) the overshoot
        is clipped back into the data's range."""
        x = self.round_trip_mean(mu)                                             # (B, D)
        return self.scaler.inverse(x.clamp(0.0, 1.0) if self.scaler.clip else x)

    @torch.no_grad()
    def fit_round_trip(self, raw: torch.Tensor, batch: int = 4096, ridge: float = 1e-6) -> None:
        """Fit the round-trip map on raw training records (B, D): least squares from [μ, 1] to what the
        decoder's mean at μ leaves of each record, in model space, with a ridge of `ridge` × the mean
        diagonal. At a pPCA model it turns the posterior-mean round trip into PCA's projection."""
        lat = self.config.latent_dim
        gram = torch.zeros(lat + 1, lat + 1, dtype=torch.float64)
        cross = torch.zeros(lat + 1, self.config.input_dim, dtype=torch.float64)
        for i in range(0, len(raw), batch):
            x = self.preprocess(raw[i:i + batch])                                   # (b, D)
            mu = self.encode(x).mean                                                # (b, L)
            a = torch.cat([mu, torch.ones(len(mu), 1, dtype=mu.dtype, device=mu.device)], 1).double().cpu()
            gram += a.T @ a
            cross += a.T @ (x - self.mean_of(self.decode(mu))).double().cpu()
        gram += ridge * gram.diagonal().mean() * torch.eye(lat + 1, dtype=torch.float64)
        sol = torch.linalg.solve(gram, cross)                                       # (L + 1, D)
        self.round_trip_weight.copy_(sol[:lat].T.to(self.round_trip_weight))
        self.round_trip_bias.copy_(sol[lat].to(self.round_trip_bias))
        self.fit_metric(raw[:METRIC_ROWS])

    def round_trip_mean(self, mu: torch.Tensor) -> torch.Tensor:
        """E[x|μ] in model space, unclipped: the decoder's mean plus the round-trip map, (B, L) -> (B, D)."""
        return self.mean_of(self.decode(mu)) + mu @ self.round_trip_weight.T + self.round_trip_bias

    def fit_metric(self, raw: torch.Tensor, batch: int = 256) -> None:
        """Fit the latent metric on raw records (B, D): G = mean over the records of Jᵀ·J, J (D, L) the
        Jacobian of the round trip E[x|μ] at each record's μ, in model space (standardised columns, pixels
        scaled as the model sees them), and its Cholesky factor F. ‖(μ − μ′)·F‖ is then the distance of
        the two decoded records for small steps, where ‖μ − μ′‖ weighs every latent direction alike: the
        prior whitens μ, so a direction that carries a tenth of the data's variance counts as much as the
        first. For a pPCA model with its round-trip map (the recipe on small tables), embedding(μ) is PCA's
        scores up to a rotation; docs/quality.md measures what it does to neighbours."""
        from torch.func import jvp

        lat = self.config.latent_dim
        was_training = self.training
        self.eval()
        gram = torch.zeros(lat, lat, dtype=torch.float64)
        eye = torch.eye(lat)
        with torch.no_grad():
            for i in range(0, len(raw), batch):
                mu = self.embed(raw[i:i + batch]).mean                              # (b, L)
                cols = [jvp(self.round_trip_mean, (mu,), (eye[l].to(mu).expand_as(mu),))[1]   # J·e_l: (b, D)
                        for l in range(lat)]
                j = torch.stack(cols, -1).double().cpu()                           # (b, D, L)
                gram += torch.einsum("bdl,bdk->lk", j, j)
        gram /= max(len(raw), 1)
        gram += 1e-9 * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(lat, dtype=torch.float64)
        self.metric_factor.copy_(torch.linalg.cholesky(gram).to(self.metric_factor))
        self.train(was_training)

    @torch.no_grad()
    def embedding(self, mu: torch.Tensor) -> torch.Tensor:
        """μ in the latent metric's units (fit_metric), (B, L) -> (B, L): Euclidean distances between
        embeddings approximate distances between the decoded records, where μ's own weigh every latent
        direction alike. What `encode --embedding` writes for neighbours."""
        return mu @ self.metric_factor.to(mu)

    @torch.no_grad()
    def linear_round_trip(self, x: torch.Tensor) -> torch.Tensor | None:
        """E[x|z] of the linear path alone (the pPCA part, nets left out) at its own posterior mean, full
        precision, in model space: x (B, D) preprocessed -> (B, D); None for a model without a linear path. Beside the
        whole model's round trip it says what the nets add on these records: on records unlike the
        training data they can make it worse (docs/quality.md, colour patches of another photo)."""
        if self.linear_encoder is None:
            return None
        mu = self.linear_encoder(x)[:, :self.config.latent_dim]                  # (B, L)
        x_hat = self.mean_of(self.linear_decoder(mu))                            # (B, D)
        return x_hat.clamp(0.0, 1.0) if self.scaler.clip else x_hat

    @torch.no_grad()
    def round_trip_errors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Squared round-trip error per record of the whole model and of its linear part alone, each
        decoded at its own posterior mean, in model space: x (B, D) preprocessed -> (B,), (B,) (None
        for a model without a linear path). The recipe keeps the nets only where the first is the
        smaller by a margin on validation records (vae.recipe.keep_nets)."""
        x_hat = self.mean_of(self.decode(self.encode(x).mean))                  # (B, D)
        x_hat = x_hat.clamp(0.0, 1.0) if self.scaler.clip else x_hat
        lin = self.linear_round_trip(x)
        return (x_hat - x).pow(2).sum(-1), None if lin is None else (lin - x).pow(2).sum(-1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n new records in raw units from the prior: z ~ N(0, I), x = E[x|z]."""
        p = next(self.parameters())
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        x = self.mean_of(self.decode(z))                                         # E[x|z]: no round-trip map
        return self.scaler.inverse(x.clamp(0.0, 1.0) if self.scaler.clip else x)

    @torch.no_grad()
    def score(self, raw: torch.Tensor, samples: int = 1, generator: torch.Generator | None = None,
              eps: torch.Tensor | None = None) -> torch.Tensor:
        """Anomaly score per record: -ELBO in nats (higher = less likely under the model), (B,).
        With samples > 1 the reconstruction term is averaged over that many draws of z; `eps`
        (samples, B, L) supplies the noise (per-record: the same score in any batch)."""
        x = self.preprocess(raw)
        q = self.encode(x)
        recon = torch.stack([self.nll(self.decode(q.sample(generator, None if eps is None else eps[s])), x)
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
        log_px_z = -self.nll(params, x.expand(k, *x.shape))                     # (K, B)
        log_w = log_px_z + standard_normal_log_prob(z) - q.log_prob(z)          # (K, B)
        return torch.logsumexp(log_w, 0) - torch.log(torch.tensor(float(k)))
