"""The k nearest neighbours of every record of a latents folder, as a Ray Data batch job, committed
atomically (id, neighbours, distances); exact by default, or approximate with `--index usearch`
(recall@k against exact search printed)."""
import sys

from pipeline.batch.neighbours import NeighboursConfig as Config, run_neighbours


def run(cfg: Config):
    r = run_neighbours(cfg)
    extra = ""
    if r.index != "exact":
        extra = f"; index built in {r.index_build_s:.1f} s"
        if r.recall is not None:
            extra += f"; recall@{r.k} against exact search on {cfg.recall_sample:,} records: {r.recall:.4f}"
    print(f"neighbours: {r.rows:,} records × {r.k} ({r.index}) into {r.files} file(s) at {r.output} "
          f"in {r.wall_s:.1f} s{extra}")
    return r


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("neighbours", sys.argv[1:]))
