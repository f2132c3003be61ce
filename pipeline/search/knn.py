"""Exact k nearest neighbours in Euclidean distance over blocks of latent vectors: numpy and pyarrow
only (no torch, no Ray), shared by `vaepipe query` and `vaepipe neighbours`.

The distance is the one DuckDB's `array_distance` computes on FLOAT arrays: the float32 sum, in
dimension order, of (a_j - b_j)², then its square root. A block is first scored for all queries at
once by one matrix product (|x|² - 2 x·q + |q|², float32: fast, but rounded differently). Every row
whose score could still place it among the k nearest, allowing for a bound on that rounding error,
is then re-scored with the exact formula, so the answer is exact, not approximate. Selection is by
`np.partition` / thresholds, never by sorting a block; the running state is k rows per query.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from pipeline.runtime.errors import SchemaError

U32 = 2.0 ** -24          # unit roundoff of float32
SCORE_BUDGET = 1 << 22    # floats in one (queries × rows) score matrix: 16 MiB


# pyarrow's own Array.to_numpy() and pa.array() import pandas on first use (~0.15 s): too much for a
# short query process. These two do the same for fixed-width numbers through the buffer protocol.

_FLOATS = {"halffloat": np.float16, "float": np.float32, "double": np.float64}


def np_dtype(typ: pa.DataType) -> np.dtype:
    """numpy dtype of an Arrow integer or floating type (`to_pandas_dtype` would import pandas)."""
    return np.dtype(_FLOATS.get(str(typ), str(typ)))


def to_np(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-width numeric Arrow array without nulls → a zero-copy numpy view (a copy for several
    chunks); anything else goes through pyarrow's own conversion."""
    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks == 1:
            arr = arr.chunk(0)
        else:
            return np.concatenate([to_np(c) for c in arr.chunks]) if arr.num_chunks else \
                np.empty(0, np_dtype(arr.type))
    typ = arr.type
    if arr.null_count == 0 and (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
        dt = np_dtype(typ)
        buf = arr.buffers()[1]
        if buf is None:
            return np.empty(0, dt)
        return np.frombuffer(buf, dt, count=arr.offset + len(arr))[arr.offset:]
    return arr.to_numpy(zero_copy_only=False)


def from_np(a: np.ndarray) -> pa.Array:
    """A 1-D numeric numpy array → an Arrow array (no pandas import)."""
    a = np.ascontiguousarray(a)
    return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), len(a), [None, pa.py_buffer(a)])


