"""`vaepipe bench encode|train`: vaepipe against a plain single-process PyTorch loop, in one process,
on the same generated input, with the same model and batch size.

Input: MNIST-like records (id, label, image = fixed_size_list<uint8>[784]) tiled from
the shipped mnist_8k.npz and written to Parquet (zstd, row groups of `row_group_rows`), kept under
WORKDIR/bench/ and reused by later runs with the same shape.

encode  (a) baseline: pyarrow `read_row_group` → `FixedSizeList.flatten().to_numpy().reshape` (no copy)
            → torch (all cores as intra-op threads) → `model.embed(...).mean` → Parquet with a
            fixed_size_list μ column, one output file per input file;
        (b) vaepipe: `pipeline.batch.encode.run_encode` (Ray Data, one single-threaded actor per core,
            units of whole row groups, atomic commit).
        Both sides run once on a small input first (warm-up: imports, kernels, Ray start), then
        are timed on the full input. `pipeline_records_per_s` is the whole `run_encode` call (plan,
        footers, actor start and model load, encode, commit) with Ray already running;
        `pipeline_steady_records_per_s` is records over the span from the first unit's start to the
        last unit's end (no actor start); both are reported.
train   (a) baseline: the Parquet read once into a uint8 tensor, then `vae.train_step.train_epoch`
            over shuffled batches (randperm), AdamW, all cores as threads;
        (b) vaepipe: `pipeline.training.train.run_train` with 1 Ray Train worker (Ray Data reads the input,
            the worker caches its shard and shuffles it per epoch; a checkpoint and a journal line
            every epoch, which the driver logs to MLflow).
        Steady state = records/s over the epochs after the first (the warm-up epoch) on each side;
        Ray is started before either side; with `--repeats R` the sides alternate R times and the
        best run of each is reported (this VM's epoch times vary ±20 % run to run). The end-to-end
        walls are reported too.

Peak memory is the RSS of this process and every descendant (Ray's raylet, GCS and workers included)
sampled from /proc during each timed side."""
from __future__ import annotations

import os
import shutil
import time
import warnings
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.runtime.config import write_json
from pipeline.measure.bench_common import (BenchConfig, PeakRSS, _compare, bench_model, check_device, device_name,
                                            make_input)

# --- memory -------------------------------------------------------------------------------------

# --- input --------------------------------------------------------------------------------------

def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# --- encode -------------------------------------------------------------------------------------

def baseline_encode(files: list[str], out_dir: str, model, batch_size: int, threads: int, device: str = "cpu") -> int:
    """The plain single-process loop a good engineer writes: no per-row Python, no extra copies,
    inference mode, all cores as torch threads. Returns the records written."""
    from pipeline.table.features import fixed_size_list

    torch.set_num_threads(threads)
    device = torch.device(device)
    model = model.to(device)
    os.makedirs(out_dir, exist_ok=True)
    dim, rows = model.config.input_dim, 0
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")   # Arrow buffers are read-only
        for i, path in enumerate(files):
            pf = pq.ParquetFile(path, pre_buffer=True)
            with pq.ParquetWriter(os.path.join(out_dir, f"part-{i:05d}.parquet"),
                                  pa.schema([("id", pa.int64()), ("mu", pa.list_(pa.float32(), model.config.latent_dim))]),
                                  compression="zstd") as w:
                for rg in range(pf.num_row_groups):
                    t = pf.read_row_group(rg, columns=["id", "image"])
                    x = torch.from_numpy(t.column("image").combine_chunks().flatten().to_numpy().reshape(-1, dim))
                    if device.type == "cuda":
                        x = x.pin_memory()
                    mu = torch.empty(len(x), model.config.latent_dim)
                    for j in range(0, len(x), batch_size):
                        mu[j:j + batch_size] = model.embed(x[j:j + batch_size].to(device, non_blocking=True)).mean.cpu()
                    w.write_table(pa.table({"id": t.column("id"), "mu": fixed_size_list(mu.numpy())}))
                    rows += t.num_rows
    return rows


