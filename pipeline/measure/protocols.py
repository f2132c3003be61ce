"""Standard protocols with published baselines, each one command that trains, scores and prints every
figure of the same run:

* `semi-mnist`: few-label classification on the seeded 6,000 / 2,000 split of mnist_8k
  (pipeline.evaluation.datasets.write_mnist_split's split). M1 (the default conv VAE recipe) is trained on the
  6,000 training images, unlabelled; then, per label count (100 / 600 / 1,000) and per seeded
  balanced label draw, an M2 head (vae.semi) is fit on the frozen M1's q(z1|x): Kingma et al. 2014's
  two-stage M1+M2. Error on the 2,000 held-out images, beside label spreading on the same μ.
* `one-class-mnist`: Ruff et al. 2018's protocol: for each digit d a VAE is trained on the training
  images of d only and scores all 2,000 held-out images; ROC AUC with the other nine digits as the
  anomalies. vaepipe's candidate scores (below) against IsolationForest and One-Class SVM on
  pixels, PCA reconstruction error and k-NN distance on μ.
* `breast-cancer`: scikit-learn's breast-cancer table, malignant rows subsampled to 5 % of the rows
  (the anomalies), a seeded half of the rows to fit on (anomalies included, no model sees a label,
  as a batch job sees them), the other half scored; an MLP VAE over the 30 columns against the same
  baselines; mean ± sd over seeded draws.

Every setting is fixed in the config below; nothing is chosen on the held-out records. The anomaly
protocols' vaepipe figure is the candidate score (CANDIDATES: likelihood bounds, reconstruction
errors, latent densities and their standardised sums) chosen on the training split only: in
one-class MNIST a seeded 20 % of digit d's training images kept out of fitting (validation normals)
against a seeded sample of the other digits' training images (validation anomalies); in breast
cancer a two-fold cross-fit inside the fit half, whose labels are read for that choice only (nothing
of the scored half enters the choice). Every candidate's held-out figure is printed
beside the chosen one. The choice is one candidate for the whole run (the best mean training-split
AUC), not one per digit or draw: a validation set of ~120 normal images per digit is too small to
choose between close candidates digit by digit."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.runtime.config import RuntimeConfig, opt
from pipeline.runtime.errors import ConfigError
from pipeline.evaluation.eval_metrics import roc_auc, spreading_error
from pipeline.evaluation.probes import m2_error, posterior
from vae.config import SemiConfig, VAEConfig
from vae.distributions import record_keys, record_normal
from vae.model import VAE
from vae.preprocess import Preprocessing
from vae.semi import SemiVAE
from vae.train_step import cosine_lr, train_epoch

PROTOCOLS = ("semi-mnist", "one-class-mnist", "breast-cancer", "breast-cancer-jobs", "any-data", "any-data-one-class")
SCORES = ("iwae", "neg_elbo", "recon")            # the likelihood-type scores
MODEL_SCORES = (*SCORES, "sq_err")                  # functions of the record and the VAE alone
LATENT_SCORES = ("knn_z", "mahal_z")                # densities of μ against the fitting records' μ
COMBINED = ("recon+knn_z", "sq_err+knn_z", "iwae+knn_z", "sq_err+mahal_z")
CANDIDATES = (*MODEL_SCORES, *LATENT_SCORES, *COMBINED)   # vaepipe's own scores, chosen among
BASELINES = ("isolation_forest", "ocsvm", "pca_recon", "knn_mu")


@dataclass
class ProtocolConfig(RuntimeConfig):
    what: str = opt("one-class-mnist", "the protocol: semi-mnist, one-class-mnist, breast-cancer, breast-cancer-jobs "
                                       "(the chosen breast-cancer score through `train` and `encode --score-kind`), any-data "
                                       "(the default recipe on the panel of real data sets: pipeline.measure.panel), any-data-one-class "
                                       "(the default recipe trained on one class, `encode --score`'s AUC: "
                                       "pipeline.measure.panel_one_class)",
                    choices=PROTOCOLS)
    epochs: int = opt(0, "VAE training epochs (0: the protocol's own: 20 semi-mnist, 100 one-class-mnist, any-data auto, "
                         "breast-cancer chosen among --epoch-grid)")
    head_epochs: int = opt(50, "semi-mnist: epochs of the M2 head per label draw")
    labels: list[int] = opt(help="semi-mnist: label counts", factory=lambda: [100, 600, 1000])
    draws: int = opt(5, "semi-mnist, breast-cancer: seeded draws (labels / anomaly subsample) averaged over")
    label_draws: int = opt(0, "any-data: balanced label draws the few-label comparison averages over (0: each "
                              "set's own: 10, MNIST 1)")
    digits: list[int] = opt(help="one-class-mnist, any-data-one-class: the normal digits (classes) to run (default all ten)",
                            factory=lambda: list(range(10)))
    arch: str = opt("conv", "image model: conv (what `vaepipe train` picks for images: channels 32, 64) or mlp "
                            "(512, 256, Kingma et al.'s M1 shape)", choices=("conv", "mlp"))
    val_fraction: float = opt(0.0, "one-class-mnist, breast-cancer: hold out this seeded fraction of the fitting "
                                    "records (no labels used) and keep the epoch with the best validation -ELBO "
                                    "(early stopping without anomalies); 0 = train all epochs on all of them")
    select_fraction: float = opt(0.2, "one-class-mnist: seeded fraction of digit d's training images kept out of "
                                      "fitting, the validation normals the score is chosen on")
    select_anomalies: int = opt(1000, "one-class-mnist: seeded sample of the other digits' training images, the "
                                      "validation anomalies the score is chosen on")
    epoch_grid: list[int] = opt(help="breast-cancer: training epochs chosen among by the cross-fit inside the fit "
                                     "half (--epochs N replaces the grid by [N])", factory=lambda: [30, 100, 300])
    iw_samples: int = opt(16, "importance samples K of the iwae score")
    ensemble: int = opt(1, "breast-cancer: VAEs fit per model (seeds differ; the first is the one-model run's), "
                           "each candidate score averaged over them")
    tabular_build: str = opt("nets", "breast-cancer: the members as `train --no-linear-path` builds them (nets: "
                                     "the nets alone from a seeded start) or as `train` does by default (ppca: "
                                     "the linear path started at pPCA, its nets checked on the --val-fraction "
                                     "records when there are some)", choices=("nets", "ppca"))
    knn_space: str = opt("mu", "breast-cancer: the space knn_z and mahal_z measure in: mu (what `encode --score` "
                               "uses) or embedding (μ in the model's latent metric, `encode --embedding`)",
                         choices=("mu", "embedding"))
    sets: list[str] = opt(help="any-data: the panel's data sets (default all: mnist, digits-0-16, digits-0-255, "
                               "breast-cancer, patches16-china, patches16-flower, patches32-china, patches32-flower; "
                               "patchesN-PHOTO trains on PHOTO's patches and tests on the other photo's); "
                               "any-data-one-class: its labelled sets (default mnist, digits-0-16)",
                          factory=list)
    betas: list[float] = opt(help="any-data: β values to train each set with (default 1, the recipe's; several "
                                  "give the rate-distortion frontier)", factory=lambda: [1.0])
    seed: int = opt(0, "seed of the split, the models and the draws")
    threads: int = opt(0, "torch threads (0: torch's default)")
    json: str | None = opt(None, "write every figure here as JSON")

    def __post_init__(self) -> None:
        self.choice("what", PROTOCOLS)
        self.choice("arch", ("conv", "mlp"))
        self.choice("tabular_build", ("nets", "ppca"))
        self.choice("knn_space", ("mu", "embedding"))
        if self.label_draws < 0:
            raise ConfigError(f"label_draws must be ≥ 0, got {self.label_draws}")
        if self.epochs < 0 or self.head_epochs < 1 or self.draws < 1 or self.iw_samples < 1 or self.ensemble < 1:
            raise ConfigError("epochs must be ≥ 0; head_epochs, draws, iw_samples and ensemble ≥ 1")
        if not 0 < self.select_fraction < 1 or self.select_anomalies < 2:
            raise ConfigError(f"select_fraction must be in (0, 1) and select_anomalies ≥ 2, got "
                              f"{self.select_fraction}, {self.select_anomalies}")
        if not self.epoch_grid or any(e < 1 for e in self.epoch_grid):
            raise ConfigError(f"epoch_grid must be a non-empty list of epochs ≥ 1, got {self.epoch_grid}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.betas or any(b < 0 for b in self.betas):
            raise ConfigError(f"betas must be a non-empty list of β ≥ 0, got {self.betas}")
        if any(d not in range(10) for d in self.digits):
            raise ConfigError(f"digits must be 0–9, got {self.digits}")
        if any(n < 2 for n in self.labels):
            raise ConfigError(f"labels must be label counts ≥ 2, got {self.labels}")


# --- shared pieces --------------------------------------------------------------------------------

def mnist_split(seed: int = 0, n_train: int = 6000):
    """The split pipeline.evaluation.datasets.write_mnist_split writes: (x_train, y_train, x_test, y_test), raw uint8."""
    from pipeline.evaluation.datasets import mnist

    x, y = mnist()
    p = np.random.default_rng(seed).permutation(len(x))
    x = x.reshape(len(x), -1)
    return x[p[:n_train]], y[p[:n_train]], x[p[n_train:]], y[p[n_train:]]


def image_config(arch: str = "conv", semi: SemiConfig | None = None) -> VAEConfig:
    """What `vaepipe train` builds for 28×28 uint8 images (`--arch conv`, its default, or `--arch mlp`):
    16 latents, Bernoulli, channels (32, 64) / widths (512, 256)."""
    pre = Preprocessing(features=["image"], layout="list", scaling="uint8", offset=[0.0] * 784,
                        scale=[1 / 255] * 784, dtypes=["uint8"])
    shape, hidden = ((1, 28, 28), (32, 64)) if arch == "conv" else ((784,), (512, 256))
    return VAEConfig(input_shape=shape, arch=arch, latent_dim=16, hidden=hidden, likelihood="bernoulli",
                     preprocessing=pre, semi=semi)


def fit_vae(model: VAE, raw: np.ndarray, epochs: int, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
            val_fraction: float = 0.0, beta: float = 1.0, weight_decay: float = 0.01, start=None,
            nets: dict | None = None) -> VAE:
    """The default recipe's loop (AdamW, cosine decay, a seeded permutation per epoch), unsupervised.
    With val_fraction > 0 a seeded part of `raw` is held out and the epoch with the best validation
    -ELBO (vae.train_step.evaluate, per-record noise) is kept, as `train --patience` keeps its best.
    `weight_decay` 0.01 (AdamW's own default) is what the protocols measured with; the any-data panel
    passes `vaepipe train`'s. `start`: the pPCA (vae.linear.PPCA) the model was started at; with
    validation records the kept epoch's nets are then checked as `vaepipe train` checks them
    (vae.recipe.keep_nets) and dropped for that start when they do not earn their place; `nets` (a dict)
    receives the figures of that check (vae.recipe.settle_nets)."""
    import copy

    from vae.recipe import settle_nets
    from vae.train_step import evaluate, round_trip

    x = torch.from_numpy(np.ascontiguousarray(raw))
    val = None
    if val_fraction > 0:
        p = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 77))
        n_val = max(1, int(len(x) * val_fraction))
        x, val = x[p[n_val:]], x[p[:n_val]]
    best, best_state = float("inf"), None
    opt_ = torch.optim.AdamW(model.param_groups(), lr=lr, weight_decay=weight_decay)
    for epoch in range(epochs):
        for g in opt_.param_groups:
            g["lr"] = cosine_lr(lr, epoch, epochs) * g["lr_scale"]
        torch.manual_seed(seed * 100_003 + epoch * 1009)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919))
        train_epoch(model, (x[perm[i:i + batch_size]] for i in range(0, len(x), batch_size)), opt_, beta=beta)
        if val is not None:
            score = evaluate(model, [val], seed=seed)[0].means()["neg_elbo"]
            if score < best:
                best, best_state = score, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    if val is not None and start is not None:
        figures = settle_nets(model, round_trip(model, [val]), start)
        if nets is not None:
            nets.update(figures)
    return model.eval()


@torch.no_grad()
def vae_scores(model: VAE, raw: np.ndarray, k: int, seed: int, batch: int = 500) -> dict[str, np.ndarray]:
    """Per-record anomaly scores (higher = more unusual), each a function of the record alone:
    neg_elbo (one z, per-record noise), recon (-log p(x | z = μ)), iwae (-log p(x), K samples)."""

    out: dict[str, list] = {s: [] for s in SCORES}
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(raw), batch):
        r = torch.from_numpy(np.ascontiguousarray(raw[i:i + batch]))
        eps = record_normal(record_keys(r), model.config.latent_dim, seed)
        out["neg_elbo"].append(model.score(r, eps=eps[None]).numpy())
        x = model.preprocess(r)
        out["recon"].append(model.nll(model.decode(model.encode(x).mean), x).numpy())
        out["iwae"].append((-model.iw_log_likelihood(r, k, g)).numpy())
    return {s: np.concatenate(v) for s, v in out.items()}


@torch.no_grad()
def squared_error(model: VAE, raw: np.ndarray, batch: int = 500) -> np.ndarray:
    """Σ (x − E[x | z = μ])² in model space: the VAE's analogue of PCA reconstruction error, which
    (unlike the Bernoulli -log p(x|μ)) does not weigh a wrong pixel by how confident the decoder was."""
    from vae import anomaly

    out = []
    for i in range(0, len(raw), batch):
        x = model.preprocess(torch.from_numpy(np.ascontiguousarray(raw[i:i + batch])))
        out.append(anomaly.squared_error(model, x, model.encode(x).mean).numpy())
    return np.concatenate(out)


class LatentDensity:
    """How far a record's μ lies from the fitting records' μ: `knn_z`, the mean distance to the 5
    nearest, and `mahal_z`, the Mahalanobis distance under a Gaussian fit to them. The fitting records'
    own k-NN score leaves each record out (its nearest neighbour would be itself)."""

    def __init__(self, mu_fit: np.ndarray, k: int = 5):
        from sklearn.neighbors import NearestNeighbors

        self.k = k
        self.nn = NearestNeighbors(n_neighbors=k + 1).fit(mu_fit)
        self.mean = mu_fit.mean(0)
        cov = np.cov(mu_fit, rowvar=False) + 1e-6 * np.eye(mu_fit.shape[1])
        self.prec = np.linalg.inv(cov)

    def knn(self, mu: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
        d = self.nn.kneighbors(mu, n_neighbors=self.k + int(leave_one_out))[0]
        return d[:, int(leave_one_out):].mean(1)

    def mahal(self, mu: np.ndarray) -> np.ndarray:
        c = mu - self.mean
        return np.sqrt(np.einsum("ij,jk,ik->i", c, self.prec, c))


class CandidateScorer:
    """Every candidate score (CANDIDATES, higher = more unusual) of a VAE and the records it was fit on.
    A combined score `a+b` is the sum of a and b, each standardised by its mean and sd over the fitting
    records (reconstruction and latent distance fail on different records, and their units differ);
    the statistics come from the fitting records only, so a record's score is a function of it alone."""

    def __init__(self, model: VAE, fit_raw: np.ndarray, k: int, seed: int, knn_space: str = "mu"):
        self.model, self.k, self.seed, self.knn_space = model, k, seed, knn_space
        self.latent = LatentDensity(self._mu(fit_raw))
        fit = self._parts(fit_raw, leave_one_out=True)
        self.stats = {name: (float(v.mean()), float(v.std()) or 1.0) for name, v in fit.items()}

    def _parts(self, raw: np.ndarray, leave_one_out: bool = False) -> dict[str, np.ndarray]:
        out = vae_scores(self.model, raw, self.k, self.seed)
        out["sq_err"] = squared_error(self.model, raw)
        mu = self._mu(raw)
        out["knn_z"] = self.latent.knn(mu, leave_one_out)
        out["mahal_z"] = self.latent.mahal(mu)
        return out

    def _mu(self, raw: np.ndarray) -> np.ndarray:
        """μ, or with knn_space 'embedding' μ in the model's latent metric (VAE.embedding)."""
        mu = posterior(self.model, raw)[0]
        return self.model.embedding(torch.from_numpy(mu)).numpy() if self.knn_space == "embedding" else mu

    def __call__(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        out = self._parts(raw)
        for name in COMBINED:
            out[name] = sum((out[p] - self.stats[p][0]) / self.stats[p][1] for p in name.split("+"))
        return {name: out[name] for name in CANDIDATES}


def choose(val_aucs: list[dict[str, float]], names: tuple[str, ...] = CANDIDATES) -> tuple[str, float]:
    """The candidate with the best mean training-split validation AUC over the digits / draws (ties:
    the first in `names`), and that mean. Reads validation AUCs only: no held-out record reaches it."""
    means = {n: float(np.mean([v[n] for v in val_aucs])) for n in names}
    best = max(names, key=lambda n: means[n])
    return best, means[best]


def baseline_scores(x_train: np.ndarray, x_test: np.ndarray, mu_train: np.ndarray, mu_test: np.ndarray,
                    seed: int) -> dict[str, np.ndarray]:
    """Scores (higher = more unusual) of the baselines, fit on the training records, in model space:
    IsolationForest (100 trees) and One-Class SVM (RBF, γ 'scale', ν 0.1) on the features, PCA
    reconstruction error (components explaining 90 % of the training variance), and the mean distance
    to the 5 nearest training μ."""
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import NearestNeighbors
    from sklearn.svm import OneClassSVM

    s: dict[str, np.ndarray] = {}
    s["isolation_forest"] = -IsolationForest(n_estimators=100, random_state=seed).fit(x_train).score_samples(x_test)
    s["ocsvm"] = -OneClassSVM(kernel="rbf", gamma="scale", nu=0.1).fit(x_train).score_samples(x_test)
    pca = PCA(n_components=0.9, svd_solver="full").fit(x_train)
    s["pca_recon"] = ((pca.inverse_transform(pca.transform(x_test)) - x_test) ** 2).sum(1)
    s["knn_mu"] = NearestNeighbors(n_neighbors=5).fit(mu_train).kneighbors(mu_test)[0].mean(1)
    return s


def _set_threads(cfg: ProtocolConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


# --- the protocols --------------------------------------------------------------------------------

def one_class_split(ytr: np.ndarray, d: int, fraction: float, n_anomalies: int, seed: int):
    """Indices into the training images for digit d: (fit, validation normals, validation anomalies).
    A seeded `fraction` of d's images is kept out of fitting; the anomalies are a seeded sample of the
    other digits' training images. The held-out 2,000 are not an argument: they cannot leak in."""
    rng = np.random.default_rng([seed, 14, d])
    own = rng.permutation(np.flatnonzero(ytr == d))
    n_val = max(1, round(len(own) * fraction))
    others = np.flatnonzero(ytr != d)
    anomalies = np.sort(rng.choice(others, min(n_anomalies, len(others)), replace=False))
    return np.sort(own[n_val:]), np.sort(own[:n_val]), anomalies


def validation_aucs(scorer: CandidateScorer, normal: np.ndarray, anomalous: np.ndarray) -> dict[str, float]:
    """Each candidate's ROC AUC on training-split records: `normal` (label 0) against `anomalous` (1)."""
    scores = scorer(np.concatenate([normal, anomalous]))
    labels = np.r_[np.zeros(len(normal), int), np.ones(len(anomalous), int)]
    return {k: roc_auc(v, labels) for k, v in scores.items()}


def one_class_mnist(cfg: ProtocolConfig) -> dict[str, Any]:
    """Per digit: fit on d's fitting images, every candidate's AUC on the training-split validation set
    (computed before any held-out image is scored), then every candidate and baseline on the 2,000
    held-out images. The baselines are fit on all of d's training images (more images than the VAE
    sees); the k-NN-on-μ baseline uses the μ of the same VAE."""
    _set_threads(cfg)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = mnist_split(cfg.seed)
    epochs = cfg.epochs or 100
    per_digit: dict[str, dict[str, float]] = {}
    train_split: dict[str, dict[str, float]] = {}
    for d in cfg.digits:
        t = time.perf_counter()
        fit, val_normal, val_anomalous = one_class_split(ytr, d, cfg.select_fraction, cfg.select_anomalies, cfg.seed)
        torch.manual_seed(cfg.seed)
        model = fit_vae(VAE(image_config(cfg.arch)), xtr[fit], epochs, batch_size=64, seed=cfg.seed,
                        val_fraction=cfg.val_fraction)
        scorer = CandidateScorer(model, xtr[fit], cfg.iw_samples, cfg.seed)
        train_split[str(d)] = validation_aucs(scorer, xtr[val_normal], xtr[val_anomalous])
        anomalous = (yte != d).astype(int)
        scores = scorer(xte)
        own = xtr[ytr == d]
        scores |= baseline_scores(own / 255.0, xte / 255.0, posterior(model, own)[0], posterior(model, xte)[0],
                                  cfg.seed)
        per_digit[str(d)] = {k: roc_auc(v, anomalous) for k, v in scores.items()}
        print(f"digit {d}: fit on {len(fit)} images (validation {len(val_normal)} normal, {len(val_anomalous)} "
              f"anomalous), {epochs} epochs, {time.perf_counter() - t:.0f} s; training-split AUC: "
              + " ".join(f"{k} {v:.4f}" for k, v in train_split[str(d)].items())
              + "; held-out AUC: " + " ".join(f"{k} {v:.4f}" for k, v in per_digit[str(d)].items()), flush=True)
    chosen, chosen_val = choose(list(train_split.values()))
    mean = {k: float(np.mean([r[k] for r in per_digit.values()])) for k in (*CANDIDATES, *BASELINES)}
    return {"protocol": "one-class-mnist", "arch": cfg.arch, "epochs": epochs, "val_fraction": cfg.val_fraction,
            "iw_samples": cfg.iw_samples, "select_fraction": cfg.select_fraction,
            "select_anomalies": cfg.select_anomalies,
            "chosen": {"score": chosen, "train_split_auc": chosen_val, "held_out_auc": mean[chosen]},
            "train_split_auc": train_split,
            "train_split_mean": {k: float(np.mean([r[k] for r in train_split.values()])) for k in CANDIDATES},
            "per_digit": per_digit, "mean": mean, "wall_s": time.perf_counter() - t0}


def tabular_vae(raw_fit: np.ndarray, seed: int, linear_path: bool = False) -> VAE:
    """The breast-cancer model, as `vaepipe train --arch mlp --hidden 64,32 --latent-dim 4 --likelihood
    gaussian --scaling standardize --no-linear-path` builds it (vae.recipe.model_config): an MLP VAE over
    the columns standardised by the records it is fit on, the calibrated Gaussian, the nets alone from
    their seeded start. With the linear path (train's default) every member starts at the same exact
    pPCA, the 5 members of an ensemble stay near it and alike, and knn_z is k-NN on whitened PCA scores
    (cross-fit AUC 0.932 against 0.953 for the nets alone; docs/quality.md). `linear_path` builds that
    default instead (the caller starts it at pPCA: tabular_scores)."""
    from vae import recipe

    pre = Preprocessing.fit(raw_fit, [f"c{i}" for i in range(raw_fit.shape[1])], "scalars", "standardize")
    torch.manual_seed(seed)
    return VAE(recipe.model_config(pre, raw_fit.shape[1], "scalars", 4, arch="mlp", hidden=(64, 32),
                                   likelihood_choice="gaussian", linear_path=linear_path))


def tabular_scores(raw_fit: np.ndarray, raw_score: np.ndarray, epochs: int, cfg: ProtocolConfig,
                   seed: int) -> tuple[dict[str, np.ndarray], VAE]:
    """Every candidate score of `raw_score` from `cfg.ensemble` tabular VAEs fit on `raw_fit` (member m
    seeded seed + 10,000·m, so member 0 is the one-model run's and no member shares a draw's seed),
    each candidate averaged over the members; and member 0, whose μ the k-NN baseline uses."""
    members = []
    for m in range(cfg.ensemble):
        sm = seed + 10_000 * m
        model, start = tabular_vae(raw_fit, sm, linear_path=cfg.tabular_build == "ppca"), None
        if cfg.tabular_build == "ppca":                                          # as train starts its default
            from vae.recipe import ppca_start

            start = ppca_start(model, np.ascontiguousarray(raw_fit, np.float32), sm)
            model.start_at(start)
        model = fit_vae(model, raw_fit, epochs, batch_size=32, lr=2e-3, seed=sm, val_fraction=cfg.val_fraction,
                        start=start)
        model.fit_round_trip(torch.from_numpy(np.ascontiguousarray(raw_fit)))   # as train does before registering
        members.append((model, CandidateScorer(model, raw_fit, cfg.iw_samples, sm, cfg.knn_space)(raw_score)))
    scores = {k: np.mean([s[k] for _, s in members], axis=0) for k in CANDIDATES}
    return scores, members[0][0]


def cross_fit_aucs(raw: np.ndarray, anomalous: np.ndarray, epochs: int, cfg: ProtocolConfig,
                   seed: int) -> dict[str, float]:
    """Each candidate's ROC AUC inside the fit half, two-fold: a VAE fit on one fold (labels unused)
    scores the other, both ways, the two AUCs averaged. The folds are stratified by the fit half's
    labels so each holds about half its anomalies; the labels serve only this choice."""
    rng = np.random.default_rng([seed, 14])
    folds = [[], []]
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(anomalous == cls))
        folds[0] += idx[::2].tolist()
        folds[1] += idx[1::2].tolist()
    aucs = []
    for a, b in ((folds[0], folds[1]), (folds[1], folds[0])):
        a, b = np.sort(a), np.sort(b)
        scores = tabular_scores(raw[a], raw[b], epochs, cfg, seed)[0]
        aucs.append({k: roc_auc(v, anomalous[b]) for k, v in scores.items()})
    return {k: float(np.mean([x[k] for x in aucs])) for k in CANDIDATES}


def malignant_rows(target: np.ndarray) -> int:
    """How many malignant rows a draw keeps: 5 % of the rows (target 0 = malignant, 1 = benign)."""
    return round(int((target == 1).sum()) * 0.05 / 0.95)


def breast_cancer_draw(target: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw `seed`: every benign row and a seeded sample of malignant ones (malignant_rows), shuffled
    and halved: (fit rows, scored rows)."""
    rng = np.random.default_rng(seed)
    benign, malignant = np.flatnonzero(target == 1), np.flatnonzero(target == 0)
    rows = rng.permutation(np.concatenate([benign, rng.choice(malignant, malignant_rows(target), replace=False)]))
    half = len(rows) // 2
    return rows[:half], rows[half:]


def breast_cancer(cfg: ProtocolConfig) -> dict[str, Any]:
    """Per draw and per epochs of the grid: the cross-fit AUCs inside the fit half (computed before
    the scored half is touched), then a VAE fit on the whole fit half scores the other half. One
    (epochs, score) pair is chosen over all draws by the mean cross-fit AUC."""
    from sklearn.datasets import load_breast_cancer

    _set_threads(cfg)
    t0 = time.perf_counter()
    x, target = load_breast_cancer(return_X_y=True)       # target 0 = malignant, 1 = benign
    n_mal = malignant_rows(target)
    grid = [cfg.epochs] if cfg.epochs else list(cfg.epoch_grid)
    held_out: dict[str, list[dict[str, float]]] = {str(e): [] for e in grid}
    train_split: list[dict[str, float]] = []
    for s in range(cfg.seed, cfg.seed + cfg.draws):
        tr, te = breast_cancer_draw(target, s)
        raw_tr, raw_te = x[tr].astype(np.float32), x[te].astype(np.float32)
        train_split.append({f"{k}@{e}": v for e in grid
                            for k, v in cross_fit_aucs(raw_tr, (target[tr] == 0).astype(int), e, cfg, s).items()})
        anomalous = (target[te] == 0).astype(int)
        for e in grid:
            scores, model = tabular_scores(raw_tr, raw_te, e, cfg, s)
            z_tr = model.preprocess(torch.from_numpy(raw_tr)).numpy()
            z_te = model.preprocess(torch.from_numpy(raw_te)).numpy()
            scores |= baseline_scores(z_tr, z_te, posterior(model, raw_tr)[0], posterior(model, raw_te)[0], s)
            held_out[str(e)].append({k: roc_auc(v, anomalous) for k, v in scores.items()})
            print(f"draw {s}, {e} epochs: fit on {len(tr)} rows ({int((target[tr] == 0).sum())} malignant), scored "
                  f"{len(te)} ({int(anomalous.sum())} malignant); cross-fit AUC: "
                  + " ".join(f"{k} {train_split[-1][f'{k}@{e}']:.4f}" for k in CANDIDATES) + "; held-out AUC: "
                  + " ".join(f"{k} {v:.4f}" for k, v in held_out[str(e)][-1].items()), flush=True)
    chosen, chosen_val = choose(train_split, tuple(f"{k}@{e}" for e in grid for k in CANDIDATES))
    score, e = chosen.rsplit("@", 1)
    runs = held_out[e]
    keys = (*CANDIDATES, *BASELINES)
    mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    return {"protocol": "breast-cancer", "epochs": int(e), "epoch_grid": grid, "val_fraction": cfg.val_fraction,
            "malignant_rows": int(n_mal), "iw_samples": cfg.iw_samples, "ensemble": cfg.ensemble,
            "chosen": {"score": score, "epochs": int(e), "train_split_auc": chosen_val, "held_out_auc": mean[score]},
            "train_split_auc": train_split,
            "train_split_mean": {k: float(np.mean([r[k] for r in train_split])) for k in train_split[0]},
            "draws": runs, "held_out_by_epochs": held_out, "mean": mean,
            "sd": {k: float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0 for k in keys},
            "vs_isolation_forest": paired(runs, score, "isolation_forest"), "wall_s": time.perf_counter() - t0}


def paired(runs: list[dict[str, float]], a: str, b: str) -> dict[str, float]:
    """Draw by draw, AUC of `a` minus AUC of `b` (the same scored rows): the draws `a` wins, their
    mean difference and its sd (ddof 1)."""
    d = np.array([r[a] - r[b] for r in runs])
    return {"wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "draws": len(d), "mean_diff": float(d.mean()),
            "sd_diff": float(d.std(ddof=1)) if len(d) > 1 else 0.0}


def semi_mnist(cfg: ProtocolConfig) -> dict[str, Any]:
    _set_threads(cfg)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = mnist_split(cfg.seed)
    epochs = cfg.epochs or 20
    semi = SemiConfig(classes=tuple(range(10)))
    torch.manual_seed(cfg.seed)
    model = fit_vae(SemiVAE(image_config(cfg.arch, semi)), xtr, epochs, seed=cfg.seed)   # M1: no labels
    t_m1 = time.perf_counter() - t0
    print(f"M1: {epochs} epochs on {len(xtr)} unlabelled images in {t_m1:.0f} s", flush=True)
    mu_tr, lv_tr = posterior(model, xtr)
    mu_te, _ = posterior(model, xte)
    out: dict[str, Any] = {"protocol": "semi-mnist", "arch": cfg.arch, "epochs": epochs, "head_epochs": cfg.head_epochs,
                           "m1_wall_s": t_m1, "m2": {}, "label_spreading_mu": {}}
    for n in cfg.labels:
        errs, ls = [], []
        for s in range(cfg.seed, cfg.seed + cfg.draws):
            errs.append(m2_error(mu_tr, lv_tr, ytr, mu_te, yte, n, s, cfg.head_epochs))
            ls.append(spreading_error(mu_tr, ytr, mu_te, yte, n, s))
            print(f"{n} labels, draw {s}: M1+M2 error {errs[-1]:.2%}, label spreading on μ {ls[-1]:.2%} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        out["m2"][str(n)] = {"mean": float(np.mean(errs)), "sd": float(np.std(errs, ddof=1)) if len(errs) > 1 else 0.0,
                             "draws": errs}
        out["label_spreading_mu"][str(n)] = {"mean": float(np.mean(ls)),
                                             "sd": float(np.std(ls, ddof=1)) if len(ls) > 1 else 0.0, "draws": ls}
    out["wall_s"] = time.perf_counter() - t0
    return out


