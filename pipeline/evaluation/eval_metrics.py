"""The maths of `vaepipe evaluate`, each pinned by a test with a known answer: KL, PSNR, PCA
(scikit-learn's), balanced label draws, logistic and label-spreading probes, ROC AUC."""
from __future__ import annotations

import math
import warnings

import numpy as np


def gaussian_kl(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(N(μ, diag σ²) || N(0, I)) per record, nats."""
    return 0.5 * (mu ** 2 + np.exp(logvar) - 1.0 - logvar).sum(-1)


def psnr(mse: float, peak: float = 1.0) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(peak * peak / mse)


def fit_pca(x: np.ndarray, k: int):
    """scikit-learn's PCA with k components (full SVD: deterministic), fit in float64."""
    from sklearn.decomposition import PCA

    return PCA(n_components=k, svd_solver="full").fit(np.asarray(x, np.float64))


def pca_codes(pca, x: np.ndarray, k: int | None = None) -> np.ndarray:
    """Scores on the first k components of a fit (one fit serves every k of a rate–distortion
    curve: the leading components do not depend on how many are kept), float32."""
    comps = pca.components_[:k]
    return ((np.asarray(x, np.float64) - pca.mean_) @ comps.T).astype(np.float32)


def pca_reconstruct(pca, z: np.ndarray) -> np.ndarray:
    """Records back from scores on the first z.shape[1] components."""
    return np.asarray(z, np.float64) @ pca.components_[: z.shape[1]] + pca.mean_


def balanced_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices with (as near as possible) n / classes per class, drawn with a seeded RNG."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per, extra = divmod(n, len(classes))
    out = []
    for i, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        take = min(len(idx), per + (1 if i < extra else 0))
        out.append(rng.choice(idx, take, replace=False))
    return np.sort(np.concatenate(out))


def probe_error(train_x, train_y, test_x, test_y, n_labels: int, seed: int) -> float:
    """Error rate of a standardised logistic-regression probe trained on n_labels balanced labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    idx = balanced_indices(train_y, n_labels, seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(train_x[idx], train_y[idx])
    return float(1.0 - (clf.predict(test_x) == test_y).mean())


def spreading_error(train_x, train_y, test_x, test_y, n_labels: int, seed: int, neighbours: int = 10) -> float:
    """Error rate of a transductive (semi-supervised) probe: label spreading (Zhou et al. 2004,
    α = 0.99) over the k-nearest-neighbour graph of *all* training records, n_labels balanced labels,
    the other training records unlabelled; each test record takes the label the graph gives it. This
    is what the semi-supervised literature measures (M1+TSVM in Kingma et al. 2014 is transductive
    too): the unlabelled records shape the decision, which a logistic probe on the labelled ones
    alone cannot do. The graph is built on the features as they are (μ in the prior's units, PCA
    scores, pixels in [0, 1]): per-feature standardising would blow up near-constant pixels."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.semi_supervised import LabelSpreading

    idx = balanced_indices(train_y, n_labels, seed)
    partial = np.full(len(train_y), -1, dtype=np.int64)
    partial[idx] = np.asarray(train_y)[idx]
    ls = LabelSpreading(kernel="knn", n_neighbors=neighbours, alpha=0.99, max_iter=1000)
    with warnings.catch_warnings():   # α near 1 converges slowly; 1,000 sweeps settle the labels
        warnings.simplefilter("ignore", ConvergenceWarning)
        ls.fit(np.asarray(train_x, np.float64), partial)
    return float(1.0 - (ls.predict(np.asarray(test_x, np.float64)) == test_y).mean())


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(positive).astype(int), scores))
