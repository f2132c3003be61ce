"""Whole-process benchmarks: each side is a separate process, timed from its start (Python start and
imports included) to its exit, as a user runs it. Used by `vaepipe bench query` and
`vaepipe bench encode --whole-process`; no torch import here (the query side must stay light, and
so must this module, which generates the latents).

query   vaepipe: `vaepipe query --latents L --id Q --k K --format jsonl`;
        baseline: DuckDB's brute-force SQL in its own `python -c` process
        (`array_distance(mu::FLOAT[D], …) … ORDER BY d LIMIT K` over `read_parquet('L/*.parquet')`).
        Both answers must be the same ids with the same distances.
encode  vaepipe: `vaepipe encode --model models:/bench/1 …` (Ray started by the process itself);
        baseline: the plain script a user writes (pyarrow `iter_batches` → `model.embed(x).mean` →
        `ParquetWriter`, the model from `mlflow.pyfunc.load_model(...).unwrap_python_model()`), also
        a `python -c` process. Both on the same registered model and input.
Sides alternate; walls are the median of the repeats; peak RSS is each process's own maximum
(`wait4` rusage) and, for encode, the summed RSS of the process tree (Ray's processes included)."""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import statistics
import subprocess
import sys
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.table.parquet_io import Commit, read_manifest, write_options
from pipeline.table.uris import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vaepipe_command() -> list[str]:
    """The `vaepipe` console script beside this Python (what a user runs), else `python -m jobs.cli`."""
    script = os.path.join(os.path.dirname(sys.executable), "vaepipe")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "jobs.cli"]


def child_env() -> dict[str, str]:
    """This environment with the repository on PYTHONPATH (so the child runs this checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


# A tiny launcher times the command: the command is forked from this small process, not from the
# bench (whose torch import would otherwise count in the child's ru_maxrss until its exec).
_LAUNCH = r"""
import json, os, subprocess, sys, time
out, res = sys.argv[1], sys.argv[2]
with open(out, "wb") as f:
    t0 = time.perf_counter()
    p = subprocess.Popen(sys.argv[3:], stdout=f)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
with open(res, "w") as f:
    json.dump({"wall": wall, "rc": os.waitstatus_to_exitcode(status), "maxrss_kb": ru.ru_maxrss,
               "cpu": ru.ru_utime + ru.ru_stime}, f)
