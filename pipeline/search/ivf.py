"""An inverted-file index with flat (exact) lists over μ: k-means cells, each query scored exactly
against the records of its `nprobe` nearest cells. Distances of the returned neighbours are exact
squared Euclidean distances (pipeline.search.knn.exact_sq, the arithmetic of the exact scan); only
which records are looked at is approximate, and `recall_at_k` measures that against an exact scan.

Why IVF-flat: on 16-dim μ the vectors themselves are small (64 bytes), so storing them whole costs
little more than a PQ code plus the re-ranking data, and every distance it returns is exact. A cell's
vectors are contiguous on disk, so a query memory-maps the index and reads only its probed cells: a
short query process touches a few MB however large the table (docs/performance.md: against DuckDB's exact SQL and LanceDB's IVF-PQ, by `vaepipe bench index`).

Stored as a folder of plain .npy arrays (no pickle), memory-mapped when local. numpy only."""
from __future__ import annotations

import math
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from pipeline.search.knn import BlockSearch, exact_sq

CHUNK = 65_536        # rows assigned to cells per matrix product
DIRECT_MAX = 2_048    # above this many cells, rows are assigned through a coarse level first
SPREAD = 8            # coarse groups whose cells are searched when assigning a row
SAMPLE_PER_LIST = 32  # k-means trains on up to this many rows per cell
KMEANS_ITERS = 10
ARRAYS = ("centroids", "offsets", "rows", "vectors")
ID_ARRAYS = ("ids", "id_sorted", "id_pos")   # integer record ids: by position, and sorted with their positions


@dataclass
class IVFFlat:
    centroids: np.ndarray   # (C, L) float32 cell centres
    offsets: np.ndarray     # (C + 1,) int64: cell c holds positions offsets[c]:offsets[c + 1]
    rows: np.ndarray        # (N,) int64 row number in the table of each position
    vectors: np.ndarray     # (N, L) float32 μ in cell order
    ids: np.ndarray | None = None        # (N,) int64 record id of each position (integer id columns)
    id_sorted: np.ndarray | None = None  # (N,) the ids sorted …
    id_pos: np.ndarray | None = None     # (N,) … and the position of each

    def positions_of(self, wanted: np.ndarray) -> np.ndarray:
        """The position of each wanted id (its first record in id order), -1 where absent."""
        if self.id_sorted is None:
            raise ValueError("this index stores no record ids")
        wanted = np.asarray(wanted, np.int64)
        i = np.clip(np.searchsorted(self.id_sorted, wanted), 0, max(len(self.id_sorted) - 1, 0))
        hit = np.asarray(self.id_sorted[i]) == wanted if len(self.id_sorted) else np.zeros(len(wanted), bool)
        return np.where(hit, np.asarray(self.id_pos[i]), -1)

    @property
    def n_lists(self) -> int:
        return len(self.centroids)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, a).nbytes for a in ARRAYS)

    @classmethod
    def load(cls, fs, folder: str, mmap: bool = True) -> "IVFFlat":
        """The four arrays of a stored index; memory-mapped when the folder is on a local disk."""
        from pipeline.table.uris import is_local_fs

        arrays = {}
        for a in ARRAYS + ID_ARRAYS:
            path = posixpath.join(folder, f"{a}.npy")
            if a in ID_ARRAYS and not fs.exists(path):
                continue
            if mmap and is_local_fs(fs):
                arrays[a] = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                with fs.open(path, "rb") as f:
                    arrays[a] = np.load(f, allow_pickle=False)
        return cls(**arrays)


# --- building -------------------------------------------------------------------------------------

def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for each row of x: (N, L), (C, L) -> (N,) int32."""
    cc = (c * c).sum(1)
    out = np.empty(len(x), np.int32)
    for i in range(0, len(x), CHUNK):
        xb = x[i:i + CHUNK]
        out[i:i + CHUNK] = np.argmin(cc[None, :] - 2 * xb @ c.T, axis=1)
    return out


def kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means on x, k centres started at distinct rows; an empty cell keeps its centre.
    Rows are assigned as `assign` does (two levels above DIRECT_MAX centres)."""
    c = x[rng.choice(len(x), k, replace=False)].astype(np.float32)
    for _ in range(iters):
        a = assign(x, c, int(rng.integers(1 << 31)))
        sums = np.stack([np.bincount(a, weights=x[:, j], minlength=k) for j in range(x.shape[1])], 1)
        counts = np.bincount(a, minlength=k)
        full = counts > 0
        c[full] = (sums[full] / counts[full, None]).astype(np.float32)
    return c


