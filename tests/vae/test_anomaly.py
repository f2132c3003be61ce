"""vae.anomaly: the batch jobs' anomaly scores are the protocol's candidates of the same names, and
their latent reference survives the weights-only checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vae.anomaly import SCORES, LatentReference, anomaly_score
from vae.checkpoint import checkpoint_bytes, load_checkpoint, reference_from_checkpoint, with_reference
from vae.config import VAEConfig
from vae.distributions import record_keys, record_normal
from vae.model import VAE
from vae.preprocess import Preprocessing
from vae.train_step import train_epoch


def _tabular(seed) -> tuple[VAE, np.ndarray, np.ndarray]:
    """A Gaussian MLP VAE fit briefly on 300 correlated records; 60 more to score, a third of them
    far off the fitting records' manifold."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(3, 12))
    fit = (rng.normal(size=(300, 3)) @ mix).astype(np.float32)
    score = (rng.normal(size=(60, 3)) @ mix).astype(np.float32)
    score[:20] += rng.normal(scale=4.0, size=(20, 12)).astype(np.float32)
    pre = Preprocessing.fit(fit, [f"c{i}" for i in range(12)], "scalars", "standardize")
    model = VAE(VAEConfig(input_shape=(12,), arch="mlp", latent_dim=3, hidden=(32,), likelihood="gaussian",
                          preprocessing=pre))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    raw = torch.from_numpy(fit)
    for _ in range(30):
        train_epoch(model, raw.split(64), opt, beta=1.0)
    return model.eval(), fit, score


def test_scores_equal_the_protocols_candidates_of_the_same_names(seed):
    # The protocol chose these scores (docs/quality.md) with its own code (sklearn's k-NN, numpy
    # statistics): encode's torch version must give the same numbers for the same model and records.
    from pipeline.measure.protocols import CandidateScorer

    model, fit, score = _tabular(seed)
    expected = CandidateScorer(model, fit, k=4, seed=0)(score)
    ref = LatentReference.fit(model, torch.from_numpy(fit))
    raw = torch.from_numpy(score)
    eps = record_normal(record_keys(raw), 3).unsqueeze(0)     # what encode draws; the protocol's seed 0
    for kind in SCORES:
        got = anomaly_score(model, raw, kind, ref, eps).numpy()
        np.testing.assert_allclose(got, expected[kind], rtol=1e-4, atol=1e-4, err_msg=kind)


def test_records_off_the_reference_score_higher_with_every_kind(seed):
    model, fit, score = _tabular(seed)
    ref = LatentReference.fit(model, torch.from_numpy(fit))
    for kind in SCORES[1:]:
        s = anomaly_score(model, torch.from_numpy(score), kind, ref).numpy()
        assert s[:20].mean() > s[20:].mean(), kind              # the 20 perturbed records come first


def test_a_records_score_does_not_depend_on_its_batch(seed):
    model, fit, score = _tabular(seed)
    ref = LatentReference.fit(model, torch.from_numpy(fit))
    raw = torch.from_numpy(score)
    whole = anomaly_score(model, raw, "sq_err+knn_z", ref)
    parts = torch.cat([anomaly_score(model, raw[i:i + 7], "sq_err+knn_z", ref) for i in range(0, 60, 7)])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-4)


def test_knn_z_of_the_reference_records_themselves_is_exact_in_any_chunk(seed):
    # A nightly scores the records the model was fit on, so a scored μ is often in the reference. The
    # matrix-product distance gave its distance to itself as about 1e-2 (cancellation in |a|² + |b|² −
    # 2a·b, worse away from the origin) and a score that moved with the batch size.
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(3000, 16, generator=g) * 2 + 3
    assert float(LatentReference(mu, k=1).knn(mu[:200]).abs().max()) == 0.0
    ref = LatentReference(mu, k=5)
    torch.testing.assert_close(ref.knn(mu[:700], chunk=7), ref.knn(mu[:700], chunk=1024), rtol=0, atol=1e-6)
    exact = torch.cdist(mu[:50].double(), mu.double(), compute_mode="donot_use_mm_for_euclid_dist")
    torch.testing.assert_close(ref.knn(mu[:50]).double(), exact.topk(5, largest=False).values.mean(1),
                               rtol=0, atol=1e-5)


def test_the_reference_leaves_each_record_out_of_its_own_neighbours(seed):
    model, fit, _ = _tabular(seed)
    ref = LatentReference.fit(model, torch.from_numpy(fit), k=1)
    own = ref.knn(ref.mu, leave_one_out=True)
    assert (own > 1e-3).all()                                   # not the zero distance to itself
    assert ref.stats["knn_z"][0] == pytest.approx(float(own.double().mean()), rel=1e-6)


def test_the_reference_survives_the_weights_only_checkpoint(seed):
    model, fit, _ = _tabular(seed)
    ref = LatentReference.fit(model, torch.from_numpy(fit))
    state = load_checkpoint(checkpoint_bytes(model))
    assert reference_from_checkpoint(state) is None             # a checkpoint from training has none
    back = reference_from_checkpoint(load_checkpoint(with_reference(state, ref)))
    assert back.k == ref.k and back.stats == ref.stats and torch.equal(back.mu, ref.mu)


def test_knn_scores_without_a_reference_and_tiny_references_are_refused(seed):
    model, fit, score = _tabular(seed)
    with pytest.raises(ValueError, match="needs the model's latent reference"):
        anomaly_score(model, torch.from_numpy(score), "knn_z")
    with pytest.raises(ValueError, match="more than k = 5 records, got 5"):
        LatentReference.fit(model, torch.from_numpy(fit[:5]))
    with pytest.raises(ValueError, match="unknown anomaly score 'elbo'"):
        anomaly_score(model, torch.from_numpy(score), "elbo")
