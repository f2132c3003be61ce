"""Standard protocols with published baselines, each one command that trains, scores and prints every
figure of the same run (issue 14):

* `semi-mnist`: few-label classification on the seeded 6,000 / 2,000 split of mnist_8k
  (pipeline.datasets.write_mnist_split's split). M1 (the default conv VAE recipe) is trained on the
  6,000 training images, unlabelled; then, per label count (100 / 600 / 1,000) and per seeded
  balanced label draw, an M2 head (vae.semi) is fit on the frozen M1's q(z1|x): Kingma et al. 2014's
  two-stage M1+M2. Error on the 2,000 held-out images, beside label spreading on the same μ.
* `one-class-mnist`: Ruff et al. 2018's protocol: for each digit d a VAE is trained on the training
  images of d only and scores all 2,000 held-out images; ROC AUC with the other nine digits as the
  anomalies. vaepipe's scores (-ELBO, reconstruction only, importance-weighted -log p(x)) against
  IsolationForest and One-Class SVM on pixels, PCA reconstruction error and k-NN distance on μ.
* `breast-cancer`: scikit-learn's breast-cancer table, malignant rows subsampled to 5 % of the rows
  (the anomalies), a seeded half of the rows to fit on (labels unused, anomalies included, as a
  batch job sees them), the other half scored; an MLP VAE over the 30 columns against the same
  baselines; mean ± sd over seeded draws.

Every setting is fixed in the config below, before any held-out figure was seen; nothing is chosen
on the held-out records. The primary vaepipe score (`iwae`: the importance-weighted -log p(x)) was
named in advance as the tightest likelihood bound; the others are printed beside it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import RuntimeConfig, opt, write_json
from pipeline.errors import ConfigError
from pipeline.eval_metrics import balanced_indices, roc_auc, spreading_error
from vae.config import SemiConfig, VAEConfig
from vae.distributions import record_keys, record_normal
from vae.model import VAE
from vae.preprocess import Preprocessing
from vae.semi import M2, SemiVAE, fit_m2
from vae.train_step import cosine_lr, train_epoch

PROTOCOLS = ("semi-mnist", "one-class-mnist", "breast-cancer")
SCORES = ("iwae", "neg_elbo", "recon")
BASELINES = ("isolation_forest", "ocsvm", "pca_recon", "knn_mu")


@dataclass
class ProtocolConfig(RuntimeConfig):
    what: str = opt("one-class-mnist", "the protocol: semi-mnist, one-class-mnist, breast-cancer", choices=PROTOCOLS)
    epochs: int = opt(0, "VAE training epochs (0: the protocol's own: 20 semi-mnist, 100 one-class-mnist, "
                         "300 breast-cancer)")
    head_epochs: int = opt(50, "semi-mnist: epochs of the M2 head per label draw")
    labels: list[int] = opt(help="semi-mnist: label counts", factory=lambda: [100, 600, 1000])
    draws: int = opt(5, "semi-mnist, breast-cancer: seeded draws (labels / anomaly subsample) averaged over")
    digits: list[int] = opt(help="one-class-mnist: the normal digits to run (default all ten)",
                            factory=lambda: list(range(10)))
    arch: str = opt("conv", "image model: conv (what `vaepipe train` picks for images: channels 32, 64) or mlp "
                            "(512, 256, Kingma et al.'s M1 shape)", choices=("conv", "mlp"))
    val_fraction: float = opt(0.0, "one-class-mnist, breast-cancer: hold out this seeded fraction of the fitting "
                                    "records (no labels used) and keep the epoch with the best validation -ELBO "
                                    "(early stopping without anomalies); 0 = train all epochs on all of them")
    iw_samples: int = opt(16, "importance samples K of the iwae score")
    seed: int = opt(0, "seed of the split, the models and the draws")
    threads: int = opt(0, "torch threads (0: torch's default)")
    json: str | None = opt(None, "write every figure here as JSON")

    def __post_init__(self) -> None:
        self.choice("what", PROTOCOLS)
        self.choice("arch", ("conv", "mlp"))
        if self.epochs < 0 or self.head_epochs < 1 or self.draws < 1 or self.iw_samples < 1:
            raise ConfigError("epochs must be ≥ 0; head_epochs, draws and iw_samples ≥ 1")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if any(d not in range(10) for d in self.digits):
            raise ConfigError(f"digits must be 0–9, got {self.digits}")
        if any(n < 2 for n in self.labels):
            raise ConfigError(f"labels must be label counts ≥ 2, got {self.labels}")


# --- shared pieces --------------------------------------------------------------------------------

def mnist_split(seed: int = 0, n_train: int = 6000):
    """The split pipeline.datasets.write_mnist_split writes: (x_train, y_train, x_test, y_test), raw uint8."""
    from pipeline.datasets import mnist

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
            val_fraction: float = 0.0) -> VAE:
    """The default recipe's loop (AdamW, cosine decay, a seeded permutation per epoch), unsupervised.
    With val_fraction > 0 a seeded part of `raw` is held out and the epoch with the best validation
    -ELBO (vae.train_step.evaluate, per-record noise) is kept, as `train --patience` keeps its best."""
    import copy

    from vae.train_step import evaluate

    x = torch.from_numpy(np.ascontiguousarray(raw))
    val = None
    if val_fraction > 0:
        p = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 77))
        n_val = max(1, int(len(x) * val_fraction))
        x, val = x[p[n_val:]], x[p[:n_val]]
    best, best_state = float("inf"), None
    opt_ = torch.optim.AdamW(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for g in opt_.param_groups:
            g["lr"] = cosine_lr(lr, epoch, epochs)
        torch.manual_seed(seed * 100_003 + epoch * 1009)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919))
        train_epoch(model, (x[perm[i:i + batch_size]] for i in range(0, len(x), batch_size)), opt_, beta=1.0)
        if val is not None:
            score = evaluate(model, [val], seed=seed)[0].means()["neg_elbo"]
            if score < best:
                best, best_state = score, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()


@torch.no_grad()
def vae_scores(model: VAE, raw: np.ndarray, k: int, seed: int, batch: int = 500) -> dict[str, np.ndarray]:
    """Per-record anomaly scores (higher = more unusual), each a function of the record alone:
    neg_elbo (one z, per-record noise), recon (-log p(x | z = μ)), iwae (-log p(x), K samples)."""
    from vae.loss import reconstruction_nll

    out: dict[str, list] = {s: [] for s in SCORES}
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(raw), batch):
        r = torch.from_numpy(np.ascontiguousarray(raw[i:i + batch]))
        eps = record_normal(record_keys(r), model.config.latent_dim, seed)
        out["neg_elbo"].append(model.score(r, eps=eps[None]).numpy())
        x = model.preprocess(r)
        out["recon"].append(reconstruction_nll(model.decode(model.encode(x).mean), x, model.config.likelihood).numpy())
        out["iwae"].append((-model.iw_log_likelihood(r, k, g)).numpy())
    return {s: np.concatenate(v) for s, v in out.items()}


@torch.no_grad()
def posterior(model: VAE, raw: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    mus, lvs = [], []
    for i in range(0, len(raw), batch):
        q = model.embed(torch.from_numpy(np.ascontiguousarray(raw[i:i + batch])))
        mus.append(q.mean.numpy()), lvs.append(q.logvar.numpy())
    return np.concatenate(mus), np.concatenate(lvs)


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


def m2_error(mu_tr: np.ndarray, lv_tr: np.ndarray, ytr: np.ndarray, mu_te: np.ndarray, yte: np.ndarray,
             n_labels: int, seed: int, epochs: int) -> float:
    """Error of an M2 head (vae.semi, the default SemiConfig) fit for `epochs` on the frozen
    q(z1|x) = N(mu_tr, exp(lv_tr)) of every training record, `n_labels` of them labelled (a balanced
    draw, eval_metrics.balanced_indices), the rest unlabelled; argmax q(y|μ) on the test records."""
    classes = tuple(np.unique(ytr).tolist())
    cls_index = {c: i for i, c in enumerate(classes)}
    idx = balanced_indices(ytr, n_labels, seed)
    y = torch.full((len(ytr),), -1, dtype=torch.long)
    y[idx] = torch.tensor([cls_index[c] for c in ytr[idx].tolist()])
    torch.manual_seed(seed)
    m2 = M2(mu_tr.shape[1], SemiConfig(classes=classes))
    fit_m2(m2, torch.from_numpy(mu_tr), torch.from_numpy(lv_tr), y, epochs, seed=seed)
    with torch.no_grad():
        pred = np.asarray(classes)[m2.logits(torch.from_numpy(mu_te)).argmax(-1).numpy()]
    return float((pred != yte).mean())


def _set_threads(cfg: ProtocolConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


# --- the protocols --------------------------------------------------------------------------------

def one_class_mnist(cfg: ProtocolConfig) -> dict[str, Any]:
    _set_threads(cfg)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = mnist_split(cfg.seed)
    epochs = cfg.epochs or 100
    per_digit: dict[str, dict[str, float]] = {}
    for d in cfg.digits:
        t = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = fit_vae(VAE(image_config(cfg.arch)), xtr[ytr == d], epochs, batch_size=64, seed=cfg.seed,
                        val_fraction=cfg.val_fraction)
        anomalous = (yte != d).astype(int)
        scores = vae_scores(model, xte, cfg.iw_samples, cfg.seed)
        mu_tr, _ = posterior(model, xtr[ytr == d])
        mu_te, _ = posterior(model, xte)
        scores |= baseline_scores(xtr[ytr == d] / 255.0, xte / 255.0, mu_tr, mu_te, cfg.seed)
        per_digit[str(d)] = {k: roc_auc(v, anomalous) for k, v in scores.items()}
        print(f"digit {d}: {int((ytr == d).sum())} training images, {epochs} epochs, {time.perf_counter() - t:.0f} s: "
              + " ".join(f"{k} {v:.4f}" for k, v in per_digit[str(d)].items()), flush=True)
    mean = {k: float(np.mean([r[k] for r in per_digit.values()])) for k in (*SCORES, *BASELINES)}
    return {"protocol": "one-class-mnist", "arch": cfg.arch, "epochs": epochs, "val_fraction": cfg.val_fraction, "iw_samples": cfg.iw_samples, "per_digit": per_digit,
            "mean": mean, "wall_s": time.perf_counter() - t0}


def breast_cancer(cfg: ProtocolConfig) -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer

    _set_threads(cfg)
    t0 = time.perf_counter()
    x, target = load_breast_cancer(return_X_y=True)       # target 0 = malignant, 1 = benign
    benign, malignant = np.flatnonzero(target == 1), np.flatnonzero(target == 0)
    n_mal = round(len(benign) * 0.05 / 0.95)               # anomalies are 5 % of the rows
    epochs = cfg.epochs or 300
    runs = []
    for s in range(cfg.seed, cfg.seed + cfg.draws):
        rng = np.random.default_rng(s)
        rows = rng.permutation(np.concatenate([benign, rng.choice(malignant, n_mal, replace=False)]))
        half = len(rows) // 2
        tr, te = rows[:half], rows[half:]
        raw_tr, raw_te = x[tr].astype(np.float32), x[te].astype(np.float32)
        pre = Preprocessing.fit(raw_tr, [f"c{i}" for i in range(30)], "scalars", "standardize")
        torch.manual_seed(s)
        model = VAE(VAEConfig(input_shape=(30,), arch="mlp", latent_dim=4, hidden=(64, 32), likelihood="gaussian",
                              preprocessing=pre))
        model = fit_vae(model, raw_tr, epochs, batch_size=32, lr=2e-3, seed=s, val_fraction=cfg.val_fraction)
        scores = vae_scores(model, raw_te, cfg.iw_samples, s)
        mu_tr, _ = posterior(model, raw_tr)
        mu_te, _ = posterior(model, raw_te)
        z_tr = model.preprocess(torch.from_numpy(raw_tr)).numpy()
        z_te = model.preprocess(torch.from_numpy(raw_te)).numpy()
        scores |= baseline_scores(z_tr, z_te, mu_tr, mu_te, s)
        anomalous = (target[te] == 0).astype(int)
        runs.append({k: roc_auc(v, anomalous) for k, v in scores.items()})
        print(f"draw {s}: fit on {len(tr)} rows ({int((target[tr] == 0).sum())} malignant), scored {len(te)} "
              f"({int(anomalous.sum())} malignant): " + " ".join(f"{k} {v:.4f}" for k, v in runs[-1].items()), flush=True)
    keys = (*SCORES, *BASELINES)
    return {"protocol": "breast-cancer", "epochs": epochs, "val_fraction": cfg.val_fraction, "malignant_rows": int(n_mal), "draws": runs,
            "mean": {k: float(np.mean([r[k] for r in runs])) for k in keys},
            "sd": {k: float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0 for k in keys},
            "wall_s": time.perf_counter() - t0}


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


def run_protocol(cfg: ProtocolConfig) -> dict[str, Any]:
    r = {"semi-mnist": semi_mnist, "one-class-mnist": one_class_mnist, "breast-cancer": breast_cancer}[cfg.what](cfg)
    r["threads"] = torch.get_num_threads()
    if cfg.json:
        write_json(cfg.json, r)
    return r


def summary(r: dict[str, Any]) -> str:
    """The protocol's table, as printed."""
    lines = [f"{r['protocol']} ({r.get('arch', 'mlp')}, {r['epochs']} epochs"
             + (f", best of them by the ELBO of {r['val_fraction']:.0%} held out" if r.get("val_fraction") else "")
             + f"): wall {r['wall_s']:.0f} s ({r['threads']} torch threads)"]
    if r["protocol"] == "semi-mnist":
        lines.append("labels | M1+M2 error (mean ± sd) | label spreading on μ")
        for n, v in r["m2"].items():
            ls = r["label_spreading_mu"][n]
            lines.append(f"{n:>6} | {v['mean']:.2%} ± {v['sd']:.2%} | {ls['mean']:.2%} ± {ls['sd']:.2%}")
        return "\n".join(lines)
    keys = (*SCORES, *BASELINES)
    lines.append("ROC AUC | " + " | ".join(keys))
    rows = r["per_digit"].items() if r["protocol"] == "one-class-mnist" else \
        ((f"draw {i}", d) for i, d in enumerate(r["draws"]))
    for name, v in rows:
        lines.append(f"{name} | " + " | ".join(f"{v[k]:.4f}" for k in keys))
    lines.append("mean | " + " | ".join(f"{r['mean'][k]:.4f}" for k in keys))
    if "sd" in r:
        lines.append("sd | " + " | ".join(f"{r['sd'][k]:.4f}" for k in keys))
    best = max(BASELINES, key=lambda k: r["mean"][k])
    lines.append(f"primary score iwae {r['mean']['iwae']:.4f} vs best baseline {best} {r['mean'][best]:.4f}")
    return "\n".join(lines)
