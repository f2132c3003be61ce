"""`vaepipe evaluate`: a quality report for a registered VAE on held-out records — ELBO / KL /
importance-weighted log-likelihood in nats, compression of μ (fp32/fp16/int8) against PCA at the
same bytes per record, few-label logistic-regression probes, active units, anomaly ROC AUC, PNGs;
figures go to JSON and to the model version's MLflow run."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import registry
from pipeline.config import RuntimeConfig, opt
from pipeline.errors import ConfigError, SchemaError
from pipeline.features import infer_spec, to_matrix
from pipeline.progress import Progress
from vae.checkpoint import load_checkpoint, model_from_checkpoint
from vae.model import VAE
from vae.train_step import active_units

PRECISIONS = {"fp32": 4, "fp16": 2, "int8": 1}
NOTE = ("nats per record under the model's likelihood; MNIST here is grey-level (x/255 in [0,1]), not "
        "binarised, so Bernoulli figures are not directly comparable to binarised-MNIST literature")


@dataclass
class EvaluateConfig(RuntimeConfig):
    model: str = opt("", "registered model: models:/NAME@ALIAS or models:/NAME/VERSION")
    input: str = opt("", "held-out Parquet file or folder (local path)")
    train_input: str | None = opt(None, "Parquet to fit PCA and the probes on (default: a seeded half of --input)")
    labels: str | None = opt(None, "label column: enables the probes and the coloured μ scatter")
    anomaly_label: str | None = opt(None, "boolean/0-1 column marking anomalies: ROC AUC of -ELBO")
    json: str | None = opt(None, "write all figures as JSON here")
    report: str | None = opt(None, "write PNGs into this folder")
    iw_samples: int = opt(100, "importance samples K for the log-likelihood estimate")
    iw_records: int = opt(1000, "records (a seeded subset) for the importance-weighted estimate")
    seed: int = opt(0, "seed for sampling z, subsets and probes")
    label_draws: int = opt(5, "balanced label draws (seeds seed, seed+1, …) each probe is averaged over; "
                              "at 100 labels one draw moves the error by a point or more")
    log_to_mlflow: bool = opt(True, "log metrics and PNGs to the model version's MLflow run")

    def __post_init__(self) -> None:
        self.require("model", "input")
        if self.iw_samples < 1 or self.iw_records < 1:
            raise ConfigError("iw_samples and iw_records must be ≥ 1")
        if self.label_draws < 1:
            raise ConfigError(f"label_draws must be ≥ 1, got {self.label_draws}")


# --- maths pinned by tests -------------------------------------------------------------------------

def gaussian_kl(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(N(μ, diag σ²) || N(0, I)) per record, nats."""
    return 0.5 * (mu ** 2 + np.exp(logvar) - 1.0 - logvar).sum(-1)


def psnr(mse: float, peak: float = 1.0) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(peak * peak / mse)


def quantize(mu: np.ndarray, precision: str, ref: np.ndarray | None = None) -> np.ndarray:
    """μ as stored at fp32 / fp16 / int8 (per-dimension affine min–max int8, ranges from `ref`,
    default μ itself), back as float32."""
    if precision == "fp32":
        return mu.astype(np.float32)
    if precision == "fp16":
        return mu.astype(np.float16).astype(np.float32)
    ref = mu if ref is None else ref
    lo, hi = ref.min(0), ref.max(0)
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0)
    q = np.clip(np.round((mu - lo) / scale), 0, 255).astype(np.uint8)
    return (q.astype(np.float32) * scale + lo).astype(np.float32)


def bytes_per_record(dims: int, precision: str) -> int:
    return dims * PRECISIONS[precision]


class PCA:
    """Plain SVD PCA (deterministic): fit on training data, project / reconstruct."""

    def __init__(self, k: int):
        self.k = k

    def fit(self, x: np.ndarray) -> "PCA":
        x = np.asarray(x, np.float64)
        self.mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vt[: self.k]
        return self

    def top(self, k: int) -> "PCA":
        """The first k components of this fit (one SVD serves every k of a rate–distortion curve)."""
        p = PCA(k)
        p.mean, p.components = self.mean, self.components[:k]
        return p

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) @ self.components.T).astype(np.float32)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, np.float64) @ self.components + self.mean


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
    import warnings

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


# --- data ------------------------------------------------------------------------------------------

