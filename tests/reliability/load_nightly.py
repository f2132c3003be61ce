"""Case 16 (benchmark, not a test): peak memory of `nightly` over N records.

    python tests/reliability/load_nightly.py --records 1000000
    python tests/reliability/load_nightly.py --records 10000000   # must stay within 1.2x of the 1 M peak

Generates MNIST-like records (id, label, image = 784 x uint8) as hive partitions `day=NNN/` of
`--per-partition` records each, trains nothing (registers a tiny random-init model in a private
MLflow SQLite store), runs pipeline.nightly.run_nightly (else pipeline.encode.run_encode) and
samples the RSS of this process and all its descendants (Ray workers included) every 0.2 s.
Prints one line: records, wall seconds, records/s, peak RSS of the process tree (MiB)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bench import PeakRSS   # RSS of this process and its descendants, sampled from /proc


def generate(folder: str, records: int, per_partition: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4096, 784), dtype=np.uint8)      # recycled blocks: fast, MNIST-sized
    start, day = 0, 0
    while start < records:
        n = min(per_partition, records - start)
        d = os.path.join(folder, f"day={day:04d}")
        os.makedirs(d, exist_ok=True)
        with pq.ParquetWriter(os.path.join(d, "part-00000.parquet"),
                              pa.schema([("id", pa.int64()), ("label", pa.int64()),
                                         ("image", pa.list_(pa.uint8(), 784))])) as w:
            for lo in range(0, n, 65_536):
                m = min(65_536, n - lo)
                x = base[(np.arange(m) + lo) % len(base)]
                w.write_table(pa.table({
                    "id": pa.array(np.arange(start + lo, start + lo + m, dtype=np.int64)),
                    "label": pa.array(rng.integers(0, 10, m)),
                    "image": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 784)}))
        start, day = start + n, day + 1


def register_tiny_model(work: str) -> str:
    from pipeline import registry
    from vae.checkpoint import save_checkpoint
    from vae.config import VAEConfig
    from vae.model import VAE

    tracking = f"sqlite:///{work}/mlflow.db"
    from vae.preprocess import Preprocessing

    cfg = VAEConfig(input_shape=(784,), arch="mlp", latent_dim=16, hidden=(64, 32),
                    preprocessing=Preprocessing(features=["image"], layout="list", scaling="uint8"))
    model = VAE(cfg)
    ck = os.path.join(work, "checkpoint.pt")
    save_checkpoint(ck, model)
    exp = registry.experiment_id(tracking, "load")
    run = registry.client(tracking).create_run(exp, run_name="load-model")
    uri = registry.log_model(run.info.run_id, ck, 784, cfg.latent_dim, tracking)
    mv = registry.register(uri, "load", tracking, run.info.run_id)
    registry.set_alias_when_ready("load", "production", mv.version, tracking)
    return tracking


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--per-partition", type=int, default=500_000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="vaepipe-load-")
    data, out = os.path.join(work, "data"), os.path.join(work, "out")
    t0 = time.perf_counter()
    generate(data, a.records, a.per_partition)
    print(f"generated {a.records:,} records in {time.perf_counter() - t0:.0f} s under {data}", flush=True)
    tracking = register_tiny_model(work)

    common = dict(model="models:/load@production", input=data, output=out, workdir=work, tracking_uri=tracking,
                  concurrency=a.concurrency)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        try:
            from pipeline.nightly import NightlyConfig, run_nightly

            run_nightly(NightlyConfig(**common))
            how = "nightly"
        except ImportError:
            from pipeline.encode import EncodeConfig, run_encode

            run_encode(EncodeConfig(**common))
            how = "encode"
        wall = time.perf_counter() - t0
    # Ray's raylet/GCS are started by ray.init in this process, so they are descendants and counted.
    print(f"{how}: records={a.records:,} wall_s={wall:.1f} records_per_s={a.records / wall:,.0f} "
          f"peak_rss_tree_mib={mem.peak_mb:,.0f}", flush=True)


if __name__ == "__main__":
    main()
