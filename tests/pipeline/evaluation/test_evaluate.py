"""Evaluation maths where the answer is known, plus one end-to-end report on the digits model."""
import json
import math
import os

import numpy as np
import pytest
import torch

from pipeline.evaluation import eval_metrics as ev
from pipeline.table import quantize as qz
from vae.distributions import DiagonalGaussian


def test_kl_of_known_gaussians():
    # KL(N(μ,σ²)||N(0,1)) = ½(μ² + σ² − 1 − ln σ²): μ=1, σ²=1 → 0.5; μ=0, σ²=e → ½(e − 2)
    mu = np.array([[1.0, 0.0]]); logvar = np.array([[0.0, 1.0]])
    want = 0.5 + 0.5 * (math.e - 2)
    assert ev.gaussian_kl(mu, logvar)[0] == pytest.approx(want)
    assert float(DiagonalGaussian(torch.tensor(mu), torch.tensor(logvar)).kl()[0]) == pytest.approx(want)
    assert ev.gaussian_kl(np.zeros((1, 3)), np.zeros((1, 3)))[0] == 0.0


def test_pca_exact_rank_and_bytes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) @ rng.normal(size=(3, 20)) + 5.0   # rank 3 after centring
    p = ev.fit_pca(x, 20)
    assert np.abs(ev.pca_reconstruct(p, ev.pca_codes(p, x, 3)) - x).max() < 1e-4
    assert ((ev.pca_reconstruct(p, ev.pca_codes(p, x, 2)) - x) ** 2).mean() > 1e-3
    # the first k components of one fit are the k-component fit (one SVD serves the whole curve)
    p2 = ev.fit_pca(x, 2)
    assert np.allclose(ev.pca_reconstruct(p, ev.pca_codes(p, x, 2)), ev.pca_reconstruct(p2, ev.pca_codes(p2, x)))
    assert [qz.bytes_per_record(16, q) for q in ("fp32", "fp16", "int8")] == [64, 32, 16]


def test_psnr_and_quantize():
    assert ev.psnr(0.01) == pytest.approx(20.0)
    assert ev.psnr(1e-4, peak=1.0) == pytest.approx(40.0)
    assert ev.psnr(0.0) == float("inf")
    z = np.linspace(-3, 3, 256, dtype=np.float32)[:, None]
    assert np.abs(qz.stored(z, "int8") - z).max() <= 3 / 127 / 2 + 1e-6     # half a step of max|z|/127
    assert np.abs(qz.stored(z, "fp16") - z).max() < 2e-3


def test_int8_is_symmetric_per_dimension_with_scale_max_abs_over_127():
    mu = np.array([[-2.0, 0.5], [1.0, -0.25], [0.0, 0.0]], np.float32)
    scale = qz.int8_scale(mu)
    assert scale.dtype == np.float32 and np.allclose(scale, [2 / 127, 0.5 / 127])
    q = qz.quantize(mu, scale)
    assert q.dtype == np.int8 and q[:, 0].tolist() == [-127, 64, 0] and q[:, 1].tolist() == [127, -64, 0]
    assert q[2].tolist() == [0, 0]                                          # zero stays exactly zero
    assert np.abs(qz.dequantize(q, scale) - mu).max() <= scale.max() / 2 + 1e-7
    # values beyond the reference's range clip to ±127 (the scale comes from the reference sample)
    assert qz.quantize(np.array([[10.0, -10.0]], np.float32), scale).tolist() == [[127, -127]]


def test_probe_sampling_balanced_and_seeded():
    y = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140])
    a, b = ev.balanced_indices(y, 100, seed=3), ev.balanced_indices(y, 100, seed=3)
    assert np.array_equal(a, b) and len(a) == 100 and len(set(a)) == 100
    assert np.bincount(y[a]).tolist() == [10] * 10
    assert not np.array_equal(a, ev.balanced_indices(y, 100, seed=4))
    assert sorted(np.bincount(y[ev.balanced_indices(y, 15, 0)]).tolist()) == [1] * 5 + [2] * 5


def test_probe_and_auc_on_separable_toy():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    x = rng.uniform(-1, 1, size=(400, 2)) + 3.0 * y[:, None]     # classes 1 apart on each axis
    assert ev.probe_error(x, y, x, y, 20, seed=0) == 0.0
    assert ev.roc_auc(x[:, 0], y) == 1.0
    assert ev.roc_auc(-x[:, 0], y) == 0.0


def test_label_spreading_uses_unlabelled_records_where_logistic_cannot():
    # Two interleaved half-moons, 10 labels: a line through 10 points cannot separate them, but the
    # neighbour graph of all 600 records carries each label along its moon (the transductive probe).
    from sklearn.datasets import make_moons

    x, y = make_moons(600, noise=0.04, random_state=0)
    xt, yt = make_moons(400, noise=0.04, random_state=1)
    assert ev.spreading_error(x, y, xt, yt, 10, seed=0) < 0.01
    assert ev.probe_error(x, y, xt, yt, 10, seed=0) > 0.08
    assert ev.spreading_error(x, y, xt, yt, 10, seed=0) == ev.spreading_error(x, y, xt, yt, 10, seed=0)


def test_evaluate_end_to_end(trained_digits, digits_parquet, workdir, tmp_path):
    from jobs.evaluate import Config, run
    from pipeline.models import registry

    out, rep = str(tmp_path / "eval.json"), str(tmp_path / "report")
    run(Config(model="models:/digits@production", input=digits_parquet, labels="label", json=out, report=rep,
               iw_samples=5, iw_records=50, workdir=workdir))
    r = json.load(open(out))
    for k in ("elbo", "recon_nll", "kl", "iw_log_likelihood", "active_units", "compression", "probe_error", "note"):
        assert k in r
    assert r["elbo"] == pytest.approx(-(r["recon_nll"] + r["kl"]))
    rows = {row["precision"]: row for row in r["compression"]["rows"]}
    assert [rows[p]["bytes_per_record"] for p in ("fp32", "fp16", "int8")] == [16, 8, 4]
    vals = [r["elbo"], r["iw_log_likelihood"]] + [v for row in rows.values() for k, v in row.items()
                                                  if k.endswith("mse") or k.endswith("db")]
    vals += [e for d in r["probe_error"].values() for e in d.values()]
    vals += [e for d in r["semi_supervised_error"].values() for e in d.values()]
    assert set(r["semi_supervised_error"]["100"]) == {"mu", "raw", "pca"}
    assert all(math.isfinite(v) for v in vals)
    assert set(r["probe_error"]) == {"100", "600"}      # 898 training records: no 1,000-label probe
    # each probe is the mean of 5 seeded label draws; the draws differ, so the spread is not zero
    assert r["label_draws"] == 5 and set(r["probe_error_sd"]) == set(r["probe_error"])
    assert r["probe_error_sd"]["100"]["raw"] > 0 and all(
        v >= 0 for d in r["semi_supervised_error_sd"].values() for v in d.values())
    for f in ("samples_reconstructions.png", "latent_scatter.png", "rate_distortion.png", "probe_accuracy.png"):
        assert os.path.getsize(os.path.join(rep, f)) > 1000
    c = registry.client(registry_uri(workdir))
    run_ = c.get_run(trained_digits.run_id)
    assert "eval_elbo" in run_.data.metrics
    assert {a.path for a in c.list_artifacts(trained_digits.run_id, "evaluation")} >= {"evaluation/rate_distortion.png"}


def registry_uri(workdir):
    from pipeline.runtime.config import RuntimeConfig
    return RuntimeConfig(workdir=workdir).resolved_tracking_uri()
