"""Anomaly scores per record (higher = more unusual), as batch jobs compute them.

A VAE alone gives two:
- neg_elbo:  -ELBO in nats (VAE.score), one z per record from per-record noise;
- sq_err:    Σ (x − E[x | z = μ])² in model space, the VAE's analogue of PCA reconstruction error.
With a latent reference (μ of records the model was fit on, stored in its checkpoint) two more:
- knn_z:         mean Euclidean distance from μ to its k nearest reference μ;
- sq_err+knn_z:  both standardised by their mean and sd over the reference records, then summed
                 (reconstruction and latent distance fail on different records, and their units differ).
The reference's own statistics leave each record out of its k-NN (its nearest neighbour is itself),
so a record's score is a function of it and the model alone. These are `vaepipe protocol`'s
candidates of the same names (pipeline.measure.protocols.CandidateScorer; docs/quality.md): knn_z won on the
breast-cancer table, sq_err+knn_z on one-class MNIST."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vae.model import VAE

SCORES = ("neg_elbo", "sq_err", "knn_z", "sq_err+knn_z")
NEEDS_REFERENCE = ("knn_z", "sq_err+knn_z")


def squared_error(model: VAE, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Σ (x − E[x | z = μ])² per record: x (B, D) in model space, μ (B, L) -> (B,)."""
    return ((model.mean_of(model.decode(mu)) - x) ** 2).sum(-1)


@dataclass
class LatentReference:
    mu: torch.Tensor                                     # (R, L) μ of the reference records
    k: int = 5                                           # neighbours averaged by knn_z
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)   # score -> (mean, sd) over the reference

    @classmethod
    @torch.no_grad()
    def fit(cls, model: VAE, raw: torch.Tensor, k: int = 5, batch: int = 1024) -> "LatentReference":
        """The reference of raw records (R, D), R > k: their μ, and the mean and sd of sq_err and of
        their leave-one-out knn_z (an sd of 0 counts as 1: a constant score stays finite)."""
        if len(raw) <= k:
            raise ValueError(f"a latent reference needs more than k = {k} records, got {len(raw)}")
        mus, sq = [], []
        for i in range(0, len(raw), batch):
            x = model.preprocess(raw[i:i + batch])
            mu = model.encode(x).mean                                            # (b, L)
            mus.append(mu)
            sq.append(squared_error(model, x, mu))
        ref = cls(torch.cat(mus).float().cpu(), k)
        parts = {"sq_err": torch.cat(sq).double(), "knn_z": ref.knn(ref.mu, leave_one_out=True).double()}
        ref.stats = {n: (float(v.mean()), float(v.std(correction=0)) or 1.0) for n, v in parts.items()}
        return ref

    def knn(self, mu: torch.Tensor, leave_one_out: bool = False, chunk: int = 1024) -> torch.Tensor:
        """Mean distance from each μ (N, L) to its k nearest reference μ (the nearest skipped with
        `leave_one_out`, for the reference's own records) -> (N,)."""
        ref, skip, out = self.mu.to(mu.device, mu.dtype), int(leave_one_out), []
        for i in range(0, len(mu), chunk):
            q = mu[i:i + chunk]                                                  # (c, L)
            # cdist by matrix products (|a|² + |b|² − 2a·b) picks the candidates fast, but loses small
            # distances to cancellation: a record's distance to itself came out near 1e-2, not 0, and
            # varied with the chunk's size. The k (+ 1) candidates' distances are taken again exactly.
            near = torch.cdist(q, ref).topk(self.k + skip, dim=1, largest=False).indices   # (c, k + skip)
            d = (q[:, None, :] - ref[near]).norm(dim=-1).sort(dim=1).values      # (c, k + skip)
            out.append(d[:, skip:].mean(1))
        return torch.cat(out) if out else mu.new_zeros(0)

    def to_state(self) -> dict[str, Any]:
        """Tensors and plain data only: what the weights-only checkpoint loader accepts."""
        return {"mu": self.mu.detach().cpu(), "k": int(self.k), "stats": {n: list(v) for n, v in self.stats.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "LatentReference":
        return cls(state["mu"].float(), int(state["k"]), {n: (float(m), float(s)) for n, (m, s) in state["stats"].items()})


@torch.no_grad()
def anomaly_score(model: VAE, raw: torch.Tensor, kind: str, reference: LatentReference | None = None,
                  eps: torch.Tensor | None = None, mu: torch.Tensor | None = None) -> torch.Tensor:
    """The `kind` score (one of SCORES) of raw records (B, D) -> (B,); `eps` (1, B, L) is neg_elbo's
    noise; `mu` (B, L), this model's μ of `raw` when the caller already has it (encode does). The
    reference is required by knn_z and sq_err+knn_z."""
    if kind not in SCORES:
        raise ValueError(f"unknown anomaly score {kind!r}; expected one of {SCORES}")
    if kind == "neg_elbo":
        return model.score(raw, eps=eps)
    if kind in NEEDS_REFERENCE and reference is None:
        raise ValueError(f"the {kind} score needs the model's latent reference (μ of the records it was fit on)")
    x = model.preprocess(raw)
    mu = model.encode(x).mean if mu is None else mu                              # (B, L)
    parts = {}
    if "sq_err" in kind:
        parts["sq_err"] = squared_error(model, x, mu)
    if "knn_z" in kind:
        parts["knn_z"] = reference.knn(mu)
    if len(parts) == 1:
        return parts[kind]
    return sum((v - reference.stats[n][0]) / reference.stats[n][1] for n, v in parts.items())
