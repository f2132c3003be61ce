"""Encode Parquet records to μ vectors (and optional logvar / anomaly score) with a registered model."""
import sys

from pipeline.batch.encode import EncodeConfig as Config, run_encode


def run(cfg: Config):
    r = run_encode(cfg)
    print(f"encoded {r.rows_out:,} of {r.rows_in:,} records ({r.skipped:,} skipped) into {r.files} file(s) at "
          f"{r.output} with {r.model_uri} in {r.wall_s:.1f} s ({r.records_per_s:,.0f} records/s)")
    if r.int8_error:
        e = r.int8_error
        print(f"int8 μ: RMS error {e['rmse']:.4g} ({100 * e['relative_rmse']:.2f} % of μ's RMS), "
              f"{100 * e['clipped_fraction']:.3f} % of values clipped at the scale")
    return r


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("encode", sys.argv[1:]))
