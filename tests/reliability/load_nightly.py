"""Case 16 (benchmark, not a test): peak memory of `nightly` over N records.

    python tests/reliability/load_nightly.py --records 1000000
    python tests/reliability/load_nightly.py --records 10000000   # must stay within 1.2x of the 1 M peak

Generates MNIST-like records (id, label, image = 784 x uint8) as hive partitions `day=NNN/` of
`--per-partition` records each, in a child process (so that what writing them leaves in this
process's allocators is not counted), trains nothing (registers a tiny random-init model in a private
MLflow SQLite store), runs pipeline.batch.nightly.run_nightly and samples the RSS of this process and all
its descendants (Ray workers, where the job starts any) every 0.2 s. Prints one line: records, wall
seconds, records/s, the tree's RSS when the job starts (imports done) and its peak (MiB)."""
from __future__ import annotations

import argparse
import os
import subprocess
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

from pipeline.measure.bench_common import PeakRSS, tree_memory   # RSS of this process and its descendants, from /proc


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
    from pipeline.models import registry
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
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)   # the child's part
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="vaepipe-load-")
    data, out = os.path.join(work, "data"), os.path.join(work, "out")
    if a.generate_only:
        generate(data, a.records, a.per_partition)
        return
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--generate-only", "--records", str(a.records),
                    "--per-partition", str(a.per_partition), "--workdir", work], check=True)
    print(f"generated {a.records:,} records in {time.perf_counter() - t0:.0f} s under {data}", flush=True)
    tracking = register_tiny_model(work)

    common = dict(model="models:/load@production", input=data, output=out, workdir=work, tracking_uri=tracking,
                  concurrency=a.concurrency)
    from pipeline.batch.nightly import NightlyConfig, run_nightly

    start_mib = tree_memory()[0] / 2**20
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        run_nightly(NightlyConfig(**common))
        wall = time.perf_counter() - t0
    # A local Ray's raylet/GCS, where the job starts one, are children of this process and counted.
    print(f"nightly: records={a.records:,} wall_s={wall:.1f} records_per_s={a.records / wall:,.0f} "
          f"start_rss_tree_mib={start_mib:,.0f} peak_rss_tree_mib={mem.peak_mb:,.0f}", flush=True)


if __name__ == "__main__":
    main()
