"""The default recipe (vae.recipe): architecture, likelihood and training length from the data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vae.model import VAE
from vae.preprocess import Preprocessing
from vae.recipe import MAX_AUTO_EPOCHS, STEP_BUDGET, architecture, auto_epochs, model_config, start


def test_auto_epochs_gives_a_small_table_many_epochs_and_a_large_one_few():
    assert auto_epochs(455, 128) == min(MAX_AUTO_EPOCHS, STEP_BUDGET // 4)       # 4 steps per epoch
    assert auto_epochs(7_200, 128) == 36                                          # 57 steps per epoch
    assert auto_epochs(10_000_000, 128) == 1


def test_auto_epochs_counts_each_workers_shard():
    # two workers each step on half the records: twice the epochs for the same steps per worker
    assert auto_epochs(25_600, 128, workers=2) == 2 * auto_epochs(25_600, 128, workers=1)


def test_auto_architecture_honours_a_colour_image_shape():
    assert architecture("auto", 3 * 32 * 32, "list", (3, 32, 32)) == ("conv", (3, 32, 32))


def test_resconv_is_asked_for_and_needs_an_image_shape():
    assert architecture("resconv", 3 * 32 * 32, "list", (3, 32, 32)) == ("resconv", (3, 32, 32))
    assert architecture("resconv", 784, "list") == ("resconv", (1, 28, 28))
    with pytest.raises(ValueError, match="--arch resconv needs --image-shape"):
        architecture("resconv", 30, "scalars")


def test_auto_architecture_takes_square_grey_images_and_leaves_tables_to_the_mlp():
    assert architecture("auto", 784, "list") == ("conv", (1, 28, 28))
    assert architecture("auto", 30, "scalars") == ("mlp", (30,))
    assert architecture("auto", 36, "list") == ("mlp", (36,))        # 6×6: too small for two stride-2 layers


def test_an_image_shape_that_does_not_hold_the_features_is_refused():
    with pytest.raises(ValueError, match="holds 3072 values"):
        architecture("auto", 784, "list", (3, 32, 32))


def test_the_default_model_is_a_calibrated_gaussian_with_a_linear_path():
    pre = Preprocessing.fit(np.random.randn(50, 6), list("abcdef"), "scalars")
    cfg = model_config(pre, 6, "scalars", 2)
    assert (cfg.likelihood, cfg.calibrated, cfg.linear_path, cfg.arch) == ("gaussian", True, True, "mlp")


def test_bernoulli_is_refused_for_data_outside_the_unit_interval():
    pre = Preprocessing.fit(np.random.randn(50, 3) * 9, list("abc"), "scalars")
    with pytest.raises(ValueError, match="needs data in \\[0, 1\\]"):
        model_config(pre, 3, "scalars", 2, likelihood_choice="bernoulli")


def test_a_started_model_reconstructs_like_pca_before_any_training(seed):
    # data on a 2-d plane in 6-d plus a little noise: pPCA's posterior mean decodes almost exactly
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(400, 2)) @ rng.normal(size=(2, 6)) * 3 + rng.normal(size=(400, 6)) * 0.01).astype(np.float32)
    pre = Preprocessing.fit(x, list("abcdef"), "scalars", scaling="none")
    model = VAE(model_config(pre, 6, "scalars", 2))
    start(model, x)
    model.eval()
    recon = model.reconstruct(model.embed(torch.from_numpy(x)).mean).numpy()
    assert float(np.mean((recon - x) ** 2)) < 1e-3 * float(np.var(x))


def test_the_nets_are_kept_only_when_their_gain_less_two_standard_errors_clears_the_margin():
    from vae.recipe import NETS_MIN_GAIN, keep_nets

    def sums(lin, full):
        lin, full = np.asarray(lin, float), np.asarray(full, float)
        return full.sum(), lin.sum(), ((lin - full) ** 2).sum(), float(len(lin))

    lin = np.full(400, 10.0)
    assert keep_nets(*sums(lin, lin * 0.5))                                   # a steady large gain
    assert not keep_nets(*sums(lin, lin * (1 - NETS_MIN_GAIN / 2)))           # steady, below the margin
    assert not keep_nets(*sums(lin, lin * 1.01)) and not keep_nets(*sums(lin, lin))
    noisy = np.where(np.arange(400) % 2 == 0, 0.0, 1.4) * lin                 # half the records much better, half worse
    assert (noisy.sum() < 0.75 * lin.sum()) and keep_nets(*sums(lin, noisy))  # 400 records: the gain is clear
    few = np.array([10.0] * 10)
    assert not keep_nets(*sums(few, np.where(np.arange(10) == 0, 0.0, 9.5)))    # 10 records, one carries the gain
    assert keep_nets(*sums(lin, lin * 1.5), min_gain=-1)                      # negative: always kept
