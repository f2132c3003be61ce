"""An inverted-file index with flat (exact) lists over μ: k-means cells, each query scored exactly
against the records of its `nprobe` nearest cells. Distances of the returned neighbours are exact
squared Euclidean distances (the same float32 arithmetic as pipeline.search.knn); only which records
are looked at is approximate, and `recall_at_k` measures that against an exact scan.

numpy only (a query process stays light). Stored as one .npz of plain arrays (no pickle)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CHUNK = 65_536   # rows assigned to cells per matrix product


@dataclass
class IVFFlat:
    centroids: np.ndarray   # (C, L) float32 cell centres
    offsets: np.ndarray     # (C + 1,) int64: cell c holds positions offsets[c]:offsets[c + 1]
    rows: np.ndarray        # (N,) int64 row number in the table of each position
    vectors: np.ndarray     # (N, L) float32 μ in cell order

    @property
    def n_lists(self) -> int:
        return len(self.centroids)

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            np.savez(f, centroids=self.centroids, offsets=self.offsets, rows=self.rows, vectors=self.vectors)

    @classmethod
    def load(cls, path: str) -> "IVFFlat":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["centroids"], z["offsets"], z["rows"], z["vectors"])


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for each row of x: (N, L), (C, L) -> (N,)."""
    cc = (c * c).sum(1)
    out = np.empty(len(x), np.int64)
    for i in range(0, len(x), CHUNK):
        xb = x[i:i + CHUNK]
        out[i:i + CHUNK] = np.argmin(cc[None, :] - 2 * xb @ c.T, axis=1)
    return out


def build(x: np.ndarray, n_lists: int = 0, iters: int = 10, seed: int = 0, sample_per_list: int = 64) -> IVFFlat:
    """Index x (N, L): k-means (Lloyd, `iters` rounds) on a seeded sample of up to sample_per_list × n_lists
    rows, then every row assigned to its nearest centre. n_lists 0: about 4·√N."""
    x = np.ascontiguousarray(x, np.float32)
    n = len(x)
    if n == 0:
        raise ValueError("cannot index an empty table")
    n_lists = min(n, n_lists or max(1, round(4 * math.sqrt(n))))
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(n, min(n, sample_per_list * n_lists), replace=False)]
    c = sample[rng.choice(len(sample), n_lists, replace=False)].copy()
    for _ in range(iters):
        a = _nearest(sample, c)
        sums = np.zeros_like(c, dtype=np.float64)
        np.add.at(sums, a, sample)
        counts = np.bincount(a, minlength=n_lists)
        full = counts > 0
        c[full] = (sums[full] / counts[full, None]).astype(np.float32)   # an empty cell keeps its centre
    a = _nearest(x, c)
    order = np.argsort(a, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(a, minlength=n_lists))]).astype(np.int64)
    return IVFFlat(c, offsets, order.astype(np.int64), x[order])


def search(index: IVFFlat, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared distances (Q, k), table rows (Q, k)) of each query's k nearest among its `nprobe`
    nearest cells, ascending; inf and -1 where fewer than k records were looked at."""
    q = np.ascontiguousarray(queries, np.float32).reshape(-1, index.centroids.shape[1])
    cd = (index.centroids * index.centroids).sum(1)[None, :] - 2 * q @ index.centroids.T       # (Q, C)
    probe = np.argsort(cd, axis=1)[:, :min(nprobe, index.n_lists)]
    d_out = np.full((len(q), k), np.inf, np.float32)
    r_out = np.full((len(q), k), -1, np.int64)
    for i, cells in enumerate(probe):
        pos = np.concatenate([np.arange(index.offsets[c], index.offsets[c + 1]) for c in cells])
        diff = index.vectors[pos] - q[i]
        d = np.einsum("ij,ij->i", diff, diff)
        top = np.argsort(d, kind="stable")[:k]
        d_out[i, :len(top)], r_out[i, :len(top)] = d[top], index.rows[pos[top]]
    return d_out, r_out


def recall_at_k(index: IVFFlat, x: np.ndarray, queries: np.ndarray, k: int, nprobe: int) -> float:
    """Share of the exact k nearest rows of x (brute force) that `search` returns, over the queries."""
    x = np.asarray(x, np.float32)
    _, got = search(index, queries, k, nprobe)
    hit = 0
    for i, qv in enumerate(np.asarray(queries, np.float32)):
        d = ((x - qv) ** 2).sum(1)
        want = np.argsort(d, kind="stable")[:k]
        hit += len(set(want.tolist()) & set(got[i].tolist()))
    return hit / (len(queries) * k)