"""


def timed_run(cmd: list[str], env: dict | None = None, peak_tree: bool = False) -> dict[str, Any]:
    """Run `cmd` to completion: wall seconds (spawn to exit, measured by a small launcher), its
    stdout, and its peak RSS in MiB (`own_peak_mb`: the process's own ru_maxrss from wait4; with
    `peak_tree`, also `tree_peak_mb` / `tree_peak_pss_mb`: the summed RSS / PSS of it and its
    descendants sampled every 0.2 s,
    for jobs that start Ray's processes)."""
    import tempfile

    sampler = None
    with tempfile.TemporaryDirectory(prefix="vaepipe-bench-") as tmp:
        out, res_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "result.json")
        with open(os.path.join(tmp, "stderr"), "wb") as err:
            p = subprocess.Popen([sys.executable, "-c", _LAUNCH, out, res_path, *cmd], stderr=err,
                                 env=env or child_env(), cwd=ROOT)
            if peak_tree:
                from pipeline.measure.bench_common import PeakRSS   # imports torch: only the encode bench uses this

                sampler = PeakRSS(root=p.pid)
                sampler.__enter__()
            p.wait()
            if sampler is not None:
                sampler.__exit__(None, None, None)
        with open(os.path.join(tmp, "stderr"), "rb") as f:
            stderr = f.read().decode(errors="replace")
        try:
            with open(res_path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            r = {"rc": p.returncode}
        if p.returncode != 0 or r["rc"] != 0:
            raise RuntimeError(f"bench: {' '.join(cmd[:3])} … exited {r['rc']}:\n{stderr[-3000:]}")
        with open(out, "rb") as f:
            stdout = f.read().decode()
    res = {"wall": r["wall"], "stdout": stdout, "own_peak_mb": r["maxrss_kb"] / 1024, "cpu": r["cpu"]}
    if sampler is not None:
        res["tree_peak_mb"], res["tree_peak_pss_mb"] = sampler.peak_mb, sampler.peak_pss_mb
    return res


def load_avg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# --- query ----------------------------------------------------------------------------------------

def make_latents(folder: str, records: int, dim: int = 16, files: int = 8, row_group_rows: int = 65_536,
                 seed: int = 0) -> str:
    """`records` standard-normal latents (id, label, mu = fixed_size_list<float32>[dim]) in `files`
    zstd Parquet files, committed like an encode output (staging → manifest → _SUCCESS), written
    one row group at a time (flat memory). A folder already holding this input is reused."""
    marker = os.path.join(folder, "_bench_latents.json")
    want = {"records": records, "dim": dim, "files": files, "row_group_rows": row_group_rows, "seed": seed,
            "version": 2}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == want:
                return folder
    shutil.rmtree(folder, ignore_errors=True)
    loc = resolve(folder)
    commit = Commit(loc)
    schema = pa.schema([("id", pa.int64()), ("label", pa.int64()), ("mu", pa.list_(pa.float32(), dim))])
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, records, files + 1).astype(np.int64)
    staged = []
    for i in range(files):
        path = commit.staged_path(f"part-{i:05d}.parquet")
        loc.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with pq.ParquetWriter(path, schema, **write_options(schema)) as w:   # as encode writes them
            for lo in range(int(bounds[i]), int(bounds[i + 1]), row_group_rows):
                hi = min(int(bounds[i + 1]), lo + row_group_rows)
                x = rng.standard_normal((hi - lo, dim), dtype=np.float32)
                ids = np.arange(lo, hi, dtype=np.int64)
                w.write_table(pa.table({"id": ids, "label": ids % 10,
                                        "mu": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)},
                                       schema=schema), row_group_size=row_group_rows)
        staged.append((path, int(bounds[i + 1] - bounds[i])))
    commit.commit(staged, {"vaepipe.latent_dim": str(dim), "vaepipe.bench": "standard normal latents"})
    with open(marker, "w") as f:
        json.dump(want, f)
    return folder


DUCKDB_QUERY = r"""
import json, sys
import duckdb
folder, qid, k, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")   # its bar goes to stdout on long queries
rows = con.execute(f'''
    WITH t AS (SELECT id, mu::FLOAT[{dim}] AS mu FROM read_parquet('{folder}/*.parquet'))
    SELECT id, array_distance(mu, (SELECT mu FROM t WHERE id = {qid})) AS d
    FROM t WHERE id != {qid} ORDER BY d LIMIT {k}''').fetchall()
for i, d in rows:
    print(json.dumps({"id": i, "distance": d}))
"""


DUCKDB_MANY = r"""
import json, sys
import duckdb
folder, ids_file, k, dim = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")   # its bar goes to stdout on long queries
rows = con.execute(f'''
    WITH t AS (SELECT id, mu::FLOAT[{dim}] AS mu FROM read_parquet('{folder}/*.parquet')),
         q AS (SELECT id AS qid, mu AS qmu FROM t
               WHERE id IN (SELECT column0 FROM read_csv('{ids_file}', header = false))),
         d AS (SELECT qid, id, array_distance(mu, qmu) AS d FROM t, q WHERE id != qid)
    SELECT qid, min_by(id, d, {k}), min_by(d, d, {k}) FROM d GROUP BY qid''').fetchall()
for qid, ids, ds in rows:
    for i, d in zip(ids, ds):
        print(json.dumps({"query": str(qid), "id": i, "distance": d}))
"""


def _many_answer(stdout: str) -> dict[str, dict]:
    """{query id: {neighbour id: distance}}, from either side's JSON lines."""
    got: dict[str, dict] = {}
    for r in map(json.loads, stdout.strip().splitlines()):
        got.setdefault(str(r["query"]), {})[r["id"]] = r["distance"]
    return got