def train(x: np.ndarray, n_lists: int = 0, iters: int = KMEANS_ITERS, seed: int = 0,
          sample_per_list: int = SAMPLE_PER_LIST) -> np.ndarray:
    """Cell centres: k-means on a seeded sample of up to sample_per_list × n_lists rows of x.
    n_lists 0: about 4·√N."""
    n = len(x)
    if n == 0:
        raise ValueError("cannot index an empty table")
    n_lists = min(n, n_lists or max(1, round(4 * math.sqrt(n))))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, min(n, sample_per_list * n_lists), replace=False))
    return kmeans(np.ascontiguousarray(x[pick], np.float32), n_lists, iters, rng)


def assign(x: np.ndarray, c: np.ndarray, seed: int = 0) -> np.ndarray:
    """The cell of every row of x (N,) int32. Up to DIRECT_MAX cells, the nearest centre. Above, two
    levels: the centres are grouped by k-means into √C groups; a row is compared with the centres of
    the SPREAD groups nearest its own group's centre only (C/√C·SPREAD products instead of C), which
    gives the nearest centre for nearly every row and a near one otherwise (recall is measured on the
    result, not assumed)."""
    if len(c) <= DIRECT_MAX:
        return _nearest(x, c)
    g = max(2, round(math.sqrt(len(c))))
    coarse = kmeans(c, g, 10, np.random.default_rng(seed))
    member = _nearest(c, coarse)                                   # (C,) group of each centre
    near = np.argsort(((coarse[:, None, :] - coarse[None, :, :]) ** 2).sum(-1), axis=1)[:, :SPREAD]
    cand = [np.flatnonzero(np.isin(member, near[j])) for j in range(g)]
    out = np.empty(len(x), np.int32)
    step = CHUNK * 16
    for i in range(0, len(x), step):   # by slices, so only one slice's row copies live at a time
        xb = np.ascontiguousarray(x[i:i + step], np.float32)
        grp = _nearest(xb, coarse)
        order = np.argsort(grp, kind="stable")
        bounds = np.searchsorted(grp[order], np.arange(g + 1))
        for j in range(g):
            sel = order[bounds[j]:bounds[j + 1]]
            if len(sel):
                out[i + sel] = cand[j][_nearest(xb[sel], c[cand[j]])]
    return out


