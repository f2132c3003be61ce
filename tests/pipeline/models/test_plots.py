"""The figures' maths: the 2-D view of μ."""
from __future__ import annotations

import numpy as np

from pipeline.evaluation.eval_metrics import fit_pca, pca_codes
from pipeline.models.plots import project_2d


def test_project_2d_is_scikit_learns_pca_scores_signs_included():
    rng = np.random.default_rng(0)
    mu = (rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8)) + 3).astype(np.float32)
    np.testing.assert_allclose(project_2d(mu), pca_codes(fit_pca(mu, 2), mu), rtol=1e-5, atol=1e-5)
    assert np.array_equal(project_2d(mu[:, :2]), mu[:, :2])            # 2-D μ is drawn as it is
    assert project_2d(mu[:, :1]).shape == (500, 2)
