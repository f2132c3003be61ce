"""The VAE module: shapes, the loss terms, sampling, the importance-weighted bound, a short training run,
KL warm-up / free bits, and the config invariants."""
from __future__ import annotations

import math

import pytest
import torch

from vae.config import VAEConfig
from vae.loss import kl_objective, kl_weight, reconstruction_nll
from vae.model import VAE
from vae.preprocess import Preprocessing
from vae.train_step import EpochStats, active_units, evaluate, train_epoch

D = 12


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the spinning OpenMP
    workers make the training test ~10× slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp_vae(likelihood: str = "bernoulli", latent: int = 3, hidden=(16, 8), d: int = D) -> VAE:
    return VAE(VAEConfig(input_shape=(d,), arch="mlp", latent_dim=latent, hidden=hidden, likelihood=likelihood))


def conv_vae(latent: int = 3) -> VAE:
    return VAE(VAEConfig(input_shape=(1, 8, 8), arch="conv", latent_dim=latent, hidden=(4, 8)))


def resconv_vae(latent: int = 3) -> VAE:
    return VAE(VAEConfig(input_shape=(3, 8, 8), arch="resconv", latent_dim=latent, hidden=(8, 16)))


# --- shapes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,d", [(mlp_vae, D), (conv_vae, 64), (resconv_vae, 192)], ids=["mlp", "conv", "resconv"])
def test_forward_shapes_for_flat_records(make, d):
    model = make()
    x = torch.rand(5, d)                                            # records are flat (B, D) for both archs
    out = model(x)
    assert out.loss.shape == ()
    assert out.neg_elbo.shape == out.recon.shape == out.kl.shape == (5,)
    assert out.posterior.mean.shape == out.posterior.logvar.shape == (5, 3)
    assert model.decode(torch.randn(5, 3)).shape == (5, d)
    assert model.embed(x).mean.shape == (5, 3)
    assert model.reconstruct(torch.randn(5, 3)).shape == (5, d)
    assert model.score(x).shape == (5,)
    assert model.iw_log_likelihood(x, k=4).shape == (5,)


@pytest.mark.parametrize("make,d", [(mlp_vae, D), (conv_vae, 64), (resconv_vae, 192)], ids=["mlp", "conv", "resconv"])
def test_sample_returns_n_finite_records(make, d):
    s = make().sample(7, generator=torch.Generator().manual_seed(0))
    assert s.shape == (7, d)
    assert torch.isfinite(s).all()


def test_sample_is_in_raw_units():
    # bernoulli + uint8 scaling: E[x|z] ∈ (0, 1) in model space → (0, 255) in raw units
    pre = Preprocessing(features=["image"], scaling="uint8", offset=[0.0] * D, scale=[1 / 255] * D)
    model = VAE(VAEConfig(input_shape=(D,), latent_dim=2, hidden=(8,), preprocessing=pre))
    s = model.sample(20)
    assert (s >= 0).all() and (s <= 255).all() and s.max() > 1


# --- the loss terms ---------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_neg_elbo_is_recon_plus_kl_per_record(likelihood):
    model = mlp_vae(likelihood)
    out = model(torch.rand(6, D), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.neg_elbo, out.recon + out.kl)
    assert torch.allclose(out.kl, out.posterior.kl())
    assert (out.kl >= 0).all()
    # β = 1 without free bits: the loss is the mean -ELBO
    assert torch.allclose(out.loss, out.neg_elbo.mean())


def test_beta_weights_only_the_kl_term_of_the_loss():
    model, x = mlp_vae(), torch.rand(6, D)
    out = model(x, beta=0.25, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out.loss, (out.recon + 0.25 * out.kl).mean())
    # the reported -ELBO stays the true bound (β = 1) whatever β the optimiser sees
    assert torch.allclose(out.neg_elbo, out.recon + out.kl)


def test_bernoulli_recon_is_binary_cross_entropy_by_hand():
    logits, x = torch.randn(4, D) * 3, torch.rand(4, D)
    p = torch.sigmoid(logits.double())
    by_hand = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum(-1)
    assert torch.allclose(reconstruction_nll(logits, x, "bernoulli").double(), by_hand, atol=1e-4)


def test_gaussian_recon_is_half_sse_plus_half_d_log_2pi():
    mean, x = torch.randn(4, D), torch.randn(4, D)
    by_hand = 0.5 * ((mean - x) ** 2).sum(-1) + 0.5 * D * math.log(2 * math.pi)
    assert torch.allclose(reconstruction_nll(mean, x, "gaussian"), by_hand)
    # a perfect reconstruction still pays the unit-variance normaliser
    assert torch.allclose(reconstruction_nll(x, x, "gaussian"), torch.full((4,), 0.5 * D * math.log(2 * math.pi)))


