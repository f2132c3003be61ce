"""Case 23 (a check at scale, not a test): SIGKILL a real `vaepipe nightly` process half-way through N
records, read its output with DuckDB, pyarrow, Polars and pandas, then run it again.

    python tests/reliability/kill_nightly.py --records 10000000

Writes MNIST-like records as `day=NNNN/` partitions of `--per-partition` records (ids 0..N-1, in
order: partition d holds [d * per, (d + 1) * per)) in a child process, registers a tiny random-init
model (as case 16, `load_nightly.py`), starts `python -m jobs.cli nightly` in its own process group,
and once `--kill-after` partitions hold `_SUCCESS` waits `--into` seconds (into the next partition's
encoding) and SIGKILLs the group. Then:

  * each reader returns exactly the rows of the partitions committed at the kill (count, distinct ids,
    sum of ids), and OUT holds nothing but data files and `_SUCCESS`;
  * a second `nightly` finishes: every reader returns N rows, N distinct ids, sum N(N-1)/2, it
    encoded only the partitions the killed run had not recorded as done, and no staged part is left
    in the output's control folder.

Prints what it saw at each step and exits non-zero on any mismatch. The 10 M input needs ~8 GB."""
from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(__file__))
os.environ.pop("MLFLOW_TRACKING_URI", None)

from load_nightly import register_tiny_model   # noqa: E402
from readers import stray_files   # noqa: E402


def readers(out: str) -> dict[str, tuple[int, int, int]]:
    """(rows, distinct ids, sum of ids) of OUT as each outside reader sees it, computed by the reader."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    got = {"duckdb": tuple(int(v or 0) for v in duckdb.sql(
        f"SELECT count(*), count(DISTINCT id), sum(id) FROM read_parquet('{out}/**/*.parquet')").fetchone())}
    ids = ds.dataset(out, partitioning="hive").to_table(columns=["id"]).column("id")
    got["pyarrow"] = (len(ids), pc.count_distinct(ids).as_py(), int(pc.sum(ids).as_py() or 0))
    df = pl.scan_parquet(f"{out}/**/*.parquet").select(
        pl.len(), pl.col("id").n_unique().alias("distinct"), pl.col("id").sum().alias("sum")).collect()
    got["polars"] = tuple(int(v) for v in df.row(0))
    s = pd.read_parquet(out, columns=["id"])["id"]
    got["pandas"] = (len(s), int(s.nunique()), int(s.sum()))
    return got


def expected(days: list[int], per: int, records: int) -> tuple[int, int, int]:
    rows = total = 0
    for d in days:
        lo, hi = d * per, min((d + 1) * per, records)
        rows, total = rows + hi - lo, total + (lo + hi - 1) * (hi - lo) // 2
    return rows, rows, total


def committed_days(out: str) -> list[int]:
    return sorted(int(os.path.basename(os.path.dirname(p)).split("=")[1])
                  for p in glob.glob(os.path.join(out, "day=*", "_SUCCESS")))


def check(out: str, want: tuple[int, int, int], what: str) -> bool:
    got = readers(out)
    stray = stray_files(out)
    ok = all(g == want for g in got.values()) and not stray
    print(f"{what}: want (rows, distinct ids, sum of ids) = {want}; "
          + "; ".join(f"{k} {v}" for k, v in got.items()) + (f"; stray files {stray}" if stray else "")
          + (" -> OK" if ok else " -> MISMATCH"), flush=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--per-partition", type=int, default=500_000)
    ap.add_argument("--kill-after", type=int, default=None, help="committed partitions before the kill (default: half)")
    ap.add_argument("--into", type=float, default=1.5, help="seconds after that commit, into the next partition")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="vaepipe-kill-")
    data, out = os.path.join(work, "data"), os.path.join(work, "out")
    parts = -(-a.records // a.per_partition)
    kill_after = parts // 2 if a.kill_after is None else a.kill_after
    assert 0 < kill_after < parts, "--kill-after must leave a partition to kill and one committed"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "load_nightly.py"), "--generate-only",
                    "--records", str(a.records), "--per-partition", str(a.per_partition), "--workdir", work], check=True)
    print(f"generated {a.records:,} records ({parts} partitions) in {time.perf_counter() - t0:.0f} s under {data}",
          flush=True)
    tracking = register_tiny_model(work)
    cmd = [sys.executable, "-m", "jobs.cli", "nightly", "--model", "models:/load@production", "--input", data,
           "--output", out, "--workdir", work, "--tracking-uri", tracking]
    env = {**os.environ, "PYTHONPATH": REPO}

    with open(os.path.join(work, "killed.log"), "w") as log:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        t0 = time.perf_counter()
        while len(committed_days(out)) < kill_after:
            if p.poll() is not None:
                sys.exit(f"nightly ended ({p.returncode}) before {kill_after} partitions were committed")
            time.sleep(0.05)
        time.sleep(a.into)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
    days = committed_days(out)
    with open(os.path.join(work, "killed.log")) as f:
        last = [ln.strip() for ln in f if ln.startswith(("encod", "FAILED"))][-1]
    print(f"killed: SIGKILL of the nightly process group {time.perf_counter() - t0:.1f} s after it started, "
          f"{len(days)} of {parts} partitions committed; its last line: {last!r}", flush=True)
    ok = check(out, expected(days, a.per_partition, a.records), "after the kill")

    t0 = time.perf_counter()
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    encoded = [ln.split()[1].rstrip(":") for ln in rerun.stdout.splitlines() if ln.startswith("encoding ")]
    print(f"rerun: rc {rerun.returncode} in {wall:.1f} s, encoded {len(encoded)} partitions: {', '.join(encoded)}",
          flush=True)
    if rerun.returncode != 0:
        print(rerun.stdout[-3000:], rerun.stderr[-3000:])
        ok = False
    # the killed run recorded each committed partition in its state right after the commit, unless the
    # kill fell between the two: the rerun encodes the rest (and at most that one again)
    redone = sorted(set(int(e.split("=")[1]) for e in encoded) & set(days))
    ok &= len(redone) <= 1 and set(int(e.split("=")[1]) for e in encoded) | set(days) == set(range(parts))
    ok &= check(out, expected(list(range(parts)), a.per_partition, a.records), "after the rerun")
    control = os.path.join(work, "_out.vaepipe")
    staged = [os.path.join(r, f) for r, _, fs in os.walk(control) for f in fs if "staging" in r]
    print(f"staging files left in {control}: {len(staged)}", flush=True)
    ok &= not staged
    print("case 23: " + ("OK" if ok else "FAILED"), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