def _same_many(a: dict[str, dict], b: dict[str, dict], tol: float = 1e-4) -> bool:
    """The same neighbours for every query, at the same distances (float32 arithmetic on both sides)."""
    return a.keys() == b.keys() and all(a[q].keys() == b[q].keys() and
                                        all(abs(a[q][i] - b[q][i]) <= tol for i in a[q]) for q in a)


def _answer(stdout: str) -> list[tuple]:
    return [(r["id"], r["distance"]) for r in map(json.loads, stdout.strip().splitlines())]


def alternate_processes(repeats: int, sides: dict[str, Callable[[], dict]]) -> dict[str, list[dict]]:
    """Run every side `repeats` times, in the given order on even rounds and reversed on odd ones (so
    neither side always runs after the other on a warm cache). Returns each side's runs."""
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(repeats):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            runs[name].append(sides[name]())
    return runs


def _query_commands(cfg, root: str) -> dict[str, Any]:
    """The latents, the query ids and each side's command line."""
    folder = make_latents(os.path.join(root, f"latents-{cfg.records}-{cfg.latent_dim}"), cfg.records,
                          dim=cfg.latent_dim, files=cfg.query_files)
    n = cfg.records
    qid = (n // 3) + 7 if n > 10 else 0
    many_ids = np.random.default_rng(1).choice(n, size=min(cfg.query_ids, n), replace=False)
    ids_file = os.path.join(root, f"query-ids-{n}-{cfg.query_ids}.txt")   # per size: runs may overlap
    with open(ids_file, "w") as f:
        f.write("\n".join(str(int(v)) for v in many_ids) + "\n")
    ours = [*vaepipe_command(), "query", "--latents", folder, "--k", str(cfg.k), "--format", "jsonl"]
    sql = [str(cfg.k), str(cfg.latent_dim)]
    return {"qid": qid, "many": len(many_ids), "cmd": {
        "baseline": [sys.executable, "-c", DUCKDB_QUERY, folder, str(qid), *sql],
        "vaepipe": [*ours, "--id", str(qid)],
        "vaepipe_cold": [*ours, "--id", str(qid), "--cache", "off"],
        "baseline_many": [sys.executable, "-c", DUCKDB_MANY, folder, ids_file, *sql],
        "vaepipe_many": [*ours, "--ids-file", ids_file]}}


def bench_query(cfg) -> dict[str, Any]:
    """`vaepipe query` vs DuckDB's SQL, both whole processes, alternating, median of the repeats:
    one id (vaepipe with its cache, and with `--cache off`) and many ids in one pass."""
    try:
        import duckdb
    except ImportError:
        from pipeline.runtime.errors import ConfigError

        raise ConfigError("bench query needs duckdb for the baseline: pip install 'vaepipe[dev]'") from None
    root = os.path.abspath(os.path.join(cfg.workdir, "bench"))
    q = _query_commands(cfg, root)
    cmd = q["cmd"]
    # vaepipe query's cache (pipeline.search.latent_cache) in a fresh folder of the bench's own: the first
    # query writes it (timed once, as `first`), the repeats read it; `--cache off` reads Parquet only
    env = child_env()
    env["VAEPIPE_CACHE_DIR"] = os.path.join(root, f"query-cache-{cfg.records}")
    shutil.rmtree(env["VAEPIPE_CACHE_DIR"], ignore_errors=True)
    timed_run(cmd["baseline"]), timed_run(cmd["vaepipe_cold"], env)      # warm-up: page cache, .pyc files
    first = timed_run(cmd["vaepipe"], env)
    load_before = load_avg()
    runs = alternate_processes(cfg.n_repeats, {name: (lambda c=c: timed_run(c, env)) for name, c in cmd.items()})
    _check_query_answers(runs, first)
    f = _query_figures(cfg, runs, first)
    return {**f, "query_id": q["qid"], "pipeline_many_ids": q["many"],
            "baseline": f"duckdb {duckdb.__version__} SQL in its own process", "pipeline": "vaepipe query process",
            "load_avg_before": load_before, "load_avg_after": load_avg()}


def _check_query_answers(runs: dict[str, list[dict]], first: dict) -> None:
    """Every side gave the same neighbours at the same distances, or the bench fails."""
    a = _answer(runs["vaepipe"][0]["stdout"])
    for other in (runs["baseline"][0], runs["vaepipe_cold"][0], first):
        if _answer(other["stdout"]) != a:
            raise RuntimeError(f"bench query: vaepipe and DuckDB disagree:\n{a}\n{_answer(other['stdout'])}")
    if not _same_many(_many_answer(runs["vaepipe_many"][0]["stdout"]), _many_answer(runs["baseline_many"][0]["stdout"])):
        raise RuntimeError("bench query: vaepipe and DuckDB disagree on the many-ids query")


def _query_figures(cfg, runs: dict[str, list[dict]], first: dict) -> dict[str, Any]:
    walls = {name: [d["wall"] for d in r] for name, r in runs.items()}
    med = {name: statistics.median(w) for name, w in walls.items()}
    n, base, pipe = cfg.records, runs["baseline"], runs["vaepipe"]
    return {
        "what": "query", "records": n, "k": cfg.k, "latent_dim": cfg.latent_dim, "files": cfg.query_files,
        "device": "cpu: " + f"{os.cpu_count()} cores",
        "baseline_wall_s": med["baseline"], "pipeline_wall_s": med["vaepipe"],
        "ratio": med["baseline"] / med["vaepipe"],
        "pipeline_nocache_wall_s": med["vaepipe_cold"], "ratio_nocache": med["baseline"] / med["vaepipe_cold"],
        "pipeline_first_wall_s": first["wall"],
        "baseline_records_per_s": n / med["baseline"], "pipeline_records_per_s": n / med["vaepipe"],
        "baseline_cpu_s": statistics.median(d["cpu"] for d in base),
        "pipeline_cpu_s": statistics.median(d["cpu"] for d in pipe),
        "pipeline_many_ids_wall_s": med["vaepipe_many"], "baseline_many_ids_wall_s": med["baseline_many"],
        "many_ids_ratio": med["baseline_many"] / med["vaepipe_many"],
        "peak_rss_mb": max(d["own_peak_mb"] for d in pipe), "baseline_peak_rss_mb": max(d["own_peak_mb"] for d in base),
        "repeats": cfg.n_repeats, "all_baseline_walls_s": walls["baseline"], "all_pipeline_walls_s": walls["vaepipe"],
        "all_pipeline_nocache_walls_s": walls["vaepipe_cold"], "all_many_ids_walls_s": walls["vaepipe_many"],
        "all_baseline_many_ids_walls_s": walls["baseline_many"],
        "same_answer": True, "answer": _answer(pipe[0]["stdout"]),
        "notes": "walls = whole processes (python start, imports, read, search, print), median of the "
                 "alternating repeats after one warm-up run of each; ratio = duckdb wall / vaepipe wall "
                 "(> 1: vaepipe faster); vaepipe = the default, reading its cache (written once by the "
                 "first query, pipeline_first_wall_s); nocache = `--cache off`, Parquet only (every query "
                 "a first one); cpu = user + system seconds of the process (all its threads; wait4), "
                 "the more robust figure on a shared machine; peak RSS = each process's own ru_maxrss "
                 "(wait4), the max over the runs",
    }


# --- encode as whole processes --------------------------------------------------------------------

PLAIN_ENCODE = r"""
import glob, os, sys
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

model_uri, tracking, src, dst, batch, device = sys.argv[1:7]
mlflow.set_tracking_uri(tracking)
model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model.eval().to(device)
torch.set_num_threads(os.cpu_count())
os.makedirs(dst, exist_ok=True)
schema = pa.schema([("id", pa.int64()), ("mu", pa.list_(pa.float32(), model.config.latent_dim))])
rows = 0
with torch.inference_mode():
    for i, path in enumerate(sorted(glob.glob(os.path.join(src, "*.parquet")))):
        with pq.ParquetWriter(os.path.join(dst, f"part-{i:05d}.parquet"), schema, compression="zstd") as w:
            for b in pq.ParquetFile(path).iter_batches(batch_size=int(batch), columns=["id", "image"]):
                x = np.asarray(b.column("image").flatten().to_numpy()).reshape(b.num_rows, -1)
                mu = model.embed(torch.from_numpy(x).to(device)).mean.cpu().numpy()
                w.write_batch(pa.record_batch(
                    [b.column("id"), pa.FixedSizeListArray.from_arrays(pa.array(mu.ravel()), mu.shape[1])],
                    schema=schema))
                rows += b.num_rows
print(rows)
"""


def register_bench_model(cfg, root: str) -> tuple[str, str]:
    """The benchmark model (random init, seed 0) logged and registered as `bench` version 1 in a
    SQLite MLflow store under `root` (reused when present): (tracking URI, model URI)."""
    from pipeline.models import registry
    from pipeline.measure.bench_common import bench_model
    from vae.checkpoint import save_checkpoint

    os.makedirs(root, exist_ok=True)
    tracking = f"sqlite:///{os.path.join(root, 'mlflow.db')}"
    marker = os.path.join(root, "_bench_model.json")
    want = {"latent_dim": cfg.latent_dim, "hidden": list(cfg.hidden), "version": 2}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == want:
                return tracking, "models:/bench/1"
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    model = bench_model(cfg)
    ckpt = os.path.join(root, "checkpoint.pt")   # the name registry.download_checkpoint looks for
    save_checkpoint(ckpt, model)
    exp = registry.experiment_id(tracking, "bench")
    run_id = registry.client(tracking).create_run(exp).info.run_id
    uri = registry.log_model(run_id, ckpt, model.config.input_dim, model.config.latent_dim, tracking)
    registry.register(uri, "bench", tracking, run_id)
    with open(marker, "w") as f:
        json.dump(want, f)
    return tracking, "models:/bench/1"


def bench_encode_whole(cfg) -> dict[str, Any]:
    """`vaepipe encode` and the plain script, each as its own process, on both row-group layouts."""
    from pipeline.measure.bench_common import _compare, check_device, device_name, make_input

    device = check_device(cfg)
    root = os.path.abspath(os.path.join(cfg.workdir, "bench"))
    tracking, model_uri = register_bench_model(cfg, os.path.join(root, "whole-model"))
    layouts = {"pyarrow-default": 0, str(cfg.row_group_rows): cfg.row_group_rows}
    out = os.path.join(root, "whole-out")
    by_layout = {}
    load_before = load_avg()
    for name, rg_rows in layouts.items():
        files = make_input(os.path.join(root, f"input-{cfg.records}-{rg_rows}-{cfg.file_rows}"),
                           cfg.records, rg_rows, cfg.file_rows)
        src = os.path.dirname(files[0])
        rgs = [pq.read_metadata(f).num_row_groups for f in files]
        base_dst, pipe_dst = os.path.join(out, "baseline"), os.path.join(out, "vaepipe")
        ours = [*vaepipe_command(), "encode", "--model", model_uri, "--input", src, "--output", pipe_dst,
                "--keep", "id", "--batch-size", str(cfg.bs), "--tracking-uri", tracking,
                "--workdir", os.path.join(root, "whole-work"), "--use-gpu" if device == "cuda" else "--no-use-gpu",
                *(["--concurrency", str(cfg.concurrency)] if cfg.concurrency else [])]
        theirs = [sys.executable, "-c", PLAIN_ENCODE, model_uri, tracking, src, base_dst, str(cfg.bs), device]

        def side(cmd: list[str], dst: str) -> dict:
            shutil.rmtree(dst, ignore_errors=True)
            return timed_run(cmd, peak_tree=True)

        runs = alternate_processes(cfg.n_repeats, {"baseline": lambda: side(theirs, base_dst),
                                                   "vaepipe": lambda: side(ours, pipe_dst)})
        base, pipe = runs["baseline"], runs["vaepipe"]
        for res in base:
            if int(res["stdout"].split()[-1]) != cfg.records:
                raise RuntimeError(f"bench: the plain script wrote {res['stdout'].split()[-1]} records")
        rows_out = sum(f["rows"] for f in read_manifest(resolve(pipe_dst))["files"])
        if rows_out != cfg.records:
            raise RuntimeError(f"bench: vaepipe encode committed {rows_out} records, expected {cfg.records}")
        diff = _compare(base_dst, pipe_dst)
        bw = statistics.median(d["wall"] for d in base)
        pw = statistics.median(d["wall"] for d in pipe)
        n = cfg.records
        by_layout[name] = {
            "what": "encode", "records": n, "batch_size": cfg.bs, "device": device_name(device),
            "whole_process": True, "layout": name, "row_groups_per_file": rgs,
            "baseline_records_per_s": n / bw, "pipeline_records_per_s": n / pw, "ratio": bw / pw,
            "pipeline_steady_records_per_s": None, "steady_ratio": None,
            "baseline_wall_s": bw, "pipeline_wall_s": pw, "pipeline_units_span_s": None,
            "peak_rss_mb": max(d["tree_peak_mb"] for d in pipe),
            "baseline_peak_rss_mb": max(d["tree_peak_mb"] for d in base),
            "peak_pss_mb": max(d["tree_peak_pss_mb"] for d in pipe),
            "baseline_peak_pss_mb": max(d["tree_peak_pss_mb"] for d in base),
            "baseline_threads": os.cpu_count(), "pipeline_actors": cfg.concurrency or os.cpu_count(),
            "pipeline_files": len(read_manifest(resolve(pipe_dst))["files"]),
            "repeats": cfg.n_repeats, "all_baseline_walls_s": [d["wall"] for d in base],
            "all_pipeline_walls_s": [d["wall"] for d in pipe], "max_abs_mu_diff": diff,
        }
    shutil.rmtree(out, ignore_errors=True)
    load_after = load_avg()
    main = dict(by_layout[str(cfg.row_group_rows)])
    main.update({"layouts": by_layout, "load_avg_before": load_before, "load_avg_after": load_after,
                 "notes": ("whole processes, median of the alternating repeats: vaepipe = `vaepipe encode` "
                           "(Python start, imports, model from the registry, encode, commit; --executor auto: "
                           "no Ray start for local files, one encoder thread per core); baseline = the plain pyarrow iter_batches → model.embed → "
                           "ParquetWriter script (model via mlflow.pyfunc.load_model().unwrap_python_model()); "
                           "steady-state figures are not measurable from outside the process (null); "
                           "peak_rss_mb = the process tree (Ray included), sampled every 0.2 s")})
    return main


def summary_encode_whole(f: dict[str, Any]) -> str:
    lines = [f"bench encode --whole-process: {f['records']:,} records, batch {f['batch_size']}, {f['device']}, "
             f"median of {f['repeats']}"]
    for name, g in f["layouts"].items():
        lines += [f"  layout {name} (row groups per file {g['row_groups_per_file']}):",
                  f"    plain script process:   {g['baseline_wall_s']:7.1f} s  {g['baseline_records_per_s']:>9,.0f} "
                  f"records/s  runs {', '.join(f'{w:.1f}' for w in g['all_baseline_walls_s'])}",
                  f"    vaepipe encode process: {g['pipeline_wall_s']:7.1f} s  {g['pipeline_records_per_s']:>9,.0f} "
                  f"records/s  runs {', '.join(f'{w:.1f}' for w in g['all_pipeline_walls_s'])}",
                  f"    ratio vaepipe/baseline: {g['ratio']:.2f}; max |Δμ| {g['max_abs_mu_diff']:.2e}",
                  f"    peak memory (process tree), PSS: vaepipe {g['peak_pss_mb']:,.0f} MiB, baseline "
                  f"{g['baseline_peak_pss_mb']:,.0f} MiB; summed RSS: vaepipe {g['peak_rss_mb']:,.0f} MiB, "
                  f"baseline {g['baseline_peak_rss_mb']:,.0f} MiB"]
    lines.append(f"  load average before/after: {f['load_avg_before']} / {f['load_avg_after']}")
    return "\n".join(lines)
