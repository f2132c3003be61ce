"""The any-data panel (pipeline.measure.panel): its data sets, and one short run of the protocol."""
from __future__ import annotations

import numpy as np
import pytest

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
    assert d16.label_draws == bc.label_draws == 5        # small label sets: a draw moves the error by points


def test_an_unknown_set_is_named():
    with pytest.raises(ValueError, match="unknown panel set 'cifar'"):
        panel.panel_sets(("cifar",))


def test_a_short_panel_run_reports_every_figure_against_its_baseline(seed, capsys):
    r = panel.any_data(("breast-cancer",), seed=0, epochs=20, label_draws=2)
    (row,) = r["sets"]
    assert row["arch"] == "mlp" and row["likelihood"] == "gaussian" and row["scaling"] == "standardize"
    # the VAE is started at pPCA, so even 20 epochs keep about what PCA keeps, in standardised units
    assert 0.3 < row["mse_vs_pca"] < 1.5 and row["active_units"] >= 1
    assert 0.8 < row["knn5_mu"] <= 1 and 0.8 < row["knn5_pca"] <= 1
    assert 0 <= row["m2_error"] < 0.5 and 0 <= row["spreading_error_raw"] < 0.5 and row["labels"] == 20
    assert 0 <= row["spreading_error_mu"] < 0.5
    # two label draws, each compared on the same labels: the means are of the draws, the difference paired
    assert row["label_draws"] == 2 and len(row["m2_error_draws"]) == 2
    assert row["m2_error"] == pytest.approx(np.mean(row["m2_error_draws"]))
    assert row["m2_minus_raw"] == pytest.approx(np.mean(row["m2_error_draws"]) - np.mean(row["spreading_error_raw_draws"]))
    out = capsys.readouterr().out
    assert "breast-cancer" in out and "× PCA" in out
    assert "breast-cancer | 1 | mlp | 20 |" in panel.summary(r)


def test_the_panel_trains_with_vaepipe_trains_defaults():
    # the panel claims to measure what a user gets: its settings are train's defaults
    import dataclasses

    from pipeline.training.train_config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert (panel.BATCH_SIZE, panel.VAL_FRACTION, panel.HEAD_EPOCHS, panel.WEIGHT_DECAY) == (
        defaults["batch_size"], defaults["val_fraction"], defaults["head_epochs"], defaults["weight_decay"])
