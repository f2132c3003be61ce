"""The any-data panel (pipeline.measure.panel): its data sets, and one short run of the protocol."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.measure import panel


def test_the_panel_sets_hold_what_the_issue_names(seed):
    sets = {s.name: s for s in panel.panel_sets(("digits-0-16", "digits-0-255", "breast-cancer", "patches16-china"))}
    d16, d255 = sets["digits-0-16"], sets["digits-0-255"]
    assert d16.x_train.max() == 16 and d255.x_train.max() == 255           # as stored, and rescaled
    assert np.array_equal(d16.y_test, d255.y_test)                          # the same split
    bc = sets["breast-cancer"]
    assert bc.layout == "scalars" and bc.x_train.shape[1] == 30 and len(bc.x_test) == 169
    p = sets["patches16-china"]
    assert p.x_train.shape == (4000, 768) and p.x_test.shape == (1000, 768) and p.image_shape == (3, 16, 16)
    assert p.y_train is None
    assert d16.label_draws == bc.label_draws == 10       # small label sets: a draw moves the error by points


def test_an_unknown_set_is_named():
    with pytest.raises(ValueError, match="unknown panel set 'cifar'"):
        panel.panel_sets(("cifar",))


def test_a_short_panel_run_reports_every_figure_against_its_baseline(seed, capsys):
    r = panel.any_data(("breast-cancer",), seed=0, epochs=20, label_draws=2)
    (row,) = r["sets"]
    assert row["arch"] == "mlp" and row["likelihood"] == "gaussian" and row["scaling"] == "standardize"
    # the VAE is started at pPCA, so even 20 epochs keep about what PCA keeps, in standardised units
    assert 0.3 < row["mse_vs_pca"] < 1.5 and row["active_units"] >= 1
    assert 0.8 < row["knn5_mu"] <= 1 and 0.8 < row["knn5_pca"] <= 1 and 0.8 < row["knn5_emb"] <= 1
    if not row["nets_kept"]:   # pPCA with its round-trip map: the embedding is PCA's scores, rotated
        assert row["knn5_emb"] == pytest.approx(row["knn5_pca"], abs=0.01)
    assert 0 <= row["m2_error"] < 0.5 and 0 <= row["spreading_error_raw"] < 0.5 and row["labels"] == 20
    assert 0 <= row["spreading_error_mu"] < 0.5 and 0 <= row["spreading_error_pca"] < 0.5
    assert 0 <= row["spreading_error_emb"] < 0.5 and len(row["spreading_error_emb_draws"]) == 2
    # two label draws, each compared on the same labels: the means are of the draws, the difference paired
    assert row["label_draws"] == 2 and len(row["m2_error_draws"]) == 2
    assert row["m2_error"] == pytest.approx(np.mean(row["m2_error_draws"]))
    assert row["m2_minus_raw"] == pytest.approx(np.mean(row["m2_error_draws"]) - np.mean(row["spreading_error_raw_draws"]))
    diff = np.subtract(row["m2_error_draws"], row["spreading_error_raw_draws"])
    assert row["m2_minus_raw_se"] == pytest.approx(np.std(diff, ddof=1) / np.sqrt(2))
    # the nets' check: reported, and a dropped model round-trips like PCA (the map makes pPCA PCA's projection)
    assert isinstance(row["nets_kept"], bool) and row["nets_gain_lower"] <= row["nets_gain"]
    if not row["nets_kept"]:
        assert row["mse_vs_pca"] == pytest.approx(1.0, abs=0.02)
    out = capsys.readouterr().out
    assert "breast-cancer" in out and "× PCA" in out and "nets " in out
    assert "breast-cancer | 1 | mlp | 20 |" in panel.summary(r)


def test_the_panel_trains_with_vaepipe_trains_defaults():
    # the panel claims to measure what a user gets: its settings are train's defaults
    import dataclasses

    from pipeline.training.train_config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert (panel.BATCH_SIZE, panel.VAL_FRACTION, panel.HEAD_EPOCHS, panel.WEIGHT_DECAY) == (
        defaults["batch_size"], defaults["val_fraction"], defaults["head_epochs"], defaults["weight_decay"])
    from vae.recipe import NETS_MIN_GAIN                 # the nets' check: fit_vae uses keep_nets's default

    assert NETS_MIN_GAIN == defaults["nets_min_gain"]
    assert panel.PSEUDO_LABELS == defaults["pseudo_labels"]   # the head's pseudo-labels, as train's


def _started(x: np.ndarray, latent_dim: int, hidden: tuple[int, ...]):
    from vae.model import VAE
    from vae.preprocess import Preprocessing
    from vae.recipe import model_config, ppca_start

    pre = Preprocessing.fit(x, [f"c{i}" for i in range(x.shape[1])], "scalars", "auto")
    model = VAE(model_config(pre, x.shape[1], "scalars", latent_dim, hidden=hidden))
    p = ppca_start(model, x, 0)
    model.start_at(p)
    return model, p


def test_trained_nets_that_do_not_beat_ppca_on_validation_are_dropped_for_the_start(seed):
    """Data that is pPCA exactly (a linear map of Gaussian latents plus noise): the nets have nothing to
    add, so training ends at the start; a curve that no linear map holds keeps them."""
    from pipeline.measure.protocols import fit_vae

    g = np.random.default_rng(seed)
    linear = (g.standard_normal((800, 2)) @ g.standard_normal((2, 10)) + 0.3 * g.standard_normal((800, 10)))
    model, p = _started(linear.astype(np.float32), 2, (32, 32))
    nets: dict = {}
    model = fit_vae(model, linear.astype(np.float32), 20, 64, seed=seed, val_fraction=0.2, start=p, nets=nets)
    x = model.preprocess(torch.from_numpy(linear.astype(np.float32)))
    full, lin = model.round_trip_errors(x)
    assert not nets["nets_kept"] and nets["val_round_trip_mse"] > 0.9 * nets["val_linear_round_trip_mse"]
    assert torch.allclose(full, lin, atol=1e-4)                       # the model is its pPCA start again

    t = g.standard_normal(800)
    curve = np.stack([t, t ** 2, np.sin(2 * t), np.cos(2 * t)], 1) + 0.02 * g.standard_normal((800, 4))
    model, p = _started(curve.astype(np.float32), 1, (32, 32))
    nets = {}
    fit_vae(model, curve.astype(np.float32), 60, 64, seed=seed, val_fraction=0.2, start=p, nets=nets)
    assert nets["nets_kept"] and nets["val_round_trip_mse"] < 0.5 * nets["val_linear_round_trip_mse"], nets
