"""The IVF-flat index (pipeline.search.ivf): recall against an exact scan, exact distances, storage."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.search import ivf


def _mixture(n: int, seed: int) -> np.ndarray:
    # clustered 16-d vectors, as μ of a trained model are (classes form clumps), not uniform noise
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, 16)) * 3
    return (centres[rng.integers(0, 40, n)] + rng.normal(size=(n, 16))).astype(np.float32)


def test_recall_at_10_is_high_and_grows_with_nprobe(seed):
    x = _mixture(20_000, seed)
    index = ivf.build(x, seed=seed)
    q = x[np.random.default_rng(seed + 1).choice(len(x), 50, replace=False)] + 0.1
    low, high = ivf.recall_at_k(index, x, q, 10, 1), ivf.recall_at_k(index, x, q, 10, 32)
    assert high >= 0.95 and high >= low


def test_returned_distances_are_exact_and_all_cells_give_the_exact_answer(seed):
    x = _mixture(3_000, seed)
    index = ivf.build(x, n_lists=20, seed=seed)
    q = x[:5] + 0.05
    d, rows = ivf.search(index, q, 7, nprobe=20)                 # every cell: an exact scan
    for i in range(5):
        exact = ((x - q[i]) ** 2).sum(1)
        np.testing.assert_allclose(d[i], exact[rows[i]], rtol=1e-5)
        np.testing.assert_allclose(np.sort(d[i]), np.sort(exact)[:7], rtol=1e-5)


def test_every_row_is_in_exactly_one_cell_and_the_index_round_trips_without_pickle(seed, tmp_path):
    x = _mixture(1_000, seed)
    index = ivf.build(x, seed=seed)
    assert sorted(index.rows.tolist()) == list(range(1_000)) and index.offsets[-1] == 1_000
    index.save(str(tmp_path / "i.npz"))
    back = ivf.IVFFlat.load(str(tmp_path / "i.npz"))
    assert all(np.array_equal(getattr(index, f), getattr(back, f)) for f in ("centroids", "offsets", "rows", "vectors"))


def test_fewer_records_than_k_leave_the_rest_empty_and_an_empty_table_is_refused(seed):
    index = ivf.build(_mixture(3, seed), n_lists=2)
    d, rows = ivf.search(index, np.zeros(16), 5, nprobe=2)
    assert (rows[0, :3] >= 0).all() and (rows[0, 3:] == -1).all() and np.isinf(d[0, 3:]).all()
    with pytest.raises(ValueError, match="empty"):
        ivf.build(np.zeros((0, 16), np.float32))
