"""What the benchmarks share: their config, the generated MNIST-like input, the model they time, the
device they run on, and the peak memory of a process tree. `vaepipe bench` (pipeline.measure.bench) and
the whole-process sides (pipeline.measure.bench_whole) both build on it."""
from __future__ import annotations

import json
import os
import platform
import shutil
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.runtime.config import RuntimeConfig, opt
from pipeline.runtime.errors import ConfigError
from pipeline.runtime.progress import Progress
from pipeline.training.train_config import AMPS

WHATS = ("encode", "train", "query", "index")
DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = ("ray", "local")   # encode's vaepipe side (in-process bench)
SCHEMA = pa.schema([("id", pa.int64()), ("label", pa.int64()), ("image", pa.list_(pa.uint8(), 784))])


@dataclass
class BenchConfig(RuntimeConfig):
    what: str = opt("encode", "what to benchmark: encode, train or query (`vaepipe bench encode|train|query`)",
                    choices=WHATS)
    records: int = opt(1_000_000, "records in the generated input (MNIST images tiled)")
    json: str = opt("", "also write the figures to this JSON file")
    batch_size: int | None = opt(None, "records per batch, both sides (default: encode 4096, train 128)")
    row_group_rows: int = opt(65_536, "records per row group of the generated input")
    file_rows: int = opt(524_288, "records per generated Parquet file")
    concurrency: int | None = opt(None, "encode: Ray Data actors (default: one per core)")
    threads: int | None = opt(None, "baseline torch threads (default: all cores)")
    epochs: int = opt(3, "train: epochs on each side; the first is the warm-up")
    repeats: int | None = opt(None, "timed runs per side, alternating (default 1; query and --whole-process: 3); "
                                    "in-process encode/train report the best of each, whole processes the median")
    device: str = opt("auto", "encode/train: run both sides on cpu or cuda (cuda: exits if no GPU is visible); "
                              "auto = cuda when available", choices=DEVICES)
    executor: str = opt("ray", "encode (in-process): the vaepipe side's executor, ray (the Ray Data actor pool) or "
                               "local (this process, one encoder thread per core sharing the GPU if any); "
                               "--whole-process runs `vaepipe encode` with its default, auto", choices=EXECUTORS)
    amp: str = opt("off", "train: mixed precision on both sides (off, bf16, fp16; fp16 with a GradScaler), "
                          "as `vaepipe train --amp`", choices=AMPS)
    whole_process: bool = opt(False, "encode: time `vaepipe encode` and the plain script as separate processes "
                                     "(Python start, imports, Ray start and model load included), on both row-group "
                                     "layouts (pyarrow's default and --row-group-rows)")
    k: int = opt(10, "query: neighbours per query")
    query_ids: int = opt(100, "query: ids in the extra many-ids run of vaepipe query (--ids-file)")
    query_files: int = opt(8, "query: Parquet files the generated latents are written to")
    latent_dim: int = opt(16, "latent size of the benchmark model")
    seed: int = opt(0, "index: seed of the model, the table's draws and the queries")
    train_epochs: int = opt(8, "index: epochs of the MNIST model whose posteriors the table is drawn from")
    lancedb: bool = opt(True, "index: also build and search LanceDB's IVF-PQ on the same vectors")
    keep_index: bool = opt(False, "index: use the table's fresh index (timings from its pointer) and the Lance index an earlier "
                                     "run kept for the same table (timings from its marker) instead of building them")
    serve_proxy: bool = opt(False, "index: also time the service behind Serve's Python proxy (--ingress proxy)")
    hidden: list[int] = opt(help="MLP widths of the benchmark model", factory=lambda: [512, 256])

    def __post_init__(self) -> None:
        self.choice("what", WHATS)
        self.choice("device", DEVICES)
        self.choice("amp", AMPS)
        self.choice("executor", EXECUTORS)
        if self.amp != "off" and self.what != "train":
            raise ConfigError(f"--amp {self.amp}: only `vaepipe bench train` takes it (encode runs in fp32)")
        for name in ("records", "row_group_rows", "file_rows", "epochs", "latent_dim", "k", "query_ids", "query_files"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.what == "train" and self.epochs < 2:
            raise ConfigError("train: epochs must be ≥ 2 (the first is the warm-up)")
        for name in ("batch_size", "concurrency", "threads", "repeats"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")

    @property
    def n_repeats(self) -> int:
        return self.repeats or (5 if self.what == "index" else 3 if self.what == "query" or self.whole_process else 1)

    @property
    def bs(self) -> int:
        return self.batch_size or (4096 if self.what == "encode" else 128)


def _pss(pid: int) -> int | None:
    """A process's proportional set size in bytes (its private pages plus its share of each page it
    shares: shared libraries, Ray's object store), from /proc/PID/smaps_rollup; None if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def tree_memory(root: int | None = None, pss: bool = False) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over `root` (default: this process) and every descendant, from
    /proc (no psutil). Summed RSS counts a page shared by n processes n times (torch's libraries in
    every Ray worker, the object store); summed PSS counts it once: the tree's real footprint. PSS
    (`pss=True`, slower: one smaps_rollup read per process) is 0 when not asked for."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(parts[1]), []).append(int(d))
            rss[int(d)] = int(parts[21]) * page
        except (OSError, IndexError, ValueError):
            continue
    total_rss = total_pss = 0
    stack = [root]
    while stack:
        p = stack.pop()
        total_rss += rss.get(p, 0)
        if pss and p in rss:
            v = _pss(p)
            total_pss += rss[p] if v is None else v
        stack.extend(children.get(p, []))
    return total_rss, total_pss


def tree_rss_bytes(root: int | None = None) -> int:
    """RSS summed over `root` and every descendant (see tree_memory)."""
    return tree_memory(root)[0]


class PeakRSS:
    """`with PeakRSS() as m: ...` samples the process tree's summed RSS and PSS every `interval` s;
    `m.peak_mb` (RSS), `m.peak_pss_mb` (PSS: shared pages counted once)."""

    def __init__(self, interval: float = 0.2, root: int | None = None):
        self.interval, self.root, self.peak, self.peak_pss = interval, root, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        r, p = tree_memory(self.root, pss=True)
        self.peak, self.peak_pss = max(self.peak, r), max(self.peak_pss, p)

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def peak_pss_mb(self) -> float:
        return self.peak_pss / 2**20


def make_input(folder: str, records: int, row_group_rows: int = 65_536, file_rows: int = 524_288) -> list[str]:
    """MNIST images tiled to `records` rows, streamed to Parquet one row group at a time (flat memory).
    `row_group_rows=0`: pyarrow's default layout instead (each file written by one `pq.write_table`,
    so one row group of up to 1 Mi rows per file; generation then holds one file's table).
    A folder already holding this exact input (its `_bench_input.json`) is reused."""
    from pipeline.evaluation.datasets import mnist

    marker = os.path.join(folder, "_bench_input.json")
    want = {"records": records, "row_group_rows": row_group_rows, "file_rows": file_rows, "version": 1}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == want:
                return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".parquet"))
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    images, labels = mnist()
    flat = np.ascontiguousarray(images.reshape(len(images), -1).astype(np.uint8))
    labels = labels.astype(np.int64)
    files = []
    per = row_group_rows or file_rows   # pyarrow's defaults (0): one progress line per file
    prog = Progress("bench: writing input", records, units=-(-records // per))   # one line per row group
    for i, start in enumerate(range(0, records, file_rows)):
        stop = min(records, start + file_rows)
        path = os.path.join(folder, f"part-{i:05d}.parquet")
        if row_group_rows == 0:   # pyarrow's defaults: one write_table call per file
            idx = np.arange(start, stop) % len(flat)
            pq.write_table(pa.table({"id": pa.array(np.arange(start, stop, dtype=np.int64)),
                                     "label": pa.array(labels[idx]),
                                     "image": pa.FixedSizeListArray.from_arrays(pa.array(flat[idx].ravel()), 784)},
                                    schema=SCHEMA), path, compression="zstd")
            files.append(path)
            prog.update(stop - start)
            continue
        with pq.ParquetWriter(path, SCHEMA, compression="zstd") as w:
            for lo in range(start, stop, row_group_rows):
                hi = min(stop, lo + row_group_rows)
                idx = np.arange(lo, hi) % len(flat)
                w.write_table(pa.table({"id": pa.array(np.arange(lo, hi, dtype=np.int64)),
                                        "label": pa.array(labels[idx]),
                                        "image": pa.FixedSizeListArray.from_arrays(pa.array(flat[idx].ravel()), 784)},
                                       schema=SCHEMA), row_group_size=row_group_rows)
                prog.update(hi - lo)
        files.append(path)
    prog.close()
    with open(marker, "w") as f:
        json.dump(want, f)
    return files


def bench_model(cfg: BenchConfig):
    """The model both sides run: the MLP VAE `vaepipe train --arch mlp` builds for these records
    (784 → hidden → 2×latent, uint8 scaling, Bernoulli), randomly initialised (seed 0)."""
    from vae.config import VAEConfig
    from vae.model import VAE
    from vae.preprocess import Preprocessing

    torch.manual_seed(0)
    pre = Preprocessing(features=["image"], layout="list", scaling="uint8", offset=[0.0] * 784, scale=[1 / 255] * 784)
    return VAE(VAEConfig(input_shape=(784,), arch="mlp", latent_dim=cfg.latent_dim, hidden=tuple(cfg.hidden),
                         likelihood="bernoulli", preprocessing=pre)).eval()


def check_device(cfg: BenchConfig) -> str:
    """The device both sides run on: `--device cuda` without a visible GPU is an error, not a CPU run
    reported as a GPU one."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"bench --device cuda: no CUDA GPU is visible to torch {torch.__version__} "
                          f"(CUDA build: {torch.version.cuda or 'none'}); nothing was measured")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def device_name(device: str | None = None) -> str:
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        return f"cuda: {torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu: {os.cpu_count()} cores ({model}), no GPU"


def _compare(base_dir: str, pipe_dir: str, n: int = 2048) -> float:
    """Max |μ_baseline − μ_vaepipe| over the first `n` ids (the two paths must agree)."""
    def first(folder):
        t = pq.read_table(folder, columns=["id", "mu"], filters=[("id", "<", n)]).sort_by("id")
        return t.column("id").to_numpy(), t.column("mu").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)

    (ia, a), (ib, b) = first(base_dir), first(pipe_dir)
    if len(ia) != len(ib) or not np.array_equal(ia, ib):
        raise RuntimeError(f"bench: outputs disagree on ids ({len(ia)} vs {len(ib)} rows)")
    return float(np.abs(a - b).max()) if len(a) else 0.0
