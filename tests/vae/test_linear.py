"""Probabilistic PCA in closed form (vae.linear) and a calibrated Gaussian decoder (vae.loss)."""
from __future__ import annotations

import math

import numpy as np
import torch

from vae.config import VAEConfig
from vae.linear import fit_ppca
from vae.loss import LOG_SIGMA_MIN, optimal_log_sigma, reconstruction_nll
from vae.model import VAE


def test_ppca_finds_the_noise_variance_and_the_principal_subspace(seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, 20)) * 4
    x = torch.from_numpy(rng.normal(size=(5000, 3)) @ w + rng.normal(size=(5000, 20)) * 0.5)
    p = fit_ppca(x, 3, seed)
    assert abs(p.sigma2 - 0.25) < 0.02
    # the decoder's columns span the same subspace as w's rows
    q, _ = torch.linalg.qr(p.weight.double())
    resid = torch.from_numpy(w.T) - q @ (q.T @ torch.from_numpy(w.T))
    assert float(resid.norm() / torch.from_numpy(w).norm()) < 0.02


def test_the_optimal_sigma_is_the_root_mean_squared_error():
    x, xhat = torch.zeros(4, 10), torch.full((4, 10), 0.3)
    assert math.isclose(float(optimal_log_sigma(xhat, x)), math.log(0.3), rel_tol=1e-5)
    assert float(optimal_log_sigma(x, x)) == LOG_SIGMA_MIN        # a perfect fit stays finite


def test_a_calibrated_nll_is_a_true_gaussian_log_density():
    x, mean, log_sigma = torch.randn(5, 3), torch.randn(5, 3), torch.tensor(-0.7)
    want = -torch.distributions.Normal(mean, log_sigma.exp()).log_prob(x).sum(-1)
    assert torch.allclose(reconstruction_nll(mean, x, "gaussian", log_sigma), want, atol=1e-5)


def test_training_moves_the_stored_sigma_and_evaluation_uses_it(seed):
    cfg = VAEConfig(input_shape=(8,), hidden=(16,), latent_dim=2, likelihood="gaussian", calibrated=True)
    model = VAE(cfg)
    assert "log_sigma" in model.state_dict()                    # saved with the model
    x = torch.randn(64, 8) * 5
    model.train()
    for _ in range(50):
        model(x)
    assert float(model.log_sigma) > 0.5                         # the data's error scale, not unit variance
    model.eval()
    s = float(model.log_sigma)
    model(x)
    assert float(model.log_sigma) == s                          # evaluation reads it, never moves it


def test_a_model_without_calibration_keeps_its_state_dict_keys():
    # models trained before calibration existed load unchanged
    cfg = VAEConfig(input_shape=(8,), hidden=(16,), latent_dim=2, likelihood="gaussian")
    assert not any(k.startswith(("log_sigma", "linear_")) for k in VAE(cfg).state_dict())


def _projector(v: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(v.double())
    return q @ q.T


def test_ppca_separates_nearly_equal_components_exactly_and_beyond_the_exact_size(seed, monkeypatch):
    # a slowly decaying spectrum (component i has variance 1/(1 + i/8)): neighbours around the 16th
    # differ by < 1 %, where a randomised SVD with few power iterations mixes them
    import vae.linear as linear

    rng = np.random.default_rng(seed)
    d, n = 200, 3000
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x = torch.from_numpy((rng.normal(size=(n, d)) / np.sqrt(1 + np.arange(d) / 8)) @ basis.T)
    xc = (x - x.mean(0)).numpy()
    _, v = np.linalg.eigh(xc.T @ xc)
    want = _projector(torch.from_numpy(v[:, ::-1][:, :16].copy()))
    got = _projector(fit_ppca(x, 16, seed).weight)
    assert float((got - want).norm()) < 1e-6
    monkeypatch.setattr(linear, "EXACT_MAX_DIM", 100)                # the randomised path
    got = _projector(fit_ppca(x, 16, seed).weight)
    assert float((got - want).norm()) < 0.05