def layout(a: np.ndarray, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (C + 1,), order (N,)): rows grouped by cell, in table order inside each cell."""
    order = np.argsort(a, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(a, minlength=n_lists))]).astype(np.int64)
    return offsets, order


def build(x: np.ndarray, n_lists: int = 0, iters: int = KMEANS_ITERS, seed: int = 0,
          sample_per_list: int = SAMPLE_PER_LIST) -> IVFFlat:
    """An index of x (N, L) in memory (train, assign, layout)."""
    x = np.ascontiguousarray(x, np.float32)
    c = train(x, n_lists, iters, seed, sample_per_list)
    offsets, order = layout(assign(x, c, seed), len(c))
    return IVFFlat(c, offsets, order.astype(np.int64), x[order])


BUCKET_BYTES = 128 << 20   # rows spilled per cell range while a table is streamed into cell order


def _header(f, dtype, shape) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})


def write_blocks(fs, folder: str, blocks: Iterable[tuple[int, np.ndarray, np.ndarray | None]], c: np.ndarray,
                 a: np.ndarray, dim: int, on_block: Callable[[int, np.ndarray], None] | None = None,
                 with_ids: bool = False) -> int:
    """Store the index of a table streamed as (first row, vectors, integer ids or None) blocks in row
    order (with_ids: the ids are kept, by position and as a sorted lookup), with centres c
    and the cell a[row] of every row, in memory that does not grow with the table: each block's
    rows are spilled to local files by cell range (about BUCKET_BYTES each), then each range is read
    back, put in cell order (table order inside a cell) and appended to rows.npy / vectors.npy.
    `on_block` sees every block (the recall's exact search rides the same pass). Returns the bytes written."""
    n, n_lists = len(a), len(c)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(a, minlength=n_lists))]).astype(np.int64)
    rec = np.dtype([("cell", "<i4"), ("row", "<i8"), ("v", "<f4", (dim,))] + ([("id", "<i8")] if with_ids else []))
    nb = int(max(1, min(4096, math.ceil(n * rec.itemsize / BUCKET_BYTES))))
    # bucket b holds the cells whose first position falls in [b·n/nb, (b+1)·n/nb): whole cells, ~equal rows
    bucket_of_cell = np.minimum(nb - 1, (offsets[:-1] * nb) // max(n, 1)).astype(np.int32)
    tmp = tempfile.mkdtemp(prefix="vaepipe-ivf-")
    try:
        spill = [open(os.path.join(tmp, f"{b}.bin"), "wb") for b in range(nb)]
        try:
            for start, xb, ids in blocks:
                if on_block is not None:
                    on_block(start, xb)
                cells = a[start:start + len(xb)]
                r = np.empty(len(xb), rec)
                r["cell"], r["row"], r["v"] = cells, np.arange(start, start + len(xb)), xb
                if with_ids:
                    r["id"] = ids
                bk = bucket_of_cell[cells]
                order = np.argsort(bk, kind="stable")
                bounds = np.searchsorted(bk[order], np.arange(nb + 1))
                for b in np.flatnonzero(np.diff(bounds)):
                    spill[b].write(r[order[bounds[b]:bounds[b + 1]]].tobytes())
        finally:
            for f in spill:
                f.close()
        fs.makedirs(folder, exist_ok=True)
        total = 0
        for name, arr in (("centroids", c), ("offsets", offsets)):
            with fs.open(posixpath.join(folder, f"{name}.npy"), "wb") as f:
                np.save(f, arr)
            total += arr.nbytes
        ids_path = os.path.join(tmp, "ids.npy")
        with fs.open(posixpath.join(folder, "rows.npy"), "wb") as fr, \
                fs.open(posixpath.join(folder, "vectors.npy"), "wb") as fv, \
                open(ids_path if with_ids else os.devnull, "wb") as fi:
            _header(fr, np.int64, (n,))
            _header(fv, np.float32, (n, dim))
            if with_ids:
                _header(fi, np.int64, (n,))
            for b in range(nb):
                path = os.path.join(tmp, f"{b}.bin")
                r = np.fromfile(path, rec)
                os.remove(path)
                o = np.argsort(r["cell"], kind="stable")
                fr.write(np.ascontiguousarray(r["row"][o]).tobytes())
                fv.write(np.ascontiguousarray(r["v"][o]).tobytes())
                if with_ids:
                    fi.write(np.ascontiguousarray(r["id"][o]).tobytes())
                total += r.nbytes - 4 * len(r)
        if with_ids:
            total += _write_id_lookup(fs, folder, ids_path)
        return total
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_id_lookup(fs, folder: str, ids_path: str) -> int:
    """ids.npy (by position) into the index, and the sorted lookup (id_sorted, id_pos) beside it."""
    ids = np.load(ids_path, mmap_mode="r")
    order = np.argsort(ids, kind="stable")
    for name, arr in (("ids", ids), ("id_sorted", ids[order]), ("id_pos", order.astype(np.int64))):
        with fs.open(posixpath.join(folder, f"{name}.npy"), "wb") as f:
            np.save(f, np.asarray(arr))
    return 3 * 8 * len(ids)


# --- searching ------------------------------------------------------------------------------------

def probe(index: IVFFlat, q: np.ndarray, nprobe: int) -> np.ndarray:
    """The `nprobe` nearest cells of each query (Q, nprobe)."""
    c = np.asarray(index.centroids)
    cd = (c * c).sum(1)[None, :] - 2 * q @ c.T       # (Q, C)
    nprobe = min(nprobe, len(c))
    if nprobe >= len(c):
        return np.argsort(cd, axis=1)
    part = np.argpartition(cd, nprobe - 1, axis=1)[:, :nprobe]
    return np.take_along_axis(part, np.argsort(np.take_along_axis(cd, part, 1), axis=1), 1)


def search(index: IVFFlat, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared distances (Q, k), table rows (Q, k)) of each query's k nearest among the records of
    its `nprobe` nearest cells, ascending (ties by table row); inf and -1 where fewer than k records
    were looked at."""
    d, pos = search_positions(index, queries, k, nprobe)
    return d, np.where(pos >= 0, np.asarray(index.rows)[np.maximum(pos, 0)] if pos.size else pos, -1)


def search_positions(index: IVFFlat, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """As `search`, with the index's positions (Q, k) in place of table rows (index.ids[pos] are the
    records' ids)."""
    q = np.ascontiguousarray(queries, np.float32).reshape(-1, index.centroids.shape[1])
    d_out = np.full((len(q), k), np.inf, np.float32)
    r_out = np.full((len(q), k), -1, np.int64)
    offsets = index.offsets
    for i, cells in enumerate(probe(index, q, nprobe)):
        spans = [(int(offsets[c]), int(offsets[c + 1])) for c in cells]
        spans = [s for s in spans if s[1] > s[0]]
        if not spans:
            continue
        vec = np.concatenate([index.vectors[a:b] for a, b in spans])
        pos = np.concatenate([np.arange(a, b) for a, b in spans])
        d = exact_sq(vec, q[i])
        top = np.argpartition(d, k - 1)[:k] if len(d) > k else np.arange(len(d))
        rows = np.asarray(index.rows[pos[top]])
        order = np.lexsort((rows, d[top]))
        d_out[i, :len(top)], r_out[i, :len(top)] = d[top][order], pos[top][order]
    return d_out, r_out


def exact_neighbours(x: np.ndarray, queries: np.ndarray, k: int, block: int = 1 << 20) -> np.ndarray:
    """Table rows of each query's exact k nearest in x (Q, k), through the exact scan's search."""
    s = BlockSearch(np.ascontiguousarray(queries, np.float32), k)
    for lo in range(0, len(x), block):
        s.add(np.ascontiguousarray(x[lo:lo + block], np.float32), lo)
    return s.result.rows


def _drop(rows: np.ndarray, own: np.ndarray | None, k: int) -> list[set]:
    """The first k rows of each query's list, leaving out the query's own row when given."""
    if own is None:
        return [set(r[:k].tolist()) - {-1} for r in rows]
    return [set([v for v in r.tolist() if v != o][:k]) - {-1} for r, o in zip(rows, own.tolist())]


def recall_at_k(index: IVFFlat, x: np.ndarray, queries: np.ndarray, k: int, nprobe: int,
                truth: np.ndarray | None = None, own: np.ndarray | None = None) -> float:
    """Share of the exact k nearest rows of x that `search` returns, over the queries. With `own`
    (the row of x each query is), that row counts for neither list: a query that is a record of the
    table would otherwise find itself, a hit that says nothing of the index."""
    extra = 0 if own is None else 1
    truth = exact_neighbours(x, queries, k + extra) if truth is None else truth
    _, got = search(index, queries, k + extra, nprobe)
    hit = sum(len(t & g) for t, g in zip(_drop(truth, own, k), _drop(got, own, k)))
    return hit / (len(queries) * k)


def tune_nprobe(index: IVFFlat, queries: np.ndarray, own: np.ndarray, truth: np.ndarray, k: int,
                target: float) -> tuple[int, float, dict]:
    """The smallest nprobe (1, 2, 4, …) whose recall@k reaches `target`, for queries that are the
    table's rows `own`, against `truth` (their exact k + 1 nearest rows, from exact_neighbours or
    BlockSearch): (nprobe, its recall, {nprobe: recall} of every one tried)."""
    tried = {}
    nprobe = 1
    while True:
        tried[nprobe] = recall_at_k(index, None, queries, k, nprobe, truth, own)
        if tried[nprobe] >= target or nprobe >= index.n_lists:
            return nprobe, tried[nprobe], tried
        nprobe = min(2 * nprobe, index.n_lists)