def test_model_recon_uses_its_likelihood():
    for likelihood in ("bernoulli", "gaussian"):
        model, x = mlp_vae(likelihood), torch.rand(3, D)
        out = model(x, generator=torch.Generator().manual_seed(5))
        z = out.posterior.sample(torch.Generator().manual_seed(5))   # the z that forward drew
        assert torch.allclose(out.recon, reconstruction_nll(model.decode(z), x, likelihood))


def test_unknown_likelihood_is_refused():
    with pytest.raises(ValueError, match="unknown likelihood"):
        reconstruction_nll(torch.zeros(1, 2), torch.zeros(1, 2), "poisson")


# --- importance-weighted log-likelihood -------------------------------------------------------------

def _repeated_batch(reps: int = 2000, b: int = 4) -> tuple[VAE, torch.Tensor]:
    model = mlp_vae(latent=2, hidden=(16,)).eval()
    x = (torch.rand(b, D) > 0.5).float()
    return model, x.repeat(reps, 1)                                # row r·b + i is record i


def test_iw_with_one_sample_is_an_unbiased_elbo_estimate():
    # every repeated row draws its own z, so averaging over rows averages over many seeds
    reps, b = 2000, 4
    model, xs = _repeated_batch(reps, b)
    iw1 = model.iw_log_likelihood(xs, k=1, generator=torch.Generator().manual_seed(1)).view(reps, b)
    nelbo = model.score(xs, generator=torch.Generator().manual_seed(2)).view(reps, b)   # -ELBO, one z
    se = torch.sqrt(iw1.var(0) / reps + nelbo.var(0) / reps)
    assert ((iw1.mean(0) + nelbo.mean(0)).abs() < 5 * se + 1e-3).all(), (iw1.mean(0), -nelbo.mean(0), se)


def test_iw_bound_tightens_with_more_samples():
    reps, b = 1000, 4
    model, xs = _repeated_batch(reps, b)
    with torch.no_grad():   # a sharper decoder makes log w vary with z, so the bounds separate clearly
        for p in model.decoder.parameters():
            p.mul_(4)
    est = {k: model.iw_log_likelihood(xs, k=k, generator=torch.Generator().manual_seed(k)).view(reps, b)
           for k in (1, 10, 50)}
    mean = {k: v.mean(0) for k, v in est.items()}
    se = {k: v.std(0) / reps ** 0.5 for k, v in est.items()}
    # IWAE: E[log mean_k w] ≥ E[log w] = ELBO, and grows with k (Burda et al. 2016)
    assert (mean[10] - mean[1] > 3 * (se[10] + se[1])).all(), mean
    assert (mean[50] - mean[10] > 3 * (se[50] + se[10])).all(), mean
    assert torch.isfinite(mean[50]).all()


# --- training, without Ray --------------------------------------------------------------------------

def _toy_binary_data(n: int = 512, d: int = 16) -> torch.Tensor:
    """Four binary prototypes with 5 % bit flips: a VAE with 2 latents can learn this well."""
    g = torch.Generator().manual_seed(0)
    protos = (torch.rand(4, d, generator=g) > 0.5).float()
    x = protos[torch.randint(0, 4, (n,), generator=g)]
    flip = torch.rand(n, d, generator=g) < 0.05
    return torch.where(flip, 1 - x, x)


