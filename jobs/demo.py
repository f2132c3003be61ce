"""The whole pipeline end to end on bundled data: train → register → encode → query → figures."""
import sys

from pipeline.demo import DemoConfig as Config, run_demo


def run(cfg: Config):
    return run_demo(cfg)


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("demo", sys.argv[1:]))
