"""Label spreading over latent means (vae.spreading): one label per cluster reaches the whole cluster,
new records take their neighbours' labels, and it agrees with scikit-learn's LabelSpreading."""
from __future__ import annotations

import numpy as np
import torch

from vae.spreading import induce, spread


def _blobs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    y = rng.integers(0, 3, n)
    return torch.from_numpy((centres[y] + rng.normal(size=(n, 2))).astype(np.float32)), torch.from_numpy(y)


def test_one_label_per_cluster_reaches_the_cluster_and_new_records(seed):
    x, y = _blobs(600, seed)
    partial = torch.full_like(y, -1)
    for c in range(3):                        # one labelled record per class
        i = int(torch.nonzero(y == c)[0])
        partial[i] = c
    f = spread(x, partial, 3)
    assert f.shape == (600, 3) and torch.allclose(f.sum(1), torch.ones(600))
    assert (f.argmax(1) == y).float().mean() > 0.97
    xn, yn = _blobs(200, seed + 1)
    assert (induce(x, f, xn).argmax(1) == yn).float().mean() > 0.97


def test_it_agrees_with_scikit_learns_label_spreading(seed):
    from sklearn.semi_supervised import LabelSpreading

    x, y = _blobs(400, seed)
    partial = torch.full_like(y, -1)
    partial[:12] = y[:12]
    ours = spread(x, partial, 3).argmax(1).numpy()
    theirs = LabelSpreading(kernel="knn", n_neighbors=10, alpha=0.99, max_iter=1000).fit(
        x.numpy().astype(np.float64), partial.numpy()).transduction_
    assert (ours == theirs).mean() > 0.97
