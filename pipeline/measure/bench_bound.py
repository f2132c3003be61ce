"""What this machine allows an encode of the benchmark model to reach, measured rather than assumed:
the model's compute alone (in memory, no I/O) on all cores as torch threads and on one thread, and
the Parquet decode alone (one thread, real MNIST tiled, in memory), scaled to `--records`.

    python -m pipeline.measure.bench_bound --records 10000000

It prints the plain script's floor (decode, then encode on all threads, serially: what the
`vaepipe bench encode --whole-process` baseline does) and vaepipe's floor (one single-threaded
worker per core, each decoding and encoding its own row groups, no overhead at all), and their ratio:
an upper bound on `vaepipe encode`'s whole-process ratio at that size on this machine (imports,
Ray start, writing and commit only lower it). That floor takes one thread's rate times the core
count; the last line measures instead one single-threaded process per core decoding and encoding at
the same time (what the actor path runs), which shares caches, memory bandwidth and, on a VM's
vCPUs, possibly one physical core: the bound it gives is the one that holds."""
from __future__ import annotations

import argparse
import io
import os
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.measure.bench_common import BenchConfig, bench_model
from pipeline.evaluation.datasets import mnist


def records_per_s(fn, n: int, repeats: int = 3) -> float:
    """The best of `repeats` timed calls of fn(), which handles n records."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def _worker_loop(n: int, b: int, rounds: int, barrier, out) -> None:
    """One single-threaded worker of `concurrent_rate`: its own model and Parquet bytes, then `rounds`
    timed passes of decode + compute over n records, each started with the others (the barrier)."""
    torch.set_num_threads(1)
    model = bench_model(BenchConfig(what="encode"))
    data = _parquet_bytes(_tiled_digits(n))
    for _ in range(rounds):
        barrier.wait()
        t0 = time.time()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")   # Arrow's buffers are read-only
            for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=b, columns=["id", "image"]):
                x = np.asarray(batch.column("image").flatten().to_numpy()).reshape(batch.num_rows, -1)
                model.embed(torch.from_numpy(x)).mean
        out.put((t0, time.time()))


def concurrent_rate(n: int, b: int, workers: int, rounds: int = 3) -> float:
    """Records/s of `workers` single-threaded processes at once, each decoding and encoding its own n
    records (the best of `rounds` passes): what one-thread workers on every core really reach, with
    whatever the cores share (caches, memory bandwidth, hyperthread siblings), unlike one thread
    alone times the core count."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")    # torch's thread pools do not survive fork
    barrier, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker_loop, args=(n, b, rounds, barrier, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    times = [out.get(timeout=600) for _ in range(workers * rounds)]
    for p in procs:
        p.join()
    # sorted by start, each run of `workers` entries is one round (the barrier keeps them in step)
    starts = sorted(times)
    best = min(max(e for _, e in starts[i:i + workers]) - min(s for s, _ in starts[i:i + workers])
               for i in range(0, len(starts), workers))
    return workers * n / best


def _tiled_digits(n: int) -> np.ndarray:
    """(n, 784) uint8: the real MNIST digits, tiled."""
    x, _ = mnist()
    return np.ascontiguousarray(np.resize(x.reshape(len(x), -1), (n, 784)))


def _parquet_bytes(x8: np.ndarray) -> bytes:
    """The images with ids as one Parquet file in memory: 65,536-row groups, zstd (as `vaepipe bench`
    writes its input; snappy decoded ~6 % faster here)."""
    table = pa.table({"id": pa.array(np.arange(len(x8))),
                      "image": pa.FixedSizeListArray.from_arrays(pa.array(x8.ravel()), 784)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=65_536, compression="zstd")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000_000, help="the size the floors are scaled to")
    ap.add_argument("--sample", type=int, default=131_072, help="records actually timed")
    ap.add_argument("--batch-size", type=int, default=4096)
    args = ap.parse_args(argv)
    n, b = args.sample, args.batch_size
    model = bench_model(BenchConfig(what="encode"))
    x8 = _tiled_digits(n)

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
    data = _parquet_bytes(x8)

    def decode() -> None:
        for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=b, columns=["id", "image"]):
            np.asarray(batch.column("image").flatten().to_numpy()).reshape(batch.num_rows, -1)

    dec = records_per_s(decode, n)
    N = args.records
    script_s = N / dec + N / rates[cores]                            # serial: decode, then all-thread compute
    pipe_s = N / (cores / (1 / dec + 1 / rates[1]))                  # one 1-thread worker per core
    both = concurrent_rate(n, b, cores)
    out = {"records": N, "cores": cores, "compute_all_threads_records_per_s": rates[cores],
           "compute_1_thread_records_per_s": rates[1], "decode_1_thread_records_per_s": dec,
           "script_floor_s": script_s, "vaepipe_floor_s": pipe_s, "ratio_upper_bound": script_s / pipe_s,
           "concurrent_workers_records_per_s": both, "vaepipe_floor_concurrent_s": N / both,
           "ratio_bound_concurrent": script_s / (N / both), "load_avg": list(os.getloadavg())}
    print(f"bench bound: {N:,} records, {cores} cores, best of 3 over {n:,} timed records\n"
          f"  compute, {cores} threads: {rates[cores]:,.0f} records/s;  1 thread: {rates[1]:,.0f} records/s\n"
          f"  decode (Parquet -> uint8 numpy), 1 thread: {dec:,.0f} records/s\n"
          f"  plain script floor (decode, then compute on {cores} threads): {script_s:.1f} s\n"
          f"  vaepipe floor ({cores} one-thread workers, decode + compute each): {pipe_s:.1f} s\n"
          f"  upper bound on the whole-process ratio: {script_s / pipe_s:.2f}  (load {out['load_avg']})\n"
          f"  measured, {cores} one-thread workers at once (decode + compute each): {both:,.0f} records/s; "
          f"vaepipe floor {N / both:.1f} s; bound {script_s / (N / both):.2f}")
    return out


if __name__ == "__main__":
    main()