def _pipeline_encode(cfg: BenchConfig, input_dir: str, out_dir: str, blob: tuple, device: str = "cpu"):
    from pipeline.batch.encode import EncodeConfig, run_encode

    # executor="ray" by default: this side is the Ray Data actor path (its figures in
    # docs/performance.md); --executor auto would keep the job in this process, beside the Ray started
    # above, which is what --executor local measures
    ecfg = EncodeConfig(model=blob[0].uri, input=input_dir, output=out_dir, keep=["id"], batch_size=cfg.bs,
                        executor=cfg.executor,
                        concurrency=cfg.concurrency, workdir=cfg.workdir, ray_address=cfg.ray_address,
                        use_gpu=device == "cuda",
                        tracking_uri=f"sqlite:///{os.path.abspath(os.path.join(input_dir, '..', 'mlflow.db'))}")
    return run_encode(ecfg, models=(*blob, []))


def alternate(repeats: int, run_side) -> tuple[list[dict], list[dict]]:
    """Both sides `repeats` times, alternating which goes first (baseline first on even rounds), each
    under a peak-RSS sampler with torch's thread count restored after it. `run_side(side, r)` returns
    a dict of figures; each gets its `peak` (MB) and `wall` (s). Returns (baseline runs, vaepipe runs)."""
    runs: dict[str, list[dict]] = {"baseline": [], "vaepipe": []}
    for r in range(repeats):
        for side in (("baseline", "vaepipe") if r % 2 == 0 else ("vaepipe", "baseline")):
            torch_threads = torch.get_num_threads()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                d = run_side(side, r)
                wall = time.perf_counter() - t0
            torch.set_num_threads(torch_threads)
            runs[side].append({**d, "wall": wall, "peak": mem.peak_mb, "peak_pss": mem.peak_pss_mb})
    return runs["baseline"], runs["vaepipe"]


