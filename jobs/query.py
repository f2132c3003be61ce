"""Nearest neighbours by Euclidean distance on μ over latent Parquet, printed as a table."""
import sys

from pipeline.query import QueryConfig as Config, format_rows, run_query


def run(cfg: Config):
    t = run_query(cfg)
    print(format_rows(t, cfg.format))
    return t


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("query", sys.argv[1:]))
