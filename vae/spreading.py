"""Label spreading over latent means (Zhou et al. 2004, "Learning with local and global consistency"),
and its label distributions carried to new records by their nearest neighbours.

A few labelled records and many unlabelled ones: build the k-nearest-neighbour graph of every
record's μ, normalise it symmetrically (S = D^-1/2 W D^-1/2), and iterate F ← α·S·F + (1 − α)·Y
(Y: one-hot rows of the labelled records, zero rows elsewhere) until F settles. Row r of F, normalised,
is record r's label distribution: the labels flow along the clusters of μ, so unlabelled records of a
class that has a labelled member in their cluster get its label. A new record (not in the graph)
takes the mean distribution of its k nearest graph records (kNN induction), as scikit-learn's
LabelSpreading.predict does."""
from __future__ import annotations

import torch

CHUNK = 4096


def knn_indices(queries: torch.Tensor, points: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    """Indices (Q, k) of each query's k nearest points (Euclidean), chunked: (Q, L), (P, L)."""
    out = []
    pp = (points * points).sum(1)
    for lo in range(0, len(queries), CHUNK):
        q = queries[lo:lo + CHUNK]
        d = pp[None, :] - 2 * q @ points.T                                   # (q, P): |p|² − 2 q·p
        if exclude_self:
            d[torch.arange(len(q)), torch.arange(lo, lo + len(q))] = float("inf")
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def spread(mu: torch.Tensor, y: torch.Tensor, n_classes: int, k: int = 10, alpha: float = 0.99,
           iters: int = 1000, tol: float = 1e-6) -> torch.Tensor:
    """Label distributions (R, C) of the records mu (R, L); y (R,) holds class indices, -1 where
    unlabelled."""
    r = len(mu)
    k = min(k, r - 1)
    nbr = knn_indices(mu, mu, k, exclude_self=True)                           # (R, k)
    rows = torch.arange(r).repeat_interleave(k)
    w = torch.sparse_coo_tensor(torch.stack([rows, nbr.reshape(-1)]), torch.ones(r * k), (r, r),
                                check_invariants=False).coalesce()
    w = (w + w.transpose(0, 1)).coalesce()                                    # symmetric: an edge either way
    w = torch.sparse_coo_tensor(w.indices(), torch.ones_like(w.values()), (r, r), check_invariants=False).coalesce()
    deg = torch.sparse.sum(w, 1).to_dense().clamp_min(1e-12)
    inv = deg.rsqrt()
    i, j = w.indices()
    s = torch.sparse_coo_tensor(w.indices(), inv[i] * inv[j], (r, r),
                                check_invariants=False).coalesce()   # D^-1/2 W D^-1/2
    seed = torch.zeros(r, n_classes)
    lab = y >= 0
    seed[lab, y[lab]] = 1.0
    f = seed.clone()
    for _ in range(iters):
        nxt = alpha * torch.sparse.mm(s, f) + (1 - alpha) * seed
        done = (nxt - f).abs().sum() < tol
        f = nxt
        if done:
            break
    total = f.sum(1, keepdim=True)
    return torch.where(total > 0, f / total.clamp_min(1e-30), torch.full_like(f, 1.0 / n_classes))


def induce(mu_ref: torch.Tensor, dist_ref: torch.Tensor, mu: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Label distributions (N, C) of new records mu (N, L): the mean of their k nearest reference
    records' distributions."""
    nbr = knn_indices(mu, mu_ref, min(k, len(mu_ref)))                       # (N, k)
    return dist_ref[nbr].mean(1)


def pseudo_label(mu: torch.Tensor, y: torch.Tensor, n_classes: int, fraction: float,
                 max_rows: int = 50_000, generator: torch.Generator | None = None) -> torch.Tensor:
    """y (R,) with pseudo-labels added: label spreading over mu (R, L) from the labelled records
    (y ≥ 0), then, of the unlabelled records spreading gives to each class, the `fraction` it is
    surest of (largest share of their distribution) take that class. The rest stay -1. Spreading
    costs O(R²·L), so above `max_rows` records it runs over every labelled record and a random
    subset of the unlabelled ones (drawn by `generator`), and only that subset can be pseudo-labelled."""
    out = y.clone()
    unl = torch.nonzero(y < 0).flatten()
    if fraction <= 0 or len(unl) == 0 or bool((y < 0).all()):
        return out
    lab = torch.nonzero(y >= 0).flatten()
    room = max(max_rows - len(lab), 0)
    if len(unl) > room:
        unl = unl[torch.randperm(len(unl), generator=generator)[:room]].sort().values
    rows = torch.cat([lab, unl])                                                  # (R',)
    dist = spread(mu[rows], y[rows], n_classes)                                   # (R', C)
    conf, cls = dist[len(lab):].max(1)                                            # (U,) each
    take = torch.zeros(len(unl), dtype=torch.bool)
    for c in range(n_classes):
        m = (cls == c) & (conf > 1.0 / n_classes)        # a record spreading reached (not uniform)
        n = int(round(fraction * int(m.sum())))
        if n:
            idx = torch.nonzero(m).flatten()
            take[idx[conf[idx].topk(n).indices]] = True
    out[unl[take]] = cls[take]
    return out
