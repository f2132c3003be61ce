"""Nearest neighbours by Euclidean distance on μ over latent Parquet, printed as a table."""
import os
import sys

# A query scores a few vectors against each row group: OpenBLAS's own thread pool spins more than it
# helps there (~0.15 s of CPU per million latents, measured), and the reader threads already use the
# cores. Only takes effect when numpy is not imported yet, i.e. in a `vaepipe query` process.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pipeline.search.query import QueryConfig as Config, format_rows, run_query


def run(cfg: Config):
    t = run_query(cfg)
    print(format_rows(t, cfg.format))
    return t


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("query", sys.argv[1:]))
