"""The protocol command (pipeline.protocols): every vaepipe score and every baseline of one run in
one table, the M1+M2 probe's head on a toy with a known answer, and config errors. The figures
themselves come from `vaepipe protocol` runs (docs/quality.md), never from these tests."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.protocols import BASELINES, SCORES, ProtocolConfig, m2_error, run_protocol, summary


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


def test_breast_cancer_reports_every_score_and_baseline_of_the_same_draws(tmp_path):
    out = tmp_path / "bc.json"
    r = run_protocol(ProtocolConfig(what="breast-cancer", epochs=3, draws=2, iw_samples=2, json=str(out)))
    assert len(r["draws"]) == 2 and r["malignant_rows"] == round(357 * 0.05 / 0.95)
    for draw in r["draws"]:
        assert set(draw) == {*SCORES, *BASELINES} and all(0.0 <= v <= 1.0 for v in draw.values())
    for k in (*SCORES, *BASELINES):
        assert r["mean"][k] == pytest.approx(np.mean([d[k] for d in r["draws"]]))
    assert json.loads(out.read_text())["mean"] == r["mean"]
    text = summary(r)
    assert all(k in text for k in (*SCORES, *BASELINES)) and "best baseline" in text


def test_m2_probe_labels_two_blobs_from_two_labels_each():
    g = np.random.default_rng(0)
    truth = np.repeat([3, 8], 1000)                              # any class values: 3 and 8
    mu = (np.where(truth[:, None] == 3, -3.0, 3.0) * np.array([1.0, 0.0]) + g.normal(size=(2000, 2))).astype(np.float32)
    lv = np.full_like(mu, -4.0)
    err = m2_error(mu[::2], lv[::2], truth[::2], mu[1::2], truth[1::2], n_labels=4, seed=0, epochs=30)   # 8 steps an epoch
    assert err < 0.05


@pytest.mark.parametrize("kw,match", [({"what": "nope"}, "what must be one of"), ({"digits": [10]}, "digits"),
                                      ({"labels": [1]}, "label counts")])
def test_bad_protocol_settings_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        ProtocolConfig(**kw)


def test_evaluate_reports_the_m1_m2_probe_beside_the_others():
    from pipeline.datasets import digits
    from pipeline.eval_report import flat_metrics, table
    from pipeline.evaluate import EvaluateConfig, evaluate_model
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
