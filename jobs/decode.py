"""Reconstruct records from latents (the decompression half of the round trip)."""
import sys

from pipeline.batch.decode import DecodeConfig as Config, run_decode


def run(cfg: Config):
    m = run_decode(cfg)
    print(f"decoded {m['rows']:,} records into {cfg.output} with {m['vaepipe.decoded_with']}")
    if cfg.reference:
        from pipeline.batch.decode import parse_storage_options, roundtrip_report

        r = roundtrip_report(cfg.model, cfg.reference, cfg.output, cfg.resolved_tracking_uri(), cfg.id_column,
                             parse_storage_options(cfg.storage_options), latents=cfg.input)
        m["report"] = r
        print(f"round trip over {r['records']:,} records ({r['latent_type']} latents, {r['latent_dim']} dims): "
              f"MSE {r['vae_mse']:.6f} vs PCA-{r['latent_dim']} {r['pca_mse']:.6f} "
              f"(ratio {r['vae_over_pca']:.2f}; model input units, [0,1] for 8-bit images)")
    return m


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("decode", sys.argv[1:]))
