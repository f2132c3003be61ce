"""The evaluation report as text and as flat MLflow metrics (both read the dict evaluate builds)."""
from __future__ import annotations

import math


def flat_metrics(r: dict) -> dict[str, float]:
    m = {k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for row in r["compression"]["rows"]:
        for k in ("vae_mse", "pca_mse", "vae_psnr_db", "pca_psnr_db"):
            m[f"{row['precision']}_{k}"] = float(row[k])
    for key in ("probe_error", "probe_error_sd", "semi_supervised_error", "semi_supervised_error_sd"):
        for n, d in r.get(key, {}).items():
            for name, e in d.items():
                m[f"{key}_{name}_{n}"] = e
    for n, e in r.get("m2_error", {}).items():
        m[f"m2_error_{n}"], m[f"m2_error_sd_{n}"] = e, r["m2_error_sd"][n]
    return {f"eval_{k}": v for k, v in m.items() if math.isfinite(v)}


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
    for n, e in r.get("m2_error", {}).items():
        lines.append(f"M1+M2 error (vae.semi head, {r['m2_epochs']} epochs), {n:>4} labels (mean ± sd of "
                     f"{r['label_draws']} draws): {e:.3f} ± {r['m2_error_sd'][n]:.3f}")
    if r["active_units"] == 0:
        lines.append("posterior collapse: no latent unit is active (μ is the same for every record); retrain with a "
                     "lower --beta, --free-bits or --warmup-epochs")
    if "anomaly_roc_auc" in r:
        lines.append(f"anomaly ROC AUC (-ELBO): {r['anomaly_roc_auc']:.3f}")
    return "\n".join(lines)
