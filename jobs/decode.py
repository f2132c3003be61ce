"""Reconstruct records from latents (the decompression half of the round trip)."""
import sys

from pipeline.batch.decode import DecodeConfig as Config, run_decode


def run(cfg: Config):
    m = run_decode(cfg)
    print(f"decoded {m['rows']:,} records into {cfg.output} with {m['vaepipe.decoded_with']}")
    if cfg.reference:
        from pipeline.batch.decode import parse_storage_options, roundtrip_report

        r = roundtrip_report(cfg.model, cfg.reference, cfg.output, cfg.resolved_tracking_uri(), cfg.id_column,
                             parse_storage_options(cfg.storage_options), latents=cfg.input, pca_fit=cfg.pca_fit)
        m["report"] = r
        print(f"round trip over {r['records']:,} records ({r['latent_type']} latents, {r['latent_dim']} dims): "
              f"MSE {r['vae_mse']:.6f} vs PCA-{r['latent_dim']} {r['pca_mse']:.6f} "
              f"(fit on {'these records' if not cfg.pca_fit else cfg.pca_fit}; ratio {r['vae_over_pca']:.2f}; "
              f"model input units), {r['active_units']}/{r['latent_dim']} active units"
              + (f"; the model's linear part alone {r['linear_path_mse']:.6f}" if "linear_path_mse" in r else ""))
        if "linear_path_mse" in r and r["vae_mse"] > r["linear_path_mse"]:
            print(f"warning: the model's nonlinear nets make these records' round trip worse than its linear (pPCA) "
                  f"part alone (MSE {r['vae_mse']:.6f} vs {r['linear_path_mse']:.6f}): the records differ from what "
                  f"it trained on; retrain on records like these", file=sys.stderr)
        if r["active_units"] == 0:
            print("warning: posterior collapse: no latent unit is active on these records (μ is the same for all); "
                  "retrain with a lower --beta, --free-bits or --warmup-epochs", file=sys.stderr)
    return m


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("decode", sys.argv[1:]))