def test_training_a_few_hundred_steps_lowers_neg_elbo():
    data = _toy_binary_data()
    model = VAE(VAEConfig(input_shape=(16,), latent_dim=2, hidden=(32,)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = lambda: data.split(64)                               # 8 steps per epoch
    before, _ = evaluate(model, batches(), seed=0)
    stats = [train_epoch(model, batches(), opt, beta=1.0) for _ in range(30)]   # 240 steps
    after, kl_dims = evaluate(model, batches(), seed=0)

    assert stats[0].records == 512 and isinstance(stats[0], EpochStats)
    # untrained ≈ 16·log 2 ≈ 11 nats; the data's entropy is ≈ 4.6 nats
    assert after.means()["neg_elbo"] < 0.7 * before.means()["neg_elbo"], (before.means(), after.means())
    assert stats[-1].means()["neg_elbo"] < 0.7 * stats[0].means()["neg_elbo"]
    assert after.means()["elbo"] == pytest.approx(-after.means()["neg_elbo"])
    assert kl_dims.shape == (2,) and active_units(kl_dims) >= 1      # the latents carry information


def test_evaluate_is_deterministic_for_a_seed():
    model, data = mlp_vae(d=16), _toy_binary_data(64)
    a, ka = evaluate(model, data.split(16), seed=3)
    b, kb = evaluate(model, data.split(16), seed=3)
    assert a == b and torch.equal(ka, kb)


def test_evaluate_does_not_depend_on_batching_or_order():
    """ε is a function of (record, seed): reshuffling and re-batching the same records gives the same
    -ELBO (up to float summation order), so a validation shard's block order cannot move it."""
    model, data = mlp_vae(d=16), _toy_binary_data(64)
    a, ka = evaluate(model, data.split(16), seed=3)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    b, kb = evaluate(model, data[perm].split(5), seed=3)
    assert a.records == b.records == 64
    for k, v in a.means().items():
        assert b.means()[k] == pytest.approx(v, abs=1e-6), k
    assert torch.allclose(ka, kb, atol=1e-6)
    c, _ = evaluate(model, data.split(16), seed=4)                 # another seed: other draws
    assert c.means()["recon"] != a.means()["recon"]


def test_record_normal_is_per_record_standard_normal():
    from vae.distributions import record_keys, record_normal

    x = torch.rand(4000, 10)
    eps = record_normal(record_keys(x), 8, seed=0)
    assert eps.shape == (4000, 8) and eps.dtype == torch.float32
    assert abs(float(eps.mean())) < 0.03 and abs(float(eps.std()) - 1) < 0.03
    assert torch.equal(record_normal(record_keys(x[100:200]), 8, seed=0), eps[100:200])   # batch-free
    assert torch.equal(record_normal(record_keys(x[:1].repeat(3, 1)), 8)[0], record_normal(record_keys(x[:1]), 8)[0])
    assert not torch.equal(record_normal(record_keys(x), 8, seed=1), eps)


# --- KL warm-up and free bits -----------------------------------------------------------------------

def test_kl_weight_ramps_linearly_over_warmup_then_stays_at_beta():
    assert kl_weight(1.0, 0, 4) == 0.0
    assert kl_weight(1.0, 1, 4) == 0.25
    assert kl_weight(1.0, 2, 4) == 0.5
    assert kl_weight(1.0, 4, 4) == 1.0
    assert kl_weight(1.0, 10, 4) == 1.0                              # capped at β
    assert kl_weight(2.0, 2, 4) == 1.0                               # ramps to β, not to 1


def test_kl_weight_without_warmup_is_beta_from_the_start():
    assert kl_weight(0.5, 0, 0) == 0.5
    assert kl_weight(0.5, 0, -1) == 0.5


def test_kl_objective_without_free_bits_is_the_per_record_kl():
    kl = torch.rand(5, 3)
    assert torch.allclose(kl_objective(kl, 0.0), kl.sum(-1))


def test_free_bits_floor_each_dimensions_batch_mean_kl():
    # dim 0: batch-mean KL 0.1 < λ = 0.5 → counted as 0.5 and not penalised (no gradient);
    # dim 1: batch-mean KL 2.0 > λ → counted as is, and its gradient flows
    kl = torch.tensor([[0.0, 1.0], [0.2, 3.0]], requires_grad=True)
    obj = kl_objective(kl, 0.5)
    assert obj.shape == (2,)
    assert torch.allclose(obj, torch.tensor([2.5, 2.5]))           # same value for every record
    obj.mean().backward()
    assert torch.equal(kl.grad[:, 0], torch.zeros(2))
    assert torch.allclose(kl.grad[:, 1], torch.full((2,), 0.5))


def test_free_bits_change_the_loss_but_not_the_reported_neg_elbo():
    model, x = mlp_vae(), torch.rand(6, D)
    plain = model(x, free_bits=0.0, generator=torch.Generator().manual_seed(0))
    fb = model(x, free_bits=10.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(plain.neg_elbo, fb.neg_elbo)
    # every dimension is below 10 nats, so the KL term becomes L·λ = 30
    assert torch.allclose(fb.loss, fb.recon.mean() + 30.0)


# --- config invariants ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(input_shape=(1, 10, 10), arch="conv", hidden=(4, 8)), "divisible by 4"),
    (dict(input_shape=(1, 8, 12), arch="conv", hidden=(4, 8, 16)), "divisible by 8"),
    (dict(input_shape=(64,), arch="conv", hidden=(4,)), r"conv needs input_shape \(C, H, W\)"),
    (dict(input_shape=(3, 8, 8), arch="resconv", hidden=(8, 12)), "multiples of 8"),
    (dict(input_shape=(8,), arch="transformer"), "arch must be one of"),
    (dict(input_shape=(8,), latent_dim=0), "latent_dim must be > 0"),
    (dict(input_shape=(8,), likelihood="poisson"), "likelihood must be one of"),
    (dict(input_shape=(0,)), "input_shape must be positive"),
    (dict(input_shape=(8,), hidden=()), "hidden must be positive"),
    (dict(input_shape=(8,), logvar_min=5.0, logvar_max=5.0), "logvar_min must be < logvar_max"),
], ids=["conv-h-w-not-divisible", "conv-w-not-divisible", "conv-flat-shape", "resconv-channels", "unknown-arch", "latent-0",
        "unknown-likelihood", "zero-size", "no-hidden", "logvar-range"])
def test_vae_config_rejects_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kwargs)


