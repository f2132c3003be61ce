"""Label spreading over latent means (vae.spreading): one label per cluster reaches the whole cluster,
new records take their neighbours' labels, and it agrees with scikit-learn's LabelSpreading."""
from __future__ import annotations

import numpy as np
import torch

from vae.spreading import induce, pseudo_label, spread


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


def _one_label_each(y: torch.Tensor, classes: int = 3) -> torch.Tensor:
    partial = torch.full_like(y, -1)
    for c in range(classes):
        partial[int(torch.nonzero(y == c)[0])] = c
    return partial


def test_pseudo_labels_take_the_surest_fraction_of_each_class_and_keep_the_true_labels(seed):
    x, y = _blobs(600, seed)
    partial = _one_label_each(y)
    out = pseudo_label(x, partial, 3, 0.5)
    labelled = partial >= 0
    assert torch.equal(out[labelled], partial[labelled])                    # the given labels stay
    new = (out >= 0) & ~labelled
    assert (out[new] == y[new]).float().mean() > 0.99   # the surest (a blob's stray points sit in another blob)
    dist = spread(x, partial, 3)
    conf, cls = dist.max(1)
    for c in range(3):                                                      # half of what spreading gave each class,
        given = ~labelled & (cls == c)                                      # and the surest half
        assert int((new & (cls == c)).sum()) == round(0.5 * int(given.sum()))
        assert conf[new & (cls == c)].min() >= conf[given & ~new].max()
    assert torch.equal(pseudo_label(x, partial, 3, 0.0), partial)           # off: nothing added
    assert torch.equal(pseudo_label(x, torch.full_like(y, -1), 3, 0.5), torch.full_like(y, -1))   # no labels


def test_pseudo_labels_over_many_records_spread_over_a_seeded_subset(seed):
    # spreading is O(R²): above max_rows it runs on every labelled record and a drawn subset of the rest
    x, y = _blobs(600, seed)
    partial = _one_label_each(y)
    a = pseudo_label(x, partial, 3, 0.5, max_rows=103, generator=torch.Generator().manual_seed(1))
    b = pseudo_label(x, partial, 3, 0.5, max_rows=103, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)                                                # a function of the generator
    new = (a >= 0) & (partial < 0)
    assert 0 < int(new.sum()) <= 100 // 2 + 3 and (a[new] == y[new]).float().mean() > 0.97
