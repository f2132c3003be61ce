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


def test_every_row_is_in_exactly_one_cell_and_the_stored_index_maps_back_the_same(seed, tmp_path):
    import fsspec

    x = _mixture(1_000, seed)
    index = ivf.build(x, seed=seed)
    assert sorted(index.rows.tolist()) == list(range(1_000)) and index.offsets[-1] == 1_000
    fs = fsspec.filesystem("file")
    c = index.centroids                                  # the same cells: the same arrays expected
    blocks = lambda: ((lo, x[lo:lo + 64], None) for lo in range(0, len(x), 64))          # a table streamed in blocks
    ivf.write_blocks(fs, str(tmp_path / "i"), blocks(), c, ivf.assign(x, c), 16)
    back = ivf.IVFFlat.load(fs, str(tmp_path / "i"))
    assert isinstance(back.vectors, np.memmap)                               # local: mapped, not read
    assert all(np.array_equal(getattr(index, f), getattr(back, f)) for f in ivf.ARRAYS)
    mem = fsspec.filesystem("memory")                                        # remote: read into memory
    ivf.write_blocks(mem, "/i", blocks(), c, ivf.assign(x, c), 16)
    assert np.array_equal(ivf.IVFFlat.load(mem, "/i").vectors, index.vectors)


def test_two_level_assignment_finds_the_nearest_cell_for_nearly_every_row(seed):
    x = _mixture(30_000, seed)
    c = ivf.train(x, n_lists=3_000, iters=3, seed=seed, sample_per_list=8)    # above DIRECT_MAX: two levels
    a = ivf.assign(x, c, seed)
    exact = ivf._nearest(x, c)
    d = lambda cells: ((x - c[cells]) ** 2).sum(1)
    assert (a == exact).mean() > 0.97 and np.median(d(a) / np.maximum(d(exact), 1e-9)) == 1.0


def test_nprobe_is_the_smallest_power_of_two_reaching_the_target_and_a_query_never_counts_itself(seed):
    x = _mixture(10_000, seed)
    index = ivf.build(x, seed=seed)
    own = np.arange(0, 10_000, 97)
    truth = ivf.exact_neighbours(x, x[own], 11)
    nprobe, recall, tried = ivf.tune_nprobe(index, x[own], own, truth, 10, 0.95)
    assert recall >= 0.95 and tried[nprobe] == recall and all(r < 0.95 for n, r in tried.items() if n < nprobe)
    assert list(tried) == [2 ** i for i in range(len(tried))]
    # with its own row counted, every query would score a free hit: the measured recall is lower
    assert ivf.recall_at_k(index, x, x[own], 10, 1, own=own) < ivf.recall_at_k(index, x, x[own], 10, 1)


def test_fewer_records_than_k_leave_the_rest_empty_and_an_empty_table_is_refused(seed):
    index = ivf.build(_mixture(3, seed), n_lists=2)
    d, rows = ivf.search(index, np.zeros(16), 5, nprobe=2)
    assert (rows[0, :3] >= 0).all() and (rows[0, 3:] == -1).all() and np.isinf(d[0, 3:]).all()
    with pytest.raises(ValueError, match="empty"):
        ivf.build(np.zeros((0, 16), np.float32))
