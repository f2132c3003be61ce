"""Probes of a trained VAE that evaluation and the protocols share: the posterior q(z|x) of records,
and the error of an M2 head (Kingma et al. 2014's M1+M2) fit on it with few labels."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.evaluation.eval_metrics import balanced_indices
from vae.config import SemiConfig
from vae.model import VAE
from vae.semi import M2, fit_m2
from vae.spreading import pseudo_label

@torch.no_grad()
def posterior(model: VAE, raw: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    mus, lvs = [], []
    for i in range(0, len(raw), batch):
        q = model.embed(torch.from_numpy(np.ascontiguousarray(raw[i:i + batch])))
        mus.append(q.mean.numpy()), lvs.append(q.logvar.numpy())
    return np.concatenate(mus), np.concatenate(lvs)


def m2_error(mu_tr: np.ndarray, lv_tr: np.ndarray, ytr: np.ndarray, mu_te: np.ndarray, yte: np.ndarray,
             n_labels: int, seed: int, epochs: int, pseudo_labels: float = 0.0) -> float:
    """Error of an M2 head (vae.semi, the default SemiConfig) fit for `epochs` on the frozen
    q(z1|x) = N(mu_tr, exp(lv_tr)) of every training record, `n_labels` of them labelled (a balanced
    draw, eval_metrics.balanced_indices), the rest unlabelled, and with `pseudo_labels` > 0 that
    fraction of them pseudo-labelled by label spreading over mu_tr first, as `train --labels` does
    (vae.spreading.pseudo_label); argmax q(y|μ) on the test records."""
    classes = tuple(np.unique(ytr).tolist())
    cls_index = {c: i for i, c in enumerate(classes)}
    idx = balanced_indices(ytr, n_labels, seed)
    y = torch.full((len(ytr),), -1, dtype=torch.long)
    y[idx] = torch.tensor([cls_index[c] for c in ytr[idx].tolist()])
    if pseudo_labels > 0:
        y = pseudo_label(torch.from_numpy(np.ascontiguousarray(mu_tr, np.float32)), y, len(classes), pseudo_labels,
                         generator=torch.Generator().manual_seed(seed * 1_000_003))
    torch.manual_seed(seed)
    m2 = M2(mu_tr.shape[1], SemiConfig(classes=classes))
    fit_m2(m2, torch.from_numpy(mu_tr), torch.from_numpy(lv_tr), y, epochs, seed=seed)
    with torch.no_grad():
        pred = np.asarray(classes)[m2.logits(torch.from_numpy(mu_te)).argmax(-1).numpy()]
    return float((pred != yte).mean())