def test_vae_config_round_trips_through_a_plain_dict():
    pre = Preprocessing(features=["a", "b"], layout="scalars", scaling="standardize", offset=[1, 2], scale=[3, 4])
    cfg = VAEConfig(input_shape=[1, 8, 8], arch="conv", latent_dim=5, hidden=[4, 8], preprocessing=pre)
    assert cfg.input_shape == (1, 8, 8) and cfg.input_dim == 64
    d = cfg.to_dict()
    assert isinstance(d["preprocessing"], dict) and d["input_shape"] == [1, 8, 8]
    assert VAEConfig.from_dict(d) == cfg


def test_the_linear_round_trip_is_the_whole_model_at_its_ppca_start_and_none_without_a_linear_path(seed):
    from vae.linear import fit_ppca

    cfg = VAEConfig(input_shape=(12,), hidden=(16,), latent_dim=3, likelihood="gaussian", calibrated=True,
                    linear_path=True)
    model = VAE(cfg).eval()
    x = torch.randn(200, 12) * torch.linspace(0.2, 3, 12)
    model.start_at(fit_ppca(x, 3, seed))                       # nets' last layers at zero: the model is its linear part
    whole = model.mean_of(model.decode(model.encode(x).mean))
    assert torch.allclose(model.linear_round_trip(x), whole, atol=1e-5)
    with torch.no_grad():                                       # the nets now add something; the linear part does not move
        next(m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)).bias.add_(1.0)
        for m in model.decoder.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_()
    assert not torch.allclose(model.mean_of(model.decode(model.encode(x).mean)), whole, atol=1e-3)
    assert torch.allclose(model.linear_round_trip(x), whole, atol=1e-5)
    assert VAE(VAEConfig(input_shape=(12,), hidden=(16,), latent_dim=3)).linear_round_trip(x) is None


def test_round_trip_errors_are_each_paths_squared_error_and_equal_at_the_ppca_start(seed):
    from vae.linear import fit_ppca

    cfg = VAEConfig(input_shape=(12,), hidden=(16,), latent_dim=3, likelihood="gaussian", calibrated=True,
                    linear_path=True)
    model = VAE(cfg).eval()
    x = torch.randn(100, 12) * torch.linspace(0.2, 3, 12)
    model.start_at(fit_ppca(x, 3, seed))
    full, lin = model.round_trip_errors(x)
    assert full.shape == lin.shape == (100,) and torch.allclose(full, lin, atol=1e-4)
    with torch.no_grad():
        model.decoder.net[-1].bias.add_(0.5)                     # the nets now shift every output by 0.5
    full, lin = model.round_trip_errors(x)
    expect = (model.mean_of(model.decode(model.encode(x).mean)) - x).pow(2).sum(-1)
    assert torch.allclose(full, expect) and full.mean() > lin.mean()
    assert VAE(VAEConfig(input_shape=(12,), hidden=(16,), latent_dim=3)).round_trip_errors(x)[1] is None


def ppca_model(seed: int) -> tuple[torch.Tensor, VAE]:
    """2,000 records of 6 columns with falling variances, and a 2-latent model started at their pPCA."""
    from vae.linear import fit_ppca
    from vae.preprocess import Preprocessing

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, 6, generator=g) * torch.tensor([3.0, 2.0, 1.0, 0.9, 0.8, 0.7])
    cfg = VAEConfig(input_shape=(6,), hidden=(16,), latent_dim=2, likelihood="gaussian", calibrated=True,
                    linear_path=True, preprocessing=Preprocessing(["x"], "list", "none"))
    model = VAE(cfg).eval()
    model.start_at(fit_ppca(x, 2, seed))
    return x, model


