"""What this machine allows an encode of the benchmark model to reach, measured rather than assumed:
the model's compute alone (in memory, no I/O) on all cores as torch threads and on one thread, and
the Parquet decode alone (one thread, real MNIST tiled, in memory), scaled to `--records`.

    python -m pipeline.bench_bound --records 10000000

It prints the plain script's floor (decode, then encode on all threads, serially: what the
`vaepipe bench encode --whole-process` baseline does) and vaepipe's floor (one single-threaded
worker per core, each decoding and encoding its own row groups, no overhead at all), and their ratio:
an upper bound on `vaepipe encode`'s whole-process ratio at that size on this machine (imports,
Ray start, writing and commit only lower it)."""
from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.bench import BenchConfig, bench_model
from pipeline.datasets import mnist


def records_per_s(fn, n: int, repeats: int = 3) -> float:
    """The best of `repeats` timed calls of fn(), which handles n records."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000_000, help="the size the floors are scaled to")
    ap.add_argument("--sample", type=int, default=131_072, help="records actually timed")
    ap.add_argument("--batch-size", type=int, default=4096)
    args = ap.parse_args(argv)
    n, b = args.sample, args.batch_size
    model = bench_model(BenchConfig(what="encode"))
    x, _ = mnist()
    x8 = np.ascontiguousarray(np.resize(x.reshape(len(x), -1), (n, 784)))   # real digits, tiled

    def compute() -> None:
        with torch.inference_mode():
            for j in range(0, n, b):
                model.embed(torch.from_numpy(x8[j:j + b])).mean

    cores = os.cpu_count() or 1
    rates, before = {}, torch.get_num_threads()
    try:
        for threads in (cores, 1):
            torch.set_num_threads(threads)
            compute()                                               # warm-up
            rates[threads] = records_per_s(compute, n)
    finally:
        torch.set_num_threads(before)                               # a caller's thread count is its own
    table = pa.table({"id": pa.array(np.arange(n)),
                      "image": pa.FixedSizeListArray.from_arrays(pa.array(x8.ravel()), 784)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=65_536)                 # pyarrow's default codec (snappy)
    data = buf.getvalue()

    def decode() -> None:
        for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=b, columns=["id", "image"]):
            np.asarray(batch.column("image").flatten().to_numpy()).reshape(batch.num_rows, -1)

    dec = records_per_s(decode, n)
    N = args.records
    script_s = N / dec + N / rates[cores]                            # serial: decode, then all-thread compute
    pipe_s = N / (cores / (1 / dec + 1 / rates[1]))                  # one 1-thread worker per core
    out = {"records": N, "cores": cores, "compute_all_threads_records_per_s": rates[cores],
           "compute_1_thread_records_per_s": rates[1], "decode_1_thread_records_per_s": dec,
           "script_floor_s": script_s, "vaepipe_floor_s": pipe_s, "ratio_upper_bound": script_s / pipe_s,
           "load_avg": list(os.getloadavg())}
    print(f"bench bound: {N:,} records, {cores} cores, best of 3 over {n:,} timed records\n"
          f"  compute, {cores} threads: {rates[cores]:,.0f} records/s;  1 thread: {rates[1]:,.0f} records/s\n"
          f"  decode (Parquet -> uint8 numpy), 1 thread: {dec:,.0f} records/s\n"
          f"  plain script floor (decode, then compute on {cores} threads): {script_s:.1f} s\n"
          f"  vaepipe floor ({cores} one-thread workers, decode + compute each): {pipe_s:.1f} s\n"
          f"  upper bound on the whole-process ratio: {script_s / pipe_s:.2f}  (load {out['load_avg']})")
    return out


if __name__ == "__main__":
    main()
