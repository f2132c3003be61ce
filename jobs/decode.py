"""Reconstruct records from latents (the decompression half of the round trip)."""
import sys

from pipeline.decode import DecodeConfig as Config, run_decode


def run(cfg: Config):
    m = run_decode(cfg)
    print(f"decoded {m['rows']:,} records into {cfg.output} with {m['vaepipe.decoded_with']}")
    return m


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("decode", sys.argv[1:]))