def write_mnist_split(folder: str, seed: int = 0, n_train: int = 6000) -> tuple[str, str]:
    """../shared/data/mnist_8k.npz → FOLDER/train (6,000) and FOLDER/test (the rest), seeded shuffle.
    python -c "from pipeline.evaluate import write_mnist_split as w; print(w('mnist_split'))"."""
    from pipeline.datasets import images_table, mnist, write_parquet

    x, y = mnist()
    p = np.random.default_rng(seed).permutation(len(x))
    tr, te = p[:n_train], p[n_train:]
    a = write_parquet(images_table(x[tr], y[tr]), os.path.join(folder, "train"))
    b = write_parquet(images_table(x[te], y[te], start_id=n_train), os.path.join(folder, "test"))
    return a, b


def _read(path: str, model: VAE, extra: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    pre = model.config.preprocessing
    table = pq.read_table(path)
    missing = [c for c in extra if c not in table.schema.names]
    if missing:
        raise SchemaError(f"{path}: column(s) {missing} not found; columns present: {table.schema.names}")
    spec = infer_spec(table.schema, list(pre.features), source=path)
    x = to_matrix(table, spec, model.config.input_dim, source=path)
    return x, {c: table.column(c).to_numpy(zero_copy_only=False) for c in extra}


# --- the report ------------------------------------------------------------------------------------

@torch.no_grad()
def _model_space(model: VAE, raw: np.ndarray) -> np.ndarray:
    return model.preprocess(torch.from_numpy(raw)).numpy()


@torch.no_grad()
def _elbo(model: VAE, raw: np.ndarray, seed: int, batch: int = 1000, what: str = "evaluate: ELBO"):
    gen = torch.Generator().manual_seed(seed)
    recon, kl, kl_dims, mu = [], [], [], []
    with Progress(what, len(raw), units=-(-len(raw) // batch)) as prog:
        for i in range(0, len(raw), batch):
            x = model.preprocess(torch.from_numpy(raw[i:i + batch]))
            out = model(x, generator=gen)
            recon.append(out.recon.numpy()), kl.append(out.kl.numpy())
            kl_dims.append(out.posterior.kl_per_dim().numpy()), mu.append(out.posterior.mean.numpy())
            prog.update(len(x))
    return np.concatenate(recon), np.concatenate(kl), np.concatenate(kl_dims), np.concatenate(mu)


@torch.no_grad()
def _decode_mse(model: VAE, z: np.ndarray, target: np.ndarray, batch: int = 1000) -> float:
    se = 0.0
    for i in range(0, len(z), batch):
        xh = model.mean_of(model.decode(torch.from_numpy(z[i:i + batch]))).numpy()
        se += float(((xh - target[i:i + batch]) ** 2).sum())
    return se / target.size


def evaluate_model(model: VAE, test_raw: np.ndarray, train_raw: np.ndarray, cfg: EvaluateConfig,
                   test_cols: dict, train_cols: dict, report_dir: str | None = None) -> tuple[dict, list[str]]:
    r: dict[str, Any] = {"records": int(len(test_raw)), "train_records": int(len(train_raw)), "note": NOTE,
                         "likelihood": model.config.likelihood, "latent_dim": model.config.latent_dim}
    recon, kl, kl_dims, mu = _elbo(model, test_raw, cfg.seed)
    r |= {"elbo": float(-(recon + kl).mean()), "recon_nll": float(recon.mean()), "kl": float(kl.mean()),
          "active_units": active_units(torch.from_numpy(kl_dims.mean(0)))}
    rng = np.random.default_rng(cfg.seed)
    sub = np.sort(rng.choice(len(test_raw), min(cfg.iw_records, len(test_raw)), replace=False))
    gen = torch.Generator().manual_seed(cfg.seed)
    iw = []
    with Progress(f"evaluate: IW log-likelihood (K={cfg.iw_samples})", len(sub), units=-(-len(sub) // 100)) as prog:
        for i in range(0, len(sub), 100):
            iw.append(model.iw_log_likelihood(torch.from_numpy(test_raw[sub[i:i + 100]]), cfg.iw_samples, gen).numpy())
            prog.update(len(iw[-1]))
    iw = np.concatenate(iw)
    r |= {"iw_log_likelihood": float(iw.mean()), "iw_samples": cfg.iw_samples, "iw_records": int(len(sub)),
          "elbo_on_iw_subset": float(-(recon + kl)[sub].mean())}

    # Compression: μ at each precision vs PCA with the same bytes per record.
    x_test, x_train = _model_space(model, test_raw), _model_space(model, train_raw)
    mu_train = _elbo(model, train_raw, cfg.seed, what="evaluate: μ of the training records")[3]
    L, D = model.config.latent_dim, model.config.input_dim
    full_pca = PCA(min(D, len(x_train))).fit(x_train)
    comp = {"raw_bytes_per_record": int(D), "raw_note": "uint8 records: one byte per value", "rows": []}
    for prec in PRECISIONS:
        b = bytes_per_record(L, prec)
        mse = _decode_mse(model, quantize(mu, prec, ref=mu_train), x_test)
        k = min(L, D, len(x_train))  # PCA codes stored at the same precision → same bytes per record
        pca = full_pca.top(k)
        zt = quantize(pca.transform(x_test), prec, ref=pca.transform(x_train))
        pmse = float(((pca.inverse(zt) - x_test) ** 2).mean())
        comp["rows"].append({"precision": prec, "bytes_per_record": b, "compression_ratio": D / b,
                             "vae_mse": mse, "vae_psnr_db": psnr(mse), "pca_components": k,
                             "pca_mse": pmse, "pca_psnr_db": psnr(pmse), "vae_over_pca_mse": mse / pmse if pmse else None})
    curve = []
    for k in sorted({2, 4, 8, 16, 32, 64, 128} | {L, 2 * L}):
        if k <= min(D, len(x_train)):
            p = full_pca.top(k)
            curve.append({"k": k, "bytes_fp16": 2 * k, "mse": float(((p.inverse(quantize(p.transform(x_test), "fp16")) - x_test) ** 2).mean())})
    comp["pca_curve_fp16"] = curve
    r["compression"] = comp

    pngs: list[str] = []
    labels = test_cols.get(cfg.labels) if cfg.labels else None
    if labels is not None:
        ytr, yte = np.asarray(train_cols[cfg.labels]), np.asarray(labels)
        pca = full_pca.top(L)
        feats = {"mu": (mu_train, mu), "raw": (x_train, x_test), "pca": (pca.transform(x_train), pca.transform(x_test))}
        seeds = range(cfg.seed, cfg.seed + cfg.label_draws)
        for key, probe in (("probe_error", probe_error), ("semi_supervised_error", spreading_error)):
            # probe_error: logistic regression on the labelled records only; semi_supervised_error:
            # label spreading over all training records (transductive). Mean over the label draws.
            mean, sd = {}, {}
            for n in (100, 600, 1000):
                if n > len(ytr):
                    continue
                errs = {name: [probe(a, ytr, b, yte, n, s) for s in seeds] for name, (a, b) in feats.items()}
                mean[str(n)] = {name: float(np.mean(e)) for name, e in errs.items()}
                sd[str(n)] = {name: float(np.std(e, ddof=1)) if len(e) > 1 else 0.0 for name, e in errs.items()}
            r[key], r[f"{key}_sd"] = mean, sd
        r["label_draws"] = cfg.label_draws
    if cfg.anomaly_label:
        r["anomaly_roc_auc"] = roc_auc(recon + kl, test_cols[cfg.anomaly_label])
    if report_dir:
        pngs = _figures(model, r, test_raw, mu, labels, report_dir)
    return r, pngs


def _figures(model, r, test_raw, mu, labels, out) -> list[str]:
    from pipeline import plots

    plt = plots._plt()
    os.makedirs(out, exist_ok=True)
    paths = [plots.samples_and_reconstructions(model, torch.from_numpy(test_raw[:16]).float(),
                                               os.path.join(out, "samples_reconstructions.png")),
             plots.latent_scatter(mu, labels, os.path.join(out, "latent_scatter.png"))]
    comp = r["compression"]
    fig, ax = plt.subplots(figsize=(5, 4))
    c = comp["pca_curve_fp16"]
    ax.plot([p["bytes_fp16"] for p in c], [p["mse"] for p in c], "o-", label="PCA (fp16 components)")
    ax.plot([p["bytes_per_record"] for p in comp["rows"]], [p["vae_mse"] for p in comp["rows"]], "s-", label="VAE μ (fp32/fp16/int8)")
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("bytes per record"), ax.set_ylabel("MSE (model units)")
    ax.legend(), ax.set_title("rate–distortion")
    fig.tight_layout(), fig.savefig(os.path.join(out, "rate_distortion.png"), dpi=90), plt.close(fig)
    paths.append(os.path.join(out, "rate_distortion.png"))
    if "probe_error" in r and r["probe_error"]:
        fig, ax = plt.subplots(figsize=(5, 4))
        ns = sorted(r["probe_error"], key=int)
        for name in ("mu", "pca", "raw"):
            ax.plot([int(n) for n in ns], [1 - r["probe_error"][n][name] for n in ns], "o-", label=f"{name}, logistic")
            if r.get("semi_supervised_error"):
                ax.plot([int(n) for n in ns], [1 - r["semi_supervised_error"][n][name] for n in ns], "s--",
                        label=f"{name}, label spreading")
        ax.set_xlabel("labels"), ax.set_ylabel("probe accuracy"), ax.legend()
        fig.tight_layout(), fig.savefig(os.path.join(out, "probe_accuracy.png"), dpi=90), plt.close(fig)
        paths.append(os.path.join(out, "probe_accuracy.png"))
    return paths


def flat_metrics(r: dict) -> dict[str, float]:
    m = {k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for row in r["compression"]["rows"]:
        for k in ("vae_mse", "pca_mse", "vae_psnr_db", "pca_psnr_db"):
            m[f"{row['precision']}_{k}"] = float(row[k])
    for key in ("probe_error", "probe_error_sd", "semi_supervised_error", "semi_supervised_error_sd"):
        for n, d in r.get(key, {}).items():
            for name, e in d.items():
                m[f"{key}_{name}_{n}"] = e
    return {f"eval_{k}": v for k, v in m.items() if math.isfinite(v)}


def run_evaluate(cfg: EvaluateConfig) -> dict:
    import tempfile

    tracking = cfg.resolved_tracking_uri()
    ref, blob = registry.load_model_bytes(cfg.model, tracking)
    model = model_from_checkpoint(load_checkpoint(blob))
    torch.manual_seed(cfg.seed)
    extra = [c for c in (cfg.labels, cfg.anomaly_label) if c]
    test_raw, test_cols = _read(cfg.input, model, extra)
    if cfg.train_input:
        train_raw, train_cols = _read(cfg.train_input, model, [cfg.labels] if cfg.labels else [])
    else:  # seeded half/half split of --input
        p = np.random.default_rng(cfg.seed).permutation(len(test_raw))
        a, b = p[: len(p) // 2], p[len(p) // 2:]
        train_raw, train_cols = test_raw[a], {k: v[a] for k, v in test_cols.items()}
        test_raw, test_cols = test_raw[b], {k: v[b] for k, v in test_cols.items()}
    report_dir = cfg.report or (tempfile.mkdtemp(prefix="vaepipe-eval-") if cfg.log_to_mlflow and ref.run_id else None)
    r, pngs = evaluate_model(model, test_raw, train_raw, cfg, test_cols, train_cols, report_dir)
    r["model"] = {"requested": cfg.model, "uri": ref.uri, "run_id": ref.run_id}
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w") as f:
            json.dump(r, f, indent=2)
    if cfg.log_to_mlflow and ref.run_id:
        import mlflow

        c = registry.client(tracking)
        ts = int(__import__("time").time() * 1000)
        c.log_batch(ref.run_id, metrics=[mlflow.entities.Metric(k, v, ts, 0) for k, v in flat_metrics(r).items()])
        for p in pngs + ([cfg.json] if cfg.json else []):
            c.log_artifact(ref.run_id, p, "evaluation")
    r["pngs"] = pngs
    return r


def table(r: dict) -> str:
    lines = [f"model {r['model']['uri']} on {r['records']} held-out records ({r['note']})",
             f"ELBO {r['elbo']:.2f}  recon {r['recon_nll']:.2f}  KL {r['kl']:.2f}  "
             f"IW log p(x) (K={r['iw_samples']}, {r['iw_records']} rec) {r['iw_log_likelihood']:.2f} "
             f"(ELBO on that subset {r['elbo_on_iw_subset']:.2f})  active units {r['active_units']}/{r['latent_dim']}",
             f"{'prec':>5} {'B/rec':>6} {'ratio':>6} {'VAE MSE':>9} {'PSNR':>6} {'PCA k':>5} {'PCA MSE':>9} {'PSNR':>6} {'VAE/PCA':>7}"]
    for row in r["compression"]["rows"]:
        lines.append(f"{row['precision']:>5} {row['bytes_per_record']:>6} {row['compression_ratio']:>6.1f} "
                     f"{row['vae_mse']:>9.5f} {row['vae_psnr_db']:>6.2f} {row['pca_components']:>5} "
                     f"{row['pca_mse']:>9.5f} {row['pca_psnr_db']:>6.2f} {row['vae_over_pca_mse']:>7.3f}")
    for key, what in (("probe_error", "logistic probe error"), ("semi_supervised_error", "label-spreading error")):
        for n, d in r.get(key, {}).items():
            sd = r[f"{key}_sd"][n]
            lines.append(f"{what}, {n:>4} labels (mean ± sd of {r['label_draws']} draws): "
                         + "  ".join(f"{name} {d[k]:.3f} ± {sd[k]:.3f}" for name, k in (("μ", "mu"), ("PCA", "pca"), ("raw", "raw"))))
    if "anomaly_roc_auc" in r:
        lines.append(f"anomaly ROC AUC (-ELBO): {r['anomaly_roc_auc']:.3f}")
    return "\n".join(lines)
