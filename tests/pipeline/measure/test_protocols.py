"""The protocol command (pipeline.measure.protocols): every vaepipe score and every baseline of one run in
one table, the M1+M2 probe's head on a toy with a known answer, and config errors. The figures
themselves come from `vaepipe protocol` runs (docs/quality.md), never from these tests."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.runtime.errors import ConfigError
from pipeline.measure import protocols
from pipeline.evaluation.probes import m2_error
from pipeline.measure.protocol_run import run_protocol, summary
from pipeline.measure.protocols import (BASELINES, CANDIDATES, COMBINED, CandidateScorer, ProtocolConfig, choose,
                                        one_class_split)


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


def test_breast_cancer_reports_every_score_and_baseline_of_the_same_draws(tmp_path):
    out = tmp_path / "bc.json"
    r = run_protocol(ProtocolConfig(what="breast-cancer", epochs=3, draws=2, iw_samples=2, json=str(out)))
    assert len(r["draws"]) == 2 and r["malignant_rows"] == round(357 * 0.05 / 0.95)
    for draw in r["draws"]:
        assert set(draw) == {*CANDIDATES, *BASELINES} and all(0.0 <= v <= 1.0 for v in draw.values())
    for k in (*CANDIDATES, *BASELINES):
        assert r["mean"][k] == pytest.approx(np.mean([d[k] for d in r["draws"]]))
    c = r["chosen"]
    assert c["epochs"] == 3 and c["score"] in CANDIDATES and r["epoch_grid"] == [3]
    assert c["train_split_auc"] == pytest.approx(np.mean([d[f"{c['score']}@3"] for d in r["train_split_auc"]]))
    assert c["held_out_auc"] == r["mean"][c["score"]]
    assert json.loads(out.read_text())["chosen"] == c
    diffs = [d[c["score"]] - d["isolation_forest"] for d in r["draws"]]
    v = r["vs_isolation_forest"]
    assert v["wins"] == sum(x > 0 for x in diffs) and v["mean_diff"] == pytest.approx(np.mean(diffs))
    text = summary(r)
    assert all(k in text for k in (*CANDIDATES, *BASELINES)) and "best baseline" in text and "cross-fit" in text
    assert "minus isolation_forest" in text


def test_an_ensemble_averages_each_candidate_over_members_whose_first_is_the_one_model_run():
    from sklearn.datasets import load_breast_cancer

    from pipeline.measure.protocols import tabular_scores

    x = load_breast_cancer(return_X_y=True)[0].astype(np.float32)
    fit, score = x[:80], x[80:120]
    one = ProtocolConfig(what="breast-cancer", iw_samples=2)
    two = ProtocolConfig(what="breast-cancer", iw_samples=2, ensemble=2)
    a, model_a = tabular_scores(fit, score, 2, one, seed=3)
    b = tabular_scores(fit, score, 2, one, seed=3 + 10_000)[0]      # what member 1 is seeded with
    both, model_0 = tabular_scores(fit, score, 2, two, seed=3)
    for k in CANDIDATES:
        np.testing.assert_allclose(both[k], (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-6)
    assert not np.allclose(a["neg_elbo"], b["neg_elbo"])             # the members differ
    for pa, p0 in zip(model_a.state_dict().values(), model_0.state_dict().values()):
        assert torch.equal(pa, p0)                                    # member 0 = the one-model fit


def test_knn_z_in_the_embedding_of_a_ppca_model_is_knn_on_pca_scores(seed):
    """What --tabular-build ppca --knn-space embedding measures when the nets are dropped: the model is
    pPCA with its round-trip map, whose embedding is PCA's scores rotated, so knn_z is the mean
    distance to the 5 nearest PCA scores (in the standardised columns); over μ it is not."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    from vae.recipe import ppca_start

    x = load_breast_cancer(return_X_y=True)[0].astype(np.float32)
    fit, score = x[:200], x[200:260]
    model = protocols.tabular_vae(fit, seed, linear_path=True)
    model.start_at(ppca_start(model, fit, seed))
    model.fit_round_trip(torch.from_numpy(fit))
    z = (x - fit.mean(0)) / fit.std(0)
    pca = PCA(4).fit(z[:200])
    expect = NearestNeighbors(n_neighbors=5).fit(pca.transform(z[:200])).kneighbors(pca.transform(z[200:260]))[0].mean(1)
    emb = CandidateScorer(model, fit, 2, seed, knn_space="embedding")(score)["knn_z"]
    np.testing.assert_allclose(emb, expect, rtol=2e-3)
    assert not np.allclose(CandidateScorer(model, fit, 2, seed)(score)["knn_z"], expect, rtol=0.05)


def test_choose_takes_the_best_mean_validation_auc_first_on_ties():
    aucs = [{"a": 0.75, "b": 0.5, "c": 0.625}, {"a": 0.75, "b": 1.0, "c": 0.875}]   # exact in binary
    assert choose(aucs, ("a", "b", "c")) == ("a", 0.75)      # a, b, c all mean 0.75: a first
    assert choose(aucs, ("c", "b")) == ("c", 0.75)
    assert choose([{"a": 0.5, "b": 0.7}], ("a", "b"))[0] == "b"


def test_one_class_split_keeps_validation_normals_out_of_fitting():
    y = np.random.default_rng(1).integers(0, 10, 3000)
    fit, normal, anomalous = one_class_split(y, 3, 0.2, 500, seed=0)
    assert set(fit).isdisjoint(normal) and set(fit) | set(normal) == set(np.flatnonzero(y == 3))
    assert len(normal) == round(0.2 * (y == 3).sum()) and (y[normal] == 3).all()
    assert len(anomalous) == 500 == len(set(anomalous)) and (y[anomalous] != 3).all()
    again = one_class_split(y, 3, 0.2, 500, seed=0)
    assert all((a == b).all() for a, b in zip((fit, normal, anomalous), again))
    assert not (one_class_split(y, 3, 0.2, 500, seed=1)[1] == normal).all()