def bench_encode(cfg: BenchConfig) -> dict[str, Any]:
    from pipeline.runtime.ray_runtime import init_ray
    from pipeline.models.registry import ModelRef
    from vae.checkpoint import checkpoint_bytes

    root = os.path.abspath(os.path.join(cfg.workdir, "bench"))
    device = check_device(cfg)
    threads = cfg.threads or os.cpu_count() or 1
    files = make_input(os.path.join(root, f"input-{cfg.records}-{cfg.row_group_rows}-{cfg.file_rows}"),
                       cfg.records, cfg.row_group_rows, cfg.file_rows)
    input_dir = os.path.dirname(files[0])
    warm_n = min(cfg.records, 2 * cfg.row_group_rows, 131_072)
    warm_files = make_input(os.path.join(root, f"warmup-{warm_n}-{cfg.row_group_rows}"),
                            warm_n, max(1, cfg.row_group_rows // 2), cfg.file_rows)
    model = bench_model(cfg)
    blob = (ModelRef(name="bench", version="1", run_id=None, uri="models:/bench/1", requested="random-init MLP"),
            checkpoint_bytes(model))
    out = os.path.join(root, "out")
    shutil.rmtree(out, ignore_errors=True)
    # Warm-up: both paths once on a small input (imports, kernels, page cache, Ray start).
    baseline_encode(warm_files, os.path.join(out, "warm-baseline"), model, cfg.bs, threads, device)
    init_ray(cfg.ray_address)
    _pipeline_encode(cfg, os.path.dirname(warm_files[0]), os.path.join(out, "warm-vaepipe"), blob, device)

    def run_side(side: str, r: int) -> dict:
        dst = os.path.join(out, side)
        shutil.rmtree(dst, ignore_errors=True)
        if side == "baseline":
            rows, res = baseline_encode(files, dst, model, cfg.bs, threads, device), None
        else:
            res = _pipeline_encode(cfg, input_dir, dst, blob, device)
            rows = res.rows_out
        if rows != cfg.records:
            raise RuntimeError(f"bench: {side} wrote {rows} records, expected {cfg.records}")
        return {"res": res}

    load_before = _load()
    base, pipe = alternate(cfg.n_repeats, run_side)
    load_after = _load()
    b = min(base, key=lambda d: d["wall"])
    p = min(pipe, key=lambda d: d["wall"])
    span = p["res"].units_span_s or p["wall"]
    diff = _compare(os.path.join(out, "baseline"), os.path.join(out, "vaepipe"))
    n = cfg.records
    figures = {
        "what": "encode", "records": n, "batch_size": cfg.bs, "device": device_name(device),
        "baseline_records_per_s": n / b["wall"], "pipeline_records_per_s": n / p["wall"],
        "ratio": b["wall"] / p["wall"],
        "pipeline_steady_records_per_s": n / span, "steady_ratio": b["wall"] / span,
        "baseline_wall_s": b["wall"], "pipeline_wall_s": p["wall"], "pipeline_units_span_s": span,
        "peak_rss_mb": max(d["peak"] for d in pipe), "baseline_peak_rss_mb": max(d["peak"] for d in base),
        "peak_pss_mb": max(d["peak_pss"] for d in pipe), "baseline_peak_pss_mb": max(d["peak_pss"] for d in base),
        "baseline_threads": threads,
        "pipeline_executor": cfg.executor,
        "pipeline_actors": (cfg.concurrency or (torch.cuda.device_count() if device == "cuda" else os.cpu_count())
                            if cfg.executor == "ray" else None),
        "pipeline_threads": threads if cfg.executor == "local" else None,
        "pipeline_files": p["res"].files, "repeats": cfg.n_repeats,
        "all_baseline_walls_s": [d["wall"] for d in base], "all_pipeline_walls_s": [d["wall"] for d in pipe],
        "max_abs_mu_diff": diff, "load_avg_before": load_before, "load_avg_after": load_after,
        "notes": ("pipeline = whole run_encode call after a warm-up run (Ray already up; includes planning, "
                  "actor start + model load, encode, atomic commit); steady = first unit start to last unit end; "
                  "peak_rss_mb = process tree incl. Ray during the vaepipe run"),
    }
    shutil.rmtree(out, ignore_errors=True)
    return figures


# --- train --------------------------------------------------------------------------------------

def baseline_train(files: list[str], model, epochs: int, batch_size: int, threads: int, lr: float = 2e-3,
                   seed: int = 0, device: str = "cpu", amp: str = "off") -> tuple[list[float], float]:
    """Plain PyTorch: read the Parquet once into a uint8 tensor, then `train_epoch` over randperm
    batches with AdamW (under autocast for `amp`, fp16 with a GradScaler, as vaepipe's loop).
    Returns the epoch walls and the read time."""
    from vae.loss import kl_weight
    from vae.train_step import cosine_lr, train_epoch

    torch.set_num_threads(threads)
    device = torch.device(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        parts = [torch.from_numpy(pq.read_table(f, columns=["image"]).column("image").combine_chunks().flatten()
                                  .to_numpy().reshape(-1, 784)) for f in files]
    x = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
    read_s = time.perf_counter() - t0
    torch.manual_seed(seed)
    model = model.to(device).train()
    opt_ = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    walls = []
    for epoch in range(epochs):
        lr_e = cosine_lr(lr, epoch, epochs)   # the schedule vaepipe's train uses
        for g in opt_.param_groups:
            g["lr"] = lr_e
        t = time.perf_counter()
        perm = torch.randperm(len(x))
        batches = (x[perm[i:i + batch_size]] for i in range(0, len(x), batch_size))
        stats = train_epoch(model, batches, opt_, kl_weight(1.0, epoch + 1, 0.0), 0.0, device, amp, scaler)
        if device.type == "cuda":
            torch.cuda.synchronize()   # the epoch's wall includes its last kernels
        walls.append(time.perf_counter() - t)
        if stats.records != len(x):
            raise RuntimeError(f"bench: baseline trained on {stats.records} records, expected {len(x)}")
    return walls, read_s


def bench_train(cfg: BenchConfig) -> dict[str, Any]:
    from pipeline.runtime.ray_runtime import init_ray
    from pipeline.training.run_store import RunStore
    from pipeline.training.train import TrainConfig, run_train

    root = os.path.abspath(os.path.join(cfg.workdir, "bench"))
    device = check_device(cfg)
    files = make_input(os.path.join(root, f"input-{cfg.records}-{cfg.row_group_rows}-{cfg.file_rows}"),
                       cfg.records, cfg.row_group_rows, cfg.file_rows)
    threads = cfg.threads or os.cpu_count() or 1
    run_root = os.path.join(root, "train-run")
    shutil.rmtree(run_root, ignore_errors=True)
    os.makedirs(run_root)
    n = cfg.records
    # Ray is started first (not timed), so both sides run on the same machine state; the sides then
    # alternate `--repeats` times and each side's best steady-state run is reported.
    init_ray(cfg.ray_address, reserve_cpus=1 * 1.0 + 1)   # as run_train sizes it
    def run_side(side: str, r: int) -> dict:
        if side == "baseline":
            walls, read_s = baseline_train(files, bench_model(cfg), cfg.epochs, cfg.bs, threads, device=device,
                                           amp=cfg.amp)
            extra = {"read_s": read_s}
        else:
            tcfg = TrainConfig(
                input=os.path.dirname(files[0]), features=["image"], arch="mlp", latent_dim=cfg.latent_dim,
                hidden=list(cfg.hidden), scaling="uint8", likelihood="bernoulli", epochs=cfg.epochs,
                batch_size=cfg.bs, val_fraction=0.0, workers=1, promote="never", model_name="bench",
                experiment="bench", run_name=f"bench-train-{r}", storage_path=os.path.join(run_root, "ray"),
                workdir=run_root, tracking_uri=f"sqlite:///{os.path.join(run_root, 'mlflow.db')}",
                ray_address=cfg.ray_address, max_failures=0, use_gpu=device == "cuda", amp=cfg.amp)
            res = run_train(tcfg)
            journal = RunStore(res.run_dir).journal()
            walls = [j["epoch_time_s"] for j in sorted(journal, key=lambda j: j["epoch"])]
            extra = {"final_train_neg_elbo": journal[-1].get("train_neg_elbo")}
        if len(walls) != cfg.epochs:
            raise RuntimeError(f"bench: {side} ran {len(walls)} epochs, expected {cfg.epochs}")
        sps = n * (len(walls) - 1) / sum(walls[1:])   # steady state: epoch 1 is warm-up
        return {"sps": sps, "walls": walls, **extra}

    load_before = _load()
    base, pipe = alternate(cfg.n_repeats, run_side)
    load_after = _load()
    b = max(base, key=lambda d: d["sps"])
    p = max(pipe, key=lambda d: d["sps"])
    figures = {
        "what": "train", "records": n, "batch_size": cfg.bs, "epochs": cfg.epochs, "device": device_name(device),
        "amp": cfg.amp,
        "baseline_records_per_s": b["sps"], "pipeline_records_per_s": p["sps"], "ratio": p["sps"] / b["sps"],
        "baseline_epoch_s": b["walls"], "pipeline_epoch_s": p["walls"],
        "baseline_end_to_end_s": b["wall"], "pipeline_end_to_end_s": p["wall"], "end_to_end_ratio": b["wall"] / p["wall"],
        "baseline_read_s": b["read_s"], "final_train_neg_elbo": p["final_train_neg_elbo"],
        "peak_rss_mb": max(d["peak"] for d in pipe), "baseline_peak_rss_mb": max(d["peak"] for d in base),
        "peak_pss_mb": max(d["peak_pss"] for d in pipe), "baseline_peak_pss_mb": max(d["peak_pss"] for d in base),
        "repeats": cfg.n_repeats, "all_baseline_records_per_s": [d["sps"] for d in base],
        "all_pipeline_records_per_s": [d["sps"] for d in pipe],
        "baseline_threads": threads, "pipeline_workers": 1, "load_avg_before": load_before, "load_avg_after": load_after,
        "notes": ("records/s = steady state over epochs 2..E (epoch 1 is warm-up) on each side, best of the "
                  "alternating repeats; end to end: baseline = read + all epochs, vaepipe = whole run_train (Ray "
                  "already up; includes Ray Data read, Train worker start, per-epoch checkpoints + MLflow, "
                  "registration, figures)"),
    }
    shutil.rmtree(run_root, ignore_errors=True)
    return figures


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    if cfg.what == "query":
        from pipeline.measure.bench_whole import bench_query

        figures = bench_query(cfg)
    elif cfg.what == "index":
        from pipeline.measure.bench_index import bench_index

        figures = bench_index(cfg)
    elif cfg.what == "encode" and cfg.whole_process:
        from pipeline.measure.bench_whole import bench_encode_whole

        figures = bench_encode_whole(cfg)
    else:
        figures = bench_encode(cfg) if cfg.what == "encode" else bench_train(cfg)
    figures["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    figures["torch"] = torch.__version__
    if cfg.json:
        write_json(cfg.json, figures)
    return figures


def summary(f: dict[str, Any]) -> str:
    if f["what"] == "index":
        from pipeline.measure.bench_index import summary_index

        return summary_index(f)
    if f["what"] == "query":
        return "\n".join([
            f"bench query: {f['records']:,} latents × {f['latent_dim']} in {f['files']} files, k={f['k']}, "
            f"whole processes, median of {f['repeats']}",
            f"  baseline ({f['baseline']}): {f['baseline_wall_s']:.3f} s   runs {_walls(f['all_baseline_walls_s'])}",
            f"  vaepipe query process (its cache): {f['pipeline_wall_s']:.3f} s   runs {_walls(f['all_pipeline_walls_s'])}",
            f"  vaepipe query --cache off:        {f['pipeline_nocache_wall_s']:.3f} s   runs "
            f"{_walls(f['all_pipeline_nocache_walls_s'])}   (first query, writing the cache: "
            f"{f['pipeline_first_wall_s']:.3f} s)",
            f"  ratio DuckDB/vaepipe wall: {f['ratio']:.2f} with the cache, {f['ratio_nocache']:.2f} without "
            f"(> 1: vaepipe faster); same answer: {f['same_answer']}",
            f"  CPU (user+sys, median): DuckDB {f['baseline_cpu_s']:.3f} s, vaepipe {f['pipeline_cpu_s']:.3f} s",
            f"  {f['pipeline_many_ids']} query ids in one pass: DuckDB (one SQL, min_by per query) "
            f"{f['baseline_many_ids_wall_s']:.3f} s, vaepipe (--ids-file) {f['pipeline_many_ids_wall_s']:.3f} s, "
            f"ratio {f['many_ids_ratio']:.2f}",
            f"  peak RSS: vaepipe {f['peak_rss_mb']:,.0f} MiB, DuckDB {f['baseline_peak_rss_mb']:,.0f} MiB",
            f"  load average before/after: {f['load_avg_before']} / {f['load_avg_after']}"])
    if f.get("whole_process"):
        from pipeline.measure.bench_whole import summary_encode_whole

        return summary_encode_whole(f)
    amp = f" (amp {f['amp']})" if f.get("amp", "off") != "off" else ""
    lines = [f"bench {f['what']}: {f['records']:,} records, batch {f['batch_size']}, {f['device']}{amp}",
             f"  baseline (plain PyTorch, {f['baseline_threads']} threads): {f['baseline_records_per_s']:>10,.0f} records/s",
             f"  vaepipe:                              {f['pipeline_records_per_s']:>10,.0f} records/s",
             f"  ratio vaepipe/baseline: {f['ratio']:.2f}"]
    if f["what"] == "encode":
        lines += [f"  (vaepipe = whole run_encode, --executor {f.get('pipeline_executor', 'ray')}, after warm-up: "
                  f"{f['pipeline_wall_s']:.1f} s vs baseline {f['baseline_wall_s']:.1f} s; steady state, "
                  f"first unit start → last unit end: "
                  f"{f['pipeline_steady_records_per_s']:,.0f} records/s, ratio {f['steady_ratio']:.2f})",
                  f"  max |μ baseline − μ vaepipe| = {f['max_abs_mu_diff']:.2e}"]
    else:
        lines += [f"  (steady state over epochs 2..{f['epochs']}; end to end: baseline {f['baseline_end_to_end_s']:.1f} s, "
                  f"vaepipe run_train {f['pipeline_end_to_end_s']:.1f} s, ratio {f['end_to_end_ratio']:.2f})"]
    lines += [f"  peak memory of the process tree incl. Ray, PSS (shared pages once): vaepipe "
              f"{f['peak_pss_mb']:,.0f} MiB, baseline {f['baseline_peak_pss_mb']:,.0f} MiB; summed RSS: "
              f"vaepipe {f['peak_rss_mb']:,.0f} MiB, baseline {f['baseline_peak_rss_mb']:,.0f} MiB",
              f"  load average before/after: {f['load_avg_before']} / {f['load_avg_after']}"]
    return "\n".join(lines)


def _walls(ws: list[float]) -> str:
    return ", ".join(f"{w:.3f}" for w in ws)
