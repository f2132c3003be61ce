"""Incremental, idempotent nightly encode: the partitions whose input files changed since they were
encoded, or that another model version encoded (and the ones whose last run failed)."""
import sys

from pipeline.batch.nightly import NightlyConfig as Config, run_nightly


def run(cfg: Config):
    r = run_nightly(cfg)   # prints a line per partition as it goes; a partial failure exits with status 3
    for part in r["current"]:
        print(f"current  {part}: input unchanged since {r['model_uri']} encoded it")
    print(f"nightly: {len(r['encoded'])} partition(s) encoded, {len(r['current'])} current, "
          f"with {r['model_uri']} in {r['wall_s']:.1f} s")
    return r


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("nightly", sys.argv[1:]))