def test_combined_scores_are_sums_of_terms_standardised_on_the_fitting_records():
    from pipeline.evaluation.datasets import digits
    from vae.config import VAEConfig
    from vae.model import VAE
    from vae.preprocess import Preprocessing

    x, _ = digits()
    x = x.reshape(len(x), -1)[:300]
    pre = Preprocessing(features=["image"], scaling="uint8", offset=[0.0] * 64, scale=[1 / 255] * 64)
    model = VAE(VAEConfig(input_shape=(64,), latent_dim=4, hidden=(16,), preprocessing=pre)).eval()
    scorer = CandidateScorer(model, x[:200], k=2, seed=0)
    s = scorer(x[200:])
    assert set(s) == set(CANDIDATES) and all(v.shape == (100,) for v in s.values())
    for name in COMBINED:
        a, b = name.split("+")
        (ma, sa), (mb, sb) = scorer.stats[a], scorer.stats[b]
        assert np.allclose(s[name], (s[a] - ma) / sa + (s[b] - mb) / sb, atol=1e-5)
    assert scorer.stats["knn_z"][0] > 0          # the fitting records' own k-NN score leaves each one out
    assert (s["knn_z"] == scorer(x[200:])["knn_z"]).all() and (s["iwae"] == scorer(x[200:])["iwae"]).all()


def test_one_class_choice_never_reads_the_held_out_images(monkeypatch):
    """The same run with the held-out images permuted and half of them inverted: the held-out AUCs
    move, what is chosen on the training split (and every training-split AUC) does not."""
    xtr, ytr, xte, yte = protocols.mnist_split(0)
    small = (xtr[:800], ytr[:800], xte[:200], yte[:200])
    cfg = dict(what="one-class-mnist", digits=[0, 1], epochs=1, arch="mlp", iw_samples=2, select_anomalies=60)
    monkeypatch.setattr(protocols, "mnist_split", lambda seed=0: small)
    r = run_protocol(ProtocolConfig(**cfg))
    p = np.random.default_rng(0).permutation(200)
    altered = small[2][p].copy()
    altered[:100] = 255 - altered[:100]
    monkeypatch.setattr(protocols, "mnist_split", lambda seed=0: (*small[:2], altered, small[3][p]))
    r2 = run_protocol(ProtocolConfig(**cfg))
    assert r2["chosen"]["score"] == r["chosen"]["score"] in CANDIDATES
    assert r2["train_split_auc"] == r["train_split_auc"]
    assert r2["chosen"]["train_split_auc"] == r["chosen"]["train_split_auc"]
    assert r2["per_digit"] != r["per_digit"]
    assert set(r["per_digit"]["0"]) == {*CANDIDATES, *BASELINES}
    assert r["chosen"]["held_out_auc"] == r["mean"][r["chosen"]["score"]]
    assert "chosen on the training split" in summary({**r, "threads": 1})


def test_m2_probe_labels_two_blobs_from_two_labels_each():
    g = np.random.default_rng(0)
    truth = np.repeat([3, 8], 1000)                              # any class values: 3 and 8
    mu = (np.where(truth[:, None] == 3, -3.0, 3.0) * np.array([1.0, 0.0]) + g.normal(size=(2000, 2))).astype(np.float32)
    lv = np.full_like(mu, -4.0)
    err = m2_error(mu[::2], lv[::2], truth[::2], mu[1::2], truth[1::2], n_labels=4, seed=0, epochs=30)   # 8 steps an epoch
    assert err < 0.05


@pytest.mark.parametrize("kw,match", [({"what": "nope"}, "what must be one of"), ({"digits": [10]}, "digits"),
                                      ({"labels": [1]}, "label counts"),
                                      ({"select_fraction": 0.0}, "select_fraction"),
                                      ({"epoch_grid": []}, "epoch_grid"), ({"ensemble": 0}, "ensemble"),
                                      ({"tabular_build": "pca"}, "tabular_build"),
                                      ({"knn_space": "z"}, "knn_space")])
def test_bad_protocol_settings_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        ProtocolConfig(**kw)


def test_evaluate_reports_the_m1_m2_probe_beside_the_others():
    from pipeline.evaluation.datasets import digits
    from pipeline.evaluation.eval_report import flat_metrics, table
    from pipeline.evaluation.evaluate import EvaluateConfig, evaluate_model
    from vae.config import VAEConfig
    from vae.model import VAE
    from vae.preprocess import Preprocessing

    x, y = digits()
    x = x.reshape(len(x), -1)
    pre = Preprocessing(features=["image"], scaling="uint8", offset=[0.0] * 64, scale=[1 / 255] * 64)
    model = VAE(VAEConfig(input_shape=(64,), latent_dim=4, hidden=(16,), preprocessing=pre)).eval()
    cfg = EvaluateConfig(model="m", input="i", labels="label", label_draws=1, m2_epochs=1, iw_samples=2,
                         iw_records=50, log_to_mlflow=False)
    r, _ = evaluate_model(model, x[900:], x[:900], cfg, {"label": y[900:]}, {"label": y[:900]})
    assert set(r["m2_error"]) == set(r["semi_supervised_error"]) == {"100", "600"}     # 1,000 > 900 records
    assert all(0.0 <= e <= 1.0 for e in r["m2_error"].values()) and r["m2_epochs"] == 1
    assert "M1+M2 error" in table({**r, "model": {"uri": "m"}})
    assert {"eval_m2_error_100", "eval_m2_error_sd_600"} <= set(flat_metrics(r))
