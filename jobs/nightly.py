"""Incremental, idempotent nightly encode: only partitions not yet encoded by this model version."""
import sys

from pipeline.nightly import NightlyConfig as Config, run_nightly


def run(cfg: Config):
    r = run_nightly(cfg)
    for part, rows in r["encoded"]:
        print(f"encoded  {part}: {rows:,} records")
    for part in r["skipped"]:
        print(f"skipped  {part}: already encoded by {r['model_uri']}")
    print(f"nightly: {len(r['encoded'])} partition(s) encoded, {len(r['skipped'])} skipped, "
          f"with {r['model_uri']} in {r['wall_s']:.1f} s")
    return r


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("nightly", sys.argv[1:]))
