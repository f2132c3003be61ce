"""DiagonalGaussian: the posterior q(z|x) = N(μ, diag(σ²)) — KL, clamping, reparameterised sampling."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vae.distributions import DiagonalGaussian, standard_normal_log_prob


def test_kl_of_unit_mean_unit_variance_is_half_a_nat_per_dim():
    # KL(N(1, 1) || N(0, 1)) = ½·μ² = 0.5 nats in each dimension
    q = DiagonalGaussian(torch.ones(2, 3), torch.zeros(2, 3))
    assert torch.allclose(q.kl_per_dim(), torch.full((2, 3), 0.5))
    assert torch.allclose(q.kl(), torch.full((2,), 1.5))


def test_kl_of_the_prior_itself_is_zero():
    q = DiagonalGaussian(torch.zeros(4, 5), torch.zeros(4, 5))
    assert torch.equal(q.kl(), torch.zeros(4))


def test_kl_matches_torch_distributions_for_random_gaussians():
    mean, logvar = torch.randn(16, 8) * 2, torch.randn(16, 8) * 3
    q = DiagonalGaussian(mean, logvar)
    ref = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))   # (16, 8)
    assert torch.allclose(q.kl_per_dim(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(q.kl(), ref.sum(-1), atol=1e-4, rtol=1e-5)


def test_log_prob_matches_torch_distributions():
    mean, logvar = torch.randn(6, 4), torch.randn(6, 4)
    q = DiagonalGaussian(mean, logvar)
    z = torch.randn(3, 6, 4)                                    # (K, B, L) broadcasts over K
    ref = Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    assert q.log_prob(z).shape == (3, 6)
    assert torch.allclose(q.log_prob(z), ref, atol=1e-5)
    assert torch.allclose(standard_normal_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1), atol=1e-5)


def test_logvar_is_clamped_to_the_configured_range():
    logvar = torch.tensor([[-1000.0, -5.0, 0.0, 5.0, 1000.0]])
    q = DiagonalGaussian(torch.zeros(1, 5), logvar)             # defaults: [-30, 20]
    assert q.logvar.tolist() == [[-30.0, -5.0, 0.0, 5.0, 20.0]]
    # extreme encoder outputs must not overflow into inf/NaN KL or σ
    assert torch.isfinite(q.std).all() and torch.isfinite(q.kl()).all()

    tight = DiagonalGaussian(torch.zeros(1, 5), logvar, logvar_min=-2.0, logvar_max=3.0)
    assert tight.logvar.tolist() == [[-2.0, -2.0, 0.0, 3.0, 3.0]]
    assert torch.allclose(tight.std, torch.exp(0.5 * tight.logvar))


def test_reparameterised_sample_is_differentiable_in_mean_and_logvar():
    mean = torch.randn(4, 3, requires_grad=True)
    logvar = torch.randn(4, 3, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    z = DiagonalGaussian(mean, logvar).sample(gen)
    z.sum().backward()
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))  # the same noise the sample drew
    # z = μ + exp(½·logvar)·ε  ⇒  dz/dμ = 1, dz/dlogvar = ½·σ·ε
    assert torch.allclose(mean.grad, torch.ones(4, 3))
    assert torch.allclose(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps, atol=1e-6)


def test_sample_is_reproducible_with_a_generator_and_mode_is_the_mean():
    q = DiagonalGaussian(torch.randn(3, 2), torch.randn(3, 2))
    a = q.sample(torch.Generator().manual_seed(7))
    b = q.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(q.mode(), q.mean)


def test_samples_have_the_right_mean_and_std():
    n = 200_000
    mean = torch.tensor([2.0, -1.0, 0.0]).expand(n, 3)
    logvar = torch.log(torch.tensor([9.0, 0.25, 1.0])).expand(n, 3)   # σ = 3, 0.5, 1
    z = DiagonalGaussian(mean, logvar).sample(torch.Generator().manual_seed(0))
    # standard error of the mean is σ/√n ≈ 0.007 for σ = 3; tolerances are several of those
    assert torch.allclose(z.mean(0), torch.tensor([2.0, -1.0, 0.0]), atol=0.03)
    assert torch.allclose(z.std(0), torch.tensor([3.0, 0.5, 1.0]), rtol=0.01)
    # dimensions are independent (diagonal covariance)
    c = torch.corrcoef(z.T)
    assert (c - torch.eye(3)).abs().max() < 0.01


@pytest.mark.parametrize("mu,var", [(0.0, 1.0), (1.5, 0.1), (-3.0, 4.0)])
def test_kl_formula_for_one_dimension(mu, var):
    q = DiagonalGaussian(torch.tensor([[mu]]), torch.tensor([[math.log(var)]]))
    closed = 0.5 * (mu ** 2 + var - 1 - math.log(var))
    assert q.kl().item() == pytest.approx(closed, rel=1e-5, abs=1e-6)
