"""Benchmark vaepipe against a plain single-process PyTorch loop on the same machine, same model,
same batch size: `vaepipe bench encode --records N [--json FILE]` or `vaepipe bench train --records N`;
`vaepipe bench query --records N`: `vaepipe query` against DuckDB's SQL, both as whole processes;
`vaepipe bench encode --whole-process`: `vaepipe encode` against the plain script, both as processes.
Prints records/s for both, the ratio vaepipe/baseline and the peak RSS of the process tree
(docs/performance.md explains every figure)."""
import sys

from pipeline.measure.bench import BenchConfig as Config, run_bench, summary


def run(cfg: Config):
    figures = run_bench(cfg)
    print(summary(figures))
    if cfg.json:
        print(f"figures written to {cfg.json}")
    return figures


if __name__ == "__main__":
    from jobs.cli import bench_argv, run_job

    sys.exit(run_job("bench", bench_argv(sys.argv[1:])))
