"""Figures for docs/performance.md: the same train and encode jobs on a 1-worker-node and a 2-worker-node
cluster (0-CPU head + 1-CPU nodes, all on this host, data/checkpoints/artifacts on a loopback S3 server),
and the time from a worker node's death to the jobs' recovery.

    cd REPO && PYTHONPATH=$PWD .venv/bin/python tests/cluster/measure.py [--copies 5] [--epochs 3] [--json out.json]

Prints one markdown table. The point on a 2-core host is correctness and recovery time, not speed-up:
three raylets share two cores, so a second node adds parallel slots, not CPU.

    ... tests/cluster/measure.py --poll [--repeats 2]

instead times `train --labels` on scikit-learn's wine (125 training records, 15 labels: 1,200 epochs of
milliseconds) on a 1-worker-node cluster whose nodes do not set Ray Train's controller poll, with the
job's driver at Ray's 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2) and at vaepipe's default, alternating."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def run_job(client, argv: list[str], timeout_s: float = 600) -> tuple[float, str]:
    t0 = time.time()
    job = harness.submit(client, argv)
    status, logs, t_end = harness.wait_job(client, job, timeout_s)
    if status != "SUCCEEDED":
        raise RuntimeError(f"{argv[0]} {status}:\n{logs[-5000:]}")
    return t_end - t0, logs


def encode_rate(logs: str) -> tuple[int, float]:
    m = re.search(r"encoded ([\d,]+) of [\d,]+ records .* in ([\d.]+) s \(([\d,]+) records/s\)", logs)
    return int(m.group(1).replace(",", "")), float(m.group(3).replace(",", ""))


def train_rate(logs: str) -> float:
    """Mean samples/s of the epochs rank 0 printed (the training loop only, all workers together)."""
    rates = [float(r) for r in re.findall(r"epoch \d+/\d+: .* (\d+) samples/s", logs)]
    return sum(rates) / max(1, len(rates))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=5, help="digits copies (1,797 records each)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--poll", action="store_true", help="time a small table's train at Ray's poll and at vaepipe's")
    ap.add_argument("--repeats", type=int, default=2, help="--poll: pairs of runs")
    args = ap.parse_args(argv)
    root = pathlib.Path(tempfile.mkdtemp(prefix="vpc-measure-"))
    try:
        return _measure_poll(args, root) if args.poll else _measure(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wine_table():
    """scikit-learn's wine, the training part of pipeline.measure.panel's split 0 (30 % held out), 5 labels
    a class in column y (as the kept-aside tables are measured): (table, feature columns)."""
    import numpy as np
    import pyarrow as pa
    from sklearn.datasets import load_wine

    from pipeline.measure.panel import _split

    d = load_wine()
    x, y = d.data.astype(np.float32), d.target
    xtr, _, ytr, _ = _split(x, y, int(0.3 * len(x)), 0)
    rng = np.random.default_rng(0)
    few = np.concatenate([rng.choice(np.flatnonzero(ytr == c), 5, replace=False) for c in range(3)])
    keep = np.zeros(len(ytr), bool)
    keep[few] = True
    cols = [f"c{i}" for i in range(x.shape[1])]
    t = pa.table({"id": np.arange(len(xtr)), **{c: xtr[:, i].astype(np.float64) for i, c in enumerate(cols)},
                  "y": pa.array(ytr.astype(np.int64), mask=~keep)})
    return t, cols


def _measure_poll(args, root: pathlib.Path) -> int:
    import shlex

    import pyarrow.parquet as pq

    rows = []
    with harness.s3_server() as s3, harness.mlflow_server(s3, root / "mlflow") as url, \
            harness.local_cluster(root / "cluster", {"node_a": 1}) as c:
        b = s3["bucket"]
        t, cols = _wine_table()
        with s3["fs"].open(f"{b}/wine/part-0.parquet", "wb") as f:
            pq.write_table(t, f)
        s3["fs"].invalidate_cache()
        client = harness.job_client(c)
        for i in range(2 * args.repeats):
            poll = "2" if i % 2 == 0 else None   # None: what the driver sets by itself
            argv = ["python", "-m", "jobs.train", "--input", f"s3://{b}/wine", "--features", ",".join(cols),
                    "--labels", "y", "--latent-dim", "4", "--model-name", "w", "--run-name", f"r{i}",
                    "--promote", "never", "--storage-path", f"s3://{b}/ckpt", "--tracking-uri", url,
                    "--storage-options", s3["options_json"], "--workdir", str(root / "driver")]
            entry = (f"env RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={poll} " if poll else "") + shlex.join(argv)
            t0 = time.time()
            status, logs, t_end = harness.wait_job(client, client.submit_job(entrypoint=entry), 1200)
            if status != "SUCCEEDED":
                raise RuntimeError(f"train {status}:\n{logs[-5000:]}")
            elbo = re.search(r"train ELBO (\S+), val ELBO (\S+) nats", logs)
            rows.append({"poll": poll or "vaepipe's default", "wall_s": t_end - t0, "train_elbo": elbo.group(1),
                         "val_elbo": elbo.group(2)})
            print(rows[-1], flush=True)
    print(f"host: {os.cpu_count()} cores; cluster: 0-CPU head + 1 worker node of 1 CPU, one host; wine on a "
          f"loopback S3 server, `train --labels y --latent-dim 4` (400 VAE + 800 head epochs)\n")
    print("| driver's RAY_TRAIN_HEALTH_CHECK_INTERVAL_S | wall (submit → done) | train ELBO | val ELBO |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['poll']} | {r['wall_s']:.1f} s | {r['train_elbo']} | {r['val_elbo']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"poll": rows, "cores": os.cpu_count()}, f, indent=1)
    return 0


def _measure(args, root: pathlib.Path) -> int:
    rows: list[dict] = []
    with harness.s3_server() as s3, harness.mlflow_server(s3, root / "mlflow") as url, \
            harness.local_cluster(root / "cluster", {"node_a": 1}) as c:
        b = s3["bucket"]
        n = harness.upload_digits(s3, "in", copies=args.copies, files=4, row_group=150)
        common = ["--tracking-uri", url, "--storage-options", s3["options_json"], "--workdir", str(root / "driver")]
        client = harness.job_client(c)
        tiny = ["--features", "image", "--hidden", "8,16", "--latent-dim", "2", "--batch-size", "128"]

        def train(tag: str, workers: int, extra: list[str] = ()) -> tuple[float, str]:
            return run_job(client, ["jobs.train", "--input", f"s3://{b}/in", *tiny, "--epochs", str(args.epochs),
                                    "--workers", str(workers), "--model-name", "m", "--run-name", tag,
                                    "--promote", "force", "--storage-path", f"s3://{b}/ckpt", *extra, *common])

        def encode(tag: str) -> tuple[float, str]:
            return run_job(client, ["jobs.encode", "--model", "models:/m@production", "--input", f"s3://{b}/in",
                                    "--output", f"s3://{b}/{tag}", "--unit-rows", "150", *common])

        for nodes in (1, 2):
            if nodes == 2:
                c.add_node("node_b", 1)
            wall, logs = train(f"t{nodes}", workers=nodes)
            rows.append({"job": "train", "nodes": nodes, "workers": nodes, "records": n * args.epochs,
                         "wall_s": wall, "records_per_s": train_rate(logs)})
            print(rows[-1], flush=True)
            wall, logs = encode(f"e{nodes}")
            done, rate = encode_rate(logs)
            actors = re.search(r"encode: (\d+) actors?", logs)
            rows.append({"job": "encode", "nodes": nodes, "workers": int(actors.group(1)) if actors else None,
                         "records": done, "wall_s": wall, "records_per_s": rate})
            print(rows[-1], flush=True)

        # node loss in the middle of each job: kill node_b once the first output / checkpoint is on S3
        from pipeline.training.train_loop import RunStore

        recovery = []
        for what in ("encode", "train"):
            if what == "encode":
                job = harness.submit(client, ["jobs.encode", "--model", "models:/m@production", "--input",
                                              f"s3://{b}/in", "--output", f"s3://{b}/ek", "--unit-rows", "150", *common])
                ready = lambda: any(o.endswith(".parquet") for o in harness.s3_objects(s3, "_ek.vaepipe/staging"))  # noqa: E731
            else:
                job = harness.submit(client, ["jobs.train", "--input", f"s3://{b}/in", *tiny, "--epochs",
                                              "25", "--workers", "2", "--max-failures", "1",
                                              "--model-name", "m", "--run-name", "tk", "--promote", "never",
                                              "--storage-path", f"s3://{b}/ckpt", *common])
                store = RunStore(f"s3://{b}/ckpt/tk", s3["options"])
                ready = lambda: bool(store.checkpoints())  # noqa: E731
            t_sub = time.time()
            while not ready():
                if time.time() - t_sub > 600:
                    raise RuntimeError(f"{what}: nothing on S3 after 600 s")
                time.sleep(0.2)
            old = c.nodes["node_b"].node_id
            t_kill = c.kill_node("node_b")
            dead = c.wait_dead(old) - t_kill
            c.restart_node("node_b")
            back = time.time() - t_kill
            status, logs, t_end = harness.wait_job(client, job, 600)
            if status != "SUCCEEDED":
                raise RuntimeError(f"{what} after node loss: {status}\n{logs[-5000:]}")
            entry = {"job": what, "dead_after_s": dead, "node_back_after_s": back, "job_done_after_s": t_end - t_kill,
                     "wall_s": t_end - t_sub}
            if what == "train":
                after = [e["time"] for e in store.journal() if e["time"] >= t_kill]
                entry["next_epoch_after_s"] = after[0] - t_kill if after else None
            recovery.append(entry)
            print(entry, flush=True)

    print(f"host: {os.cpu_count()} cores; cluster: 0-CPU head + worker nodes of 1 CPU each, one host; "
          f"{n:,} digits records on a loopback S3 server; train {args.epochs} epochs\n")
    print("| job | worker nodes | actors / workers | records | wall (submit → done) | records/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['job']} | {r['nodes']} | {r['workers']} | {r['records']:,} | {r['wall_s']:.1f} s | {r['records_per_s']:,.0f} |")
    print("\n| node_b SIGKILLed mid-job | declared dead | node back | next epoch done | job done | job wall |")
    print("|---|---|---|---|---|---|")
    for r in recovery:
        nxt = f"{r['next_epoch_after_s']:.1f} s" if r.get("next_epoch_after_s") is not None else "–"
        print(f"| {r['job']} | {r['dead_after_s']:.1f} s | {r['node_back_after_s']:.1f} s | {nxt} | "
              f"{r['job_done_after_s']:.1f} s | {r['wall_s']:.1f} s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": rows, "recovery": recovery, "cores": os.cpu_count()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
