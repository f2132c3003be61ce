"""Encode Parquet records to μ vectors (and optional logvar / anomaly score) with a registered model."""
import sys

from pipeline.encode import EncodeConfig as Config, run_encode


def run(cfg: Config):
    r = run_encode(cfg)
    print(f"encoded {r.rows_out:,} of {r.rows_in:,} records ({r.skipped:,} skipped) into {r.files} file(s) at "
          f"{r.output} with {r.model_uri} in {r.wall_s:.1f} s ({r.records_per_s:,.0f} records/s)")
    return r


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("encode", sys.argv[1:]))
