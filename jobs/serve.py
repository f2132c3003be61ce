"""Serve k-nearest-neighbour queries over HTTP from a latents table's index (Ray Serve): neighbours
of an id, of a vector, or (with --model) of a new record; a new index build is picked up without a
restart."""
import sys

from pipeline.serving.ray_app import ServeConfig as Config, run_serve


def run(cfg: Config):
    run_serve(cfg, ready=lambda line: print(line, flush=True))


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("serve", sys.argv[1:]))