def string_array(values: list[str]) -> pa.Array:
    """Python strings → an Arrow string array (no pandas import)."""
    data = [v.encode() for v in values]
    offsets = np.zeros(len(data) + 1, np.int32)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def unique_first(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique values, index of each one's first occurrence): `np.unique(a, return_index=True)`
    without its `np.ma` check, whose first use imports numpy.ma (~8 ms of a short query process)."""
    order = np.argsort(a, kind="stable")
    s = a[order]
    keep = np.ones(len(s), bool)
    keep[1:] = s[1:] != s[:-1]
    return s[keep], order[keep]


def latent_matrix(col: pa.Array | pa.ChunkedArray, metadata: dict | None = None, source: str = "") -> np.ndarray:
    """A list column of latent vectors → a float32 (N, D) array (a zero-copy view for float32
    fixed_size_list without nulls). int8 latents written by `encode --dtype int8` are scaled back
    with the per-dimension scale in the file metadata."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    typ = col.type
    if col.null_count:
        raise SchemaError(f"{source}: latent column holds {col.null_count} null vector(s)")
    if pa.types.is_fixed_size_list(typ):
        dim = typ.list_size
        values = col.values.slice(col.offset * dim, len(col) * dim)
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        offs = to_np(col.offsets)
        lens = np.diff(offs)
        dim = int(lens[0]) if len(lens) else 0
        if len(lens) and not (lens == dim).all():
            raise SchemaError(f"{source}: latent vectors have different lengths ({int(lens.min())}..{int(lens.max())})")
        values = col.values.slice(int(offs[0]), len(col) * dim) if len(offs) else col.values.slice(0, 0)
    else:
        raise SchemaError(f"{source}: latent column is {typ}, expected a (fixed size) list of numbers")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise SchemaError(f"{source}: latent column is {typ}, expected a list of numbers")
    if values.null_count:
        raise SchemaError(f"{source}: latent vectors hold {values.null_count} null value(s)")
    x = to_np(values)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    x = x.reshape(len(col), dim)
    scale = (metadata or {}).get(b"vaepipe.int8_scale")
    if scale and pa.types.is_int8(values.type):
        x = x * np.asarray(json.loads(scale), np.float32)
    return x


def exact_sq(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Σ_j (x_j - q_j)² in float32, accumulated in dimension order: bit for bit what a plain C loop
    (DuckDB's array_distance before its square root) computes. x, q: (P, D) or broadcastable."""
    diff = np.subtract(x, q, dtype=np.float32)
    acc = diff[:, 0] * diff[:, 0]
    for j in range(1, diff.shape[1]):
        acc += diff[:, j] * diff[:, j]
    return acc


def error_bound(dim: int) -> float:
    """c such that |score - exact| ≤ c·(|x|² + |q|²) for every row: the matrix-product score and the
    sequential exact sum each err by at most ~(2D + 4)·u·(|x|² + |q|²) in float32 (Higham's γ_D for
    the dot products and norms, a few roundings for the additions); twice their sum, for margin."""
    return 2.0 * (4 * dim + 8) * U32


class TopK:
    """The k nearest found so far for each of m queries: squared distances and global row numbers,
    (m, k) each, sorted by (distance, row); +inf / -1 where fewer than k rows were seen."""

    def __init__(self, m: int, k: int):
        self.m, self.k = m, k
        self.d = np.full((m, k), np.inf, np.float32)
        self.rows = np.full((m, k), -1, np.int64)

    @property
    def tau(self) -> np.ndarray:
        """Each query's current k-th smallest squared distance (inf until k rows are in)."""
        return self.d[:, -1]

    def merge(self, qi: np.ndarray, rows: np.ndarray, d: np.ndarray) -> None:
        """Fold candidates (query index, global row, exact squared distance) into the state."""
        if len(qi) == 0:
            return
        m, k = self.m, self.k
        all_q = np.concatenate([np.repeat(np.arange(m), k), qi])
        all_d = np.concatenate([self.d.ravel(), d.astype(np.float32, copy=False)])
        all_r = np.concatenate([self.rows.ravel(), rows])
        order = np.lexsort((all_r, all_d, all_q))       # by query, then distance, then row
        q_sorted = all_q[order]
        rank = np.arange(len(order)) - np.searchsorted(q_sorted, q_sorted, side="left")
        keep = rank < k
        self.d[q_sorted[keep], rank[keep]] = all_d[order][keep]
        self.rows[q_sorted[keep], rank[keep]] = all_r[order][keep]


class BlockSearch:
    """Exact k-NN of m query vectors over a stream of latent blocks: `add(x, first_row, exclude)`
    for each block, then `result.d` / `result.rows` (squared distances, global rows)."""

    def __init__(self, queries: np.ndarray, k: int):
        self.q = np.ascontiguousarray(queries, np.float32)
        self.m, self.dim = self.q.shape
        self.k = k
        self.qq = exact_sq(self.q, np.zeros((1, self.dim), np.float32)) if self.m else np.zeros(0, np.float32)
        self.neg2q = -2.0 * self.q
        self.c = error_bound(self.dim)
        self.result = TopK(self.m, k)
        self.rescored = 0

    def add(self, x: np.ndarray, first_row: int, exclude: tuple[np.ndarray, np.ndarray] | None = None,
            row_ids: np.ndarray | None = None) -> None:
        """x: (n, D) float32 latents whose global rows are first_row..first_row+n (or `row_ids`);
        exclude: (query index, local row) pairs that must not be returned (a query's own record)."""
        n = len(x)
        if n == 0 or self.m == 0:
            return
        if x.shape[1] != self.dim:
            raise SchemaError(f"latents have {x.shape[1]} dimensions, the queries {self.dim}")
        step = max(256, SCORE_BUDGET // max(self.m, 1))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            ex = None
            if exclude is not None and len(exclude[0]):
                sel = (exclude[1] >= lo) & (exclude[1] < hi)
                ex = (exclude[0][sel], exclude[1][sel] - lo)
            rows = (row_ids[lo:hi] if row_ids is not None else None)
            self._chunk(x[lo:hi], first_row + lo, ex, rows)

    def _chunk(self, x: np.ndarray, first_row: int, ex, row_ids) -> None:
        n = len(x)
        xx = np.einsum("ij,ij->i", x, x)
        s = self.neg2q @ x.T                           # (m, n): -2 q·x
        s += xx                                        # + |x|²   (|q|² is added to the thresholds)
        if ex is not None and len(ex[0]):
            s[ex[0], ex[1]] = np.inf                   # never a candidate (inf ≤ inf below is masked)
        bound = self.c * (float(xx.max()) + self.qq)   # (m,) per query, over this chunk's rows
        tau = self.result.tau
        limit = tau + bound                            # a row beyond this can no longer enter
        if not np.isfinite(limit).all() or n <= self.k:
            # some query has fewer than k rows yet: its k-th best score in this chunk bounds it too
            kk = min(self.k, n) - 1
            kth = np.partition(s, kk, axis=1)[:, kk] + self.qq
            limit = np.minimum(limit, kth + 2 * bound) if n >= self.k else limit
            limit = np.where(np.isfinite(limit), limit, np.inf)
        cand = s <= (limit - self.qq)[:, None]
        if ex is not None and len(ex[0]):
            cand[ex[0], ex[1]] = False
        qi, li = np.nonzero(cand)
        if len(qi) == 0:
            return
        d = exact_sq(x[li], self.q[qi])
        self.rescored += len(qi)
        rows = row_ids[li] if row_ids is not None else first_row + li
        self.result.merge(qi, rows.astype(np.int64, copy=False), d)
