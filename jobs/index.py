"""Build the approximate-neighbour index of a committed latents table and keep it in the output's
control folder, tied to the files it was built from (`vaepipe query` uses it while it is fresh)."""
import sys

from pipeline.search.ann import IndexConfig as Config, build_index


def run(cfg: Config):
    return build_index(cfg)


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("index", sys.argv[1:]))