def test_the_round_trip_map_turns_ppcas_shrunk_round_trip_into_pcas_projection(seed):
    """pPCA's posterior mean shrinks each direction by (λ−σ²)/λ; the map fitted on the same records
    undoes it, so the round trip becomes PCA's projection. sample() stays E[x|z]."""
    x, model = ppca_model(seed)
    xc = x - x.mean(0)
    v = torch.linalg.eigh(xc.T @ xc)[1][:, -2:]                            # the top two principal directions
    pca = x.mean(0) + xc @ v @ v.T
    mu = model.embed(x).mean
    shrunk = ((model.reconstruct(mu) - x) ** 2).mean()
    assert shrunk > 1.02 * ((pca - x) ** 2).mean()                         # the posterior-mean round trip is worse
    torch.manual_seed(seed)
    before = model.sample(5, torch.Generator().manual_seed(1))
    model.fit_round_trip(x, batch=700)                                     # in batches: the same normal equations
    assert torch.allclose(model.reconstruct(mu), pca, atol=1e-3)
    assert torch.equal(model.sample(5, torch.Generator().manual_seed(1)), before)


def test_the_latent_metric_makes_embedding_distances_pcas_score_distances_at_a_ppca_model(seed):
    """μ of a pPCA model is whitened (each direction of unit variance whatever its share of the data);
    the metric fitted with the round-trip map weighs the directions as the decoded records do, so at
    pPCA embedding distances are PCA's score distances (what the round trip, PCA's projection, keeps)."""
    x, model = ppca_model(seed)
    mu = model.embed(x).mean
    assert torch.equal(model.embedding(mu), mu)                            # no metric fitted: the identity
    model.fit_round_trip(x)
    xc = x - x.mean(0)
    v = torch.linalg.eigh(xc.T @ xc)[1][:, -2:]                            # the top two principal directions
    scores, emb = xc @ v, model.embedding(mu)
    d_pca, d_emb, d_mu = torch.cdist(scores[:300], scores[:300]), torch.cdist(emb[:300], emb[:300]), torch.cdist(mu[:300], mu[:300])
    assert torch.allclose(d_emb, d_pca, atol=1e-2 * float(d_pca.max()))
    assert not torch.allclose(d_mu, d_pca, atol=0.1 * float(d_pca.max()))  # μ's own distances are not PCA's


def test_the_latent_metric_averages_the_decoders_jacobian_of_a_nonlinear_model(seed):
    """For nets, G = mean of Jᵀ·J over the records' μ; checked against autograd's full Jacobian of a
    conv model (the metric is fitted by forward-mode products, one latent direction at a time)."""
    from torch.autograd.functional import jacobian
    from vae.preprocess import Preprocessing

    torch.manual_seed(seed)
    cfg = VAEConfig(input_shape=(1, 8, 8), arch="conv", hidden=(4, 8), latent_dim=3, likelihood="bernoulli",
                    preprocessing=Preprocessing(["x"], "list", "none"))
    model = VAE(cfg).eval()
    x = torch.rand(40, 64, generator=torch.Generator().manual_seed(seed))
    model.fit_metric(x, batch=16)
    mu = model.embed(x).mean
    g = sum(j.T @ j for j in (jacobian(lambda z: model.round_trip_mean(z[None])[0], m) for m in mu)) / len(mu)
    f = model.metric_factor
    assert torch.allclose(f @ f.T, g, rtol=1e-4, atol=1e-6) and torch.equal(f, f.tril())


def test_a_resconv_model_started_at_ppca_is_ppca(seed):
    """start_at zeroes the nets' last layers: for resconv that must be the encoder's head and the
    decoder's output conv, so the untrained model's μ and E[x|z] are pPCA's."""
    from vae.linear import fit_ppca
    from vae.preprocess import Preprocessing

    torch.manual_seed(seed)
    cfg = VAEConfig(input_shape=(3, 8, 8), arch="resconv", hidden=(8, 16), latent_dim=4, likelihood="gaussian",
                    calibrated=True, linear_path=True, preprocessing=Preprocessing(["x"], "list", "none"))
    model = VAE(cfg).eval()
    x = torch.rand(300, 192, generator=torch.Generator().manual_seed(seed))
    p = fit_ppca(x, 4, seed)
    model.start_at(p)
    mu = model.encode(x).mean
    assert torch.allclose(mu, (x - p.mean) @ p.encoder.T, atol=1e-5)
    assert torch.allclose(model.decode(mu), mu @ p.weight.T + p.mean, atol=1e-5)
