"""`vaepipe evaluate`: a quality report for a registered VAE on held-out records — ELBO / KL /
importance-weighted log-likelihood in nats, compression of μ (fp32/fp16/int8) against PCA at the
same bytes per record, few-label logistic-regression probes, active units, anomaly ROC AUC, PNGs;
figures go to JSON and to the model version's MLflow run.

This module computes the report; the maths is pipeline.evaluation.eval_metrics, the figures pipeline.models.plots,
the text table and flat metrics pipeline.evaluation.eval_report, the int8 format pipeline.table.quantize."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.models import registry
from pipeline.runtime.config import RuntimeConfig, opt, write_json
from pipeline.runtime.errors import ConfigError, SchemaError
from pipeline.evaluation.eval_metrics import (fit_pca, pca_codes, pca_reconstruct, probe_error, psnr, roc_auc,
                                   spreading_error)
from pipeline.evaluation.eval_report import flat_metrics
from pipeline.table.features import infer_spec, to_matrix
from pipeline.runtime.progress import Progress
from pipeline.table.quantize import PRECISIONS, bytes_per_record, stored
from vae.checkpoint import load_checkpoint, model_from_checkpoint
from vae.model import VAE
from vae.train_step import active_units

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
    m2_epochs: int = opt(0, "with --labels: also the M1+M2 probe (vae.semi): per label draw an M2 head fit for this "
                            "many epochs on the model's frozen q(z|x) of the training records (50 = the "
                            "protocol's setting; 0 = skip it: minutes on a CPU)")
    log_to_mlflow: bool = opt(True, "log metrics and PNGs to the model version's MLflow run")

    def __post_init__(self) -> None:
        self.require("model", "input")
        if self.iw_samples < 1 or self.iw_records < 1:
            raise ConfigError("iw_samples and iw_records must be ≥ 1")
        if self.m2_epochs < 0:
            raise ConfigError(f"m2_epochs must be ≥ 0, got {self.m2_epochs}")
        if self.label_draws < 1:
            raise ConfigError(f"label_draws must be ≥ 1, got {self.label_draws}")


# --- data ------------------------------------------------------------------------------------------

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
    """The report dict (likelihood, compression, probes, anomaly AUC) and its PNGs, if `report_dir`."""
    r: dict[str, Any] = {"records": int(len(test_raw)), "train_records": int(len(train_raw)), "note": NOTE,
                         "likelihood": model.config.likelihood, "latent_dim": model.config.latent_dim}
    recon, kl, kl_dims, mu = _elbo(model, test_raw, cfg.seed)
    r |= _likelihood(model, test_raw, recon, kl, kl_dims, cfg)
    x_test, x_train = _model_space(model, test_raw), _model_space(model, train_raw)
    mu_train = _elbo(model, train_raw, cfg.seed)[3]
    full_pca = fit_pca(x_train, min(model.config.input_dim, len(x_train)))
    r["compression"] = _compression(model, mu, mu_train, x_test, x_train, full_pca)
    labels = test_cols.get(cfg.labels) if cfg.labels else None
    if labels is not None:
        feats = {"mu": (mu_train, mu), "raw": (x_train, x_test),
                 "pca": (pca_codes(full_pca, x_train, model.config.latent_dim),
                         pca_codes(full_pca, x_test, model.config.latent_dim))}
        r |= _probes(feats, np.asarray(train_cols[cfg.labels]), np.asarray(labels), cfg)
        if cfg.m2_epochs:
            r |= _m2_probe(model, train_raw, test_raw, np.asarray(train_cols[cfg.labels]), np.asarray(labels), cfg)
    if cfg.anomaly_label:
        r["anomaly_roc_auc"] = roc_auc(recon + kl, test_cols[cfg.anomaly_label])
    pngs: list[str] = []
    if report_dir:
        from pipeline.models import plots

        pngs = plots.evaluation_figures(model, r, test_raw, mu, labels, report_dir)
    return r, pngs


def _likelihood(model: VAE, test_raw, recon, kl, kl_dims, cfg: EvaluateConfig) -> dict[str, Any]:
    """ELBO terms on every test record, and the importance-weighted log p(x) on a seeded subset."""
    r = {"elbo": float(-(recon + kl).mean()), "recon_nll": float(recon.mean()), "kl": float(kl.mean()),
         "active_units": active_units(torch.from_numpy(kl_dims.mean(0)))}
    rng = np.random.default_rng(cfg.seed)
    sub = np.sort(rng.choice(len(test_raw), min(cfg.iw_records, len(test_raw)), replace=False))
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        iw = np.concatenate([model.iw_log_likelihood(torch.from_numpy(test_raw[sub[i:i + 100]]), cfg.iw_samples, gen).numpy()
                             for i in range(0, len(sub), 100)])
    return r | {"iw_log_likelihood": float(iw.mean()), "iw_samples": cfg.iw_samples, "iw_records": int(len(sub)),
                "elbo_on_iw_subset": float(-(recon + kl)[sub].mean())}


def _compression(model: VAE, mu, mu_train, x_test, x_train, full_pca) -> dict[str, Any]:
    """μ stored at each precision (int8: the symmetric per-dimension format encode writes, scales
    from the training records' μ) against PCA codes stored the same way, at the same bytes/record."""
    L, D = model.config.latent_dim, model.config.input_dim
    comp: dict[str, Any] = {"raw_bytes_per_record": int(D), "raw_note": "uint8 records: one byte per value",
                            "int8_format": "symmetric per dimension, scale max|μ_j|/127", "rows": []}
    k = min(L, D, len(x_train))   # PCA codes stored at the same precision → same bytes per record
    for prec in PRECISIONS:
        b = bytes_per_record(L, prec)
        mse = _decode_mse(model, stored(mu, prec, ref=mu_train), x_test)
        zt = stored(pca_codes(full_pca, x_test, k), prec, ref=pca_codes(full_pca, x_train, k))
        pmse = float(((pca_reconstruct(full_pca, zt) - x_test) ** 2).mean())
        comp["rows"].append({"precision": prec, "bytes_per_record": b, "compression_ratio": D / b,
                             "vae_mse": mse, "vae_psnr_db": psnr(mse), "pca_components": k,
                             "pca_mse": pmse, "pca_psnr_db": psnr(pmse), "vae_over_pca_mse": mse / pmse if pmse else None})
    curve = []
    for kk in sorted({2, 4, 8, 16, 32, 64, 128} | {L, 2 * L}):
        if kk <= min(D, len(x_train)):
            z = stored(pca_codes(full_pca, x_test, kk), "fp16")
            curve.append({"k": kk, "bytes_fp16": 2 * kk, "mse": float(((pca_reconstruct(full_pca, z) - x_test) ** 2).mean())})
    comp["pca_curve_fp16"] = curve
    return comp


def _probes(feats: dict, ytr: np.ndarray, yte: np.ndarray, cfg: EvaluateConfig) -> dict[str, Any]:
    """probe_error: logistic regression on the labelled records only; semi_supervised_error: label
    spreading over all training records (transductive). Mean and sd over the seeded label draws."""
    r: dict[str, Any] = {"label_draws": cfg.label_draws}
    seeds = range(cfg.seed, cfg.seed + cfg.label_draws)
    for key, probe in (("probe_error", probe_error), ("semi_supervised_error", spreading_error)):
        mean, sd = {}, {}
        for n in (100, 600, 1000):
            if n > len(ytr):
                continue
            errs = {name: [probe(a, ytr, b, yte, n, s) for s in seeds] for name, (a, b) in feats.items()}
            mean[str(n)] = {name: float(np.mean(e)) for name, e in errs.items()}
            sd[str(n)] = {name: float(np.std(e, ddof=1)) if len(e) > 1 else 0.0 for name, e in errs.items()}
        r[key], r[f"{key}_sd"] = mean, sd
    return r


def _m2_probe(model: VAE, train_raw, test_raw, ytr: np.ndarray, yte: np.ndarray, cfg: EvaluateConfig) -> dict[str, Any]:
    """M1+M2 (Kingma et al. 2014, two-stage): per balanced label draw, an M2 head (vae.semi) fit on the
    frozen model's q(z|x) of every training record, those outside the draw unlabelled; error of
    argmax q(y|μ) on the test records. Mean and sd over the draws, as the other probes."""
    from pipeline.evaluation.probes import m2_error, posterior

    mu_tr, lv_tr = posterior(model, train_raw)
    mu_te, _ = posterior(model, test_raw)
    mean, sd = {}, {}
    for n in (100, 600, 1000):
        if n > len(ytr):
            continue
        errs = [m2_error(mu_tr, lv_tr, ytr, mu_te, yte, n, s, cfg.m2_epochs)
                for s in range(cfg.seed, cfg.seed + cfg.label_draws)]
        mean[str(n)] = float(np.mean(errs))
        sd[str(n)] = float(np.std(errs, ddof=1)) if len(errs) > 1 else 0.0
    return {"m2_error": mean, "m2_error_sd": sd, "m2_epochs": cfg.m2_epochs}


def _split_input(test_raw, test_cols, seed: int):
    """A seeded half/half split of --input: (train_raw, train_cols, test_raw, test_cols)."""
    p = np.random.default_rng(seed).permutation(len(test_raw))
    a, b = p[: len(p) // 2], p[len(p) // 2:]
    return test_raw[a], {k: v[a] for k, v in test_cols.items()}, test_raw[b], {k: v[b] for k, v in test_cols.items()}


def run_evaluate(cfg: EvaluateConfig) -> dict:
    tracking = cfg.resolved_tracking_uri()
    ref, blob = registry.load_model_bytes(cfg.model, tracking)
    model = model_from_checkpoint(load_checkpoint(blob))
    torch.manual_seed(cfg.seed)
    extra = [c for c in (cfg.labels, cfg.anomaly_label) if c]
    test_raw, test_cols = _read(cfg.input, model, extra)
    if cfg.train_input:
        train_raw, train_cols = _read(cfg.train_input, model, [cfg.labels] if cfg.labels else [])
    else:
        train_raw, train_cols, test_raw, test_cols = _split_input(test_raw, test_cols, cfg.seed)
    report_dir = cfg.report or (tempfile.mkdtemp(prefix="vaepipe-eval-") if cfg.log_to_mlflow and ref.run_id else None)
    r, pngs = evaluate_model(model, test_raw, train_raw, cfg, test_cols, train_cols, report_dir)
    r["model"] = {"requested": cfg.model, "uri": ref.uri, "run_id": ref.run_id}
    if cfg.json:
        write_json(cfg.json, r)
    if cfg.log_to_mlflow and ref.run_id:
        registry.log_evaluation(ref.run_id, flat_metrics(r), pngs + ([cfg.json] if cfg.json else []), tracking)
    r["pngs"] = pngs
    return r
