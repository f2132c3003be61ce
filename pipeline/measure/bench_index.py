"""`vaepipe bench index --records N`: the approximate-neighbour index (pipeline.search.ann, IVF-flat)
against DuckDB's exact SQL and LanceDB's IVF-PQ, on the same vectors, in one run.

The table: μ of a real model. The default recipe (vae.recipe, as `vaepipe train` runs it) is
trained on MNIST 8k (`--train-epochs`, 16 latents); its posterior q(z|x) of each of the 8,000 digits
is kept, and record i of the table is a draw z = μ_j + σ_j·ε from the posterior of a random digit j
(label = j's digit). So the table has the model's own clumps and spreads (classes, styles, the
posterior's width), not uniform noise, at any size. Written as an encode output is (zstd Parquet,
row groups of 65,536, committed with a manifest) and reused by later runs with the same settings.

Figures
  build     `vaepipe index --latents T` as a whole process: wall, its own peak RSS, index bytes,
            the recall@10 it measured and the nprobe it chose.
  recall    recall@10 of the index (at its nprobe) on 200 fresh draws that are not in the table,
            against their exact 10 nearest (the exact scan's search over the whole table).
  latency   in-process: the index opened as a query opens it (memory-mapped), one query vector at a
            time, 1,000 queries after 50 warm-up ones: p50 / p99. This is a service's work per request.
  process   a whole `vaepipe query --latents T --vector … --k 10` process (Python start, imports,
            index check, search, winners' columns read): median of `--repeats`; `vaepipe query --exact`
            and DuckDB's brute-force SQL on the same vector once each (their answers are checked
            against each other).
  service   `vaepipe serve --latents T` as a process (its own local Ray, one replica): a client on a
            kept-alive HTTP connection sends 1,000 vector requests one after another (p50 / p99 of
            each request's round trip), then 4 clients at once send 250 each; with --serve-proxy also
            through Serve's Python proxy instead of its HAProxy ingress.
  lancedb   the same vectors in a Lance table; IVF-PQ (√N partitions, 8 sub-vectors of 2 dims),
            searched with nprobes 8, 32, 128 and refine_factor 10, 50 (exact re-ranking of 10·k or
            50·k candidates): build wall and, per setting, recall@10 on the same fresh draws and p50
            latency. `matched`: for each of its settings, vaepipe's fastest nprobe with at least its
            recall, and the ratio of their p50s."""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import statistics
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.measure.bench_whole import child_env, load_avg, timed_run, vaepipe_command
from pipeline.search import ivf
from pipeline.search.knn import BlockSearch, latent_matrix
from pipeline.table.parquet_io import Commit, write_options
from pipeline.table.uris import resolve

DIM = 16
QUERIES = 200
LATENCY_QUERIES = 1_000
LANCE_SETTINGS = ((8, 10), (32, 10), (128, 10), (8, 50), (32, 50), (128, 50))   # (nprobes, refine_factor)


# --- the table: draws from a real model's posteriors ------------------------------------------------

def mnist_posteriors(seed: int, epochs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(μ, σ, labels) of the 8,000 MNIST digits under the default recipe trained on them, and a note."""
    import torch

    from pipeline.evaluation import datasets
    from pipeline.measure.panel import PanelSet, train_default

    x, y = datasets.mnist()
    x = x.reshape(len(x), -1)
    t0 = time.perf_counter()
    model, epochs = train_default(PanelSet("mnist", x, x[:0], y, y[:0], DIM, image_shape=(1, 28, 28)), seed, epochs)
    model.eval()
    with torch.no_grad():
        q = [model.embed(torch.from_numpy(x[i:i + 1000].astype(np.float32))) for i in range(0, len(x), 1000)]
    mu = torch.cat([d.mean for d in q]).numpy().astype(np.float32)
    sd = torch.cat([d.std for d in q]).numpy().astype(np.float32)
    return mu, sd, y.astype(np.int64), {"epochs": epochs, "train_s": round(time.perf_counter() - t0, 1)}


def make_table(folder: str, records: int, seed: int, epochs: int, files: int, row_group_rows: int = 65_536) -> dict:
    """The benchmark table (reused when its marker matches); returns how it was made."""
    marker = os.path.join(folder, "_bench_index.json")
    want = {"records": records, "seed": seed, "epochs": epochs, "files": files, "row_group_rows": row_group_rows,
            "version": 1}
    if os.path.exists(marker):
        with open(marker) as f:
            made = json.load(f)
        if made.get("want") == want:
            return made
    shutil.rmtree(folder, ignore_errors=True)
    ctl = os.path.join(os.path.dirname(folder), f"_{os.path.basename(folder)}.vaepipe")
    shutil.rmtree(ctl, ignore_errors=True)
    mu, sd, y, note = mnist_posteriors(seed, epochs)
    t0 = time.perf_counter()
    loc = resolve(folder)
    commit = Commit(loc)
    schema = pa.schema([("id", pa.int64()), ("label", pa.int64()), ("mu", pa.list_(pa.float32(), DIM))])
    rng = np.random.default_rng(seed + 1)
    bounds = np.linspace(0, records, files + 1).astype(np.int64)
    staged = []
    for i in range(files):
        path = commit.staged_path(f"part-{i:05d}.parquet")
        loc.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with pq.ParquetWriter(path, schema, **write_options(schema)) as w:
            for lo in range(int(bounds[i]), int(bounds[i + 1]), row_group_rows):
                hi = min(int(bounds[i + 1]), lo + row_group_rows)
                j = rng.integers(0, len(mu), hi - lo)
                z = mu[j] + sd[j] * rng.standard_normal((hi - lo, DIM), dtype=np.float32)
                w.write_table(pa.table({"id": np.arange(lo, hi, dtype=np.int64), "label": y[j],
                                        "mu": pa.FixedSizeListArray.from_arrays(pa.array(z.ravel()), DIM)},
                                       schema=schema), row_group_size=row_group_rows)
        staged.append((path, int(bounds[i + 1] - bounds[i])))
    commit.commit(staged, {"vaepipe.latent_dim": str(DIM), "vaepipe.bench": "draws from MNIST posteriors"})
    made = {"want": want, **note, "write_s": round(time.perf_counter() - t0, 1),
            "how": f"z = μ_j + σ_j·ε, j a random one of the 8,000 MNIST digits, under the default recipe "
                   f"({note['epochs']} epochs on MNIST 8k, 16 latents)"}
    with open(os.path.join(folder, "_bench_posteriors.npz"), "wb") as f:   # for fresh queries ('_': no reader sees it)
        np.savez(f, mu=mu, sd=sd)
    with open(marker, "w") as f:
        json.dump(made, f)
    return made


# --- fresh queries and their exact answers -----------------------------------------------------------

def fresh_queries(folder: str, seed: int) -> np.ndarray:
    """QUERIES new draws from the same posteriors (not rows of the table)."""
    with open(os.path.join(folder, "_bench_posteriors.npz"), "rb") as f:
        z = np.load(f)
        mu, sd = z["mu"], z["sd"]
    rng = np.random.default_rng(seed + 99)
    j = rng.integers(0, len(mu), QUERIES)
    return (mu[j] + sd[j] * rng.standard_normal((QUERIES, DIM), dtype=np.float32)).astype(np.float32)


def exact_rows(folder: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact k nearest table rows of each query (the exact scan's search over every block), and its wall."""
    from pipeline.search.latents import Latents
    from pipeline.table.parquet_io import list_parquet_files

    loc = resolve(folder)
    lat = Latents(loc, list_parquet_files(loc))
    s = BlockSearch(queries, k)
    t0 = time.perf_counter()
    for start, t in lat.blocks(["mu"]):
        s.add(latent_matrix(t.column("mu"), lat.metadata, folder), start)
    return s.result.rows, time.perf_counter() - t0


def recall(got: np.ndarray, truth: np.ndarray, k: int) -> float:
    return sum(len(set(g[:k].tolist()) & set(t[:k].tolist())) for g, t in zip(got, truth)) / (len(truth) * k)


def percentiles(walls: list[float]) -> dict[str, float]:
    a = np.asarray(walls) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


# --- the sides ------------------------------------------------------------------------------------------

def in_process(folder: str, queries: np.ndarray, truth: np.ndarray, k: int) -> dict[str, Any]:
    """Recall and per-query latency of the stored index, opened as a query opens it: at the nprobe
    the build chose (1,000 timed queries) and at 1, 2, 4, … cells (200 each) for the recall curve."""
    from pipeline.search import ann

    loc = resolve(folder)
    pointer = ann.read_pointer(loc)
    index = ann.open_index(loc, pointer)

    def timed(nprobe: int, n: int) -> dict[str, float]:
        rng = np.random.default_rng(5)
        walls = []
        for i in range(50 + n):
            q = queries[rng.integers(0, len(queries))] + rng.normal(0, 0.01, DIM).astype(np.float32)
            t0 = time.perf_counter()
            ivf.search(index, q[None], k, nprobe)
            if i >= 50:
                walls.append(time.perf_counter() - t0)
        return percentiles(walls)

    curve = []
    nprobe = 1
    while nprobe <= min(64, pointer["lists"]):
        _, got = ivf.search(index, queries, k, nprobe)
        curve.append({"nprobe": nprobe, "recall_at_10": round(recall(got, truth, k), 4), **timed(nprobe, 200)})
        nprobe *= 2
    _, got = ivf.search(index, queries, k, pointer["nprobe"])
    return {"recall_at_10": round(recall(got, truth, k), 4), "nprobe": pointer["nprobe"], "lists": pointer["lists"],
            "recall_at_build": pointer["recall"]["at_nprobe"], "index_bytes": pointer["bytes"],
            "build_seconds": pointer["seconds"], **timed(pointer["nprobe"], LATENCY_QUERIES), "curve": curve}


DUCKDB_VECTOR = r"""
import json, sys
import duckdb
folder, vec, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
rows = con.execute(f'''SELECT id, array_distance(mu::FLOAT[16], {vec}::FLOAT[16]) AS d
    FROM read_parquet('{folder}/*.parquet') ORDER BY d, id LIMIT {k}''').fetchall()
for i, d in rows:
    print(json.dumps({"id": i, "distance": d}))
"""


def processes(folder: str, queries: np.ndarray, k: int, repeats: int) -> dict[str, Any]:
    """Whole `vaepipe query` processes through the index (median of `repeats`, each another vector),
    and once each: `vaepipe query --exact` and DuckDB's SQL on the same vector (answers compared)."""
    env = child_env()
    env["VAEPIPE_CACHE_DIR"] = os.path.join(os.path.dirname(folder), "bench-index-cache")
    base = [*vaepipe_command(), "query", "--latents", folder, "--k", str(k), "--format", "jsonl"]
    vec = lambda q: ",".join(f"{v:.6f}" for v in q)
    timed_run([*base, "--vector=" + vec(queries[0])], env)   # warm-up: .pyc files, page cache
    runs = [timed_run([*base, "--vector=" + vec(queries[1 + r])], env) for r in range(repeats)]
    exact = timed_run([*base, "--vector=" + vec(queries[0]), "--exact", "--cache", "off"], env)
    sql = "[" + vec(queries[0]) + "]"
    duck = timed_run([sys.executable, "-c", DUCKDB_VECTOR, folder, sql, str(k)], env)
    ours = [json.loads(line)["id"] for line in exact["stdout"].strip().splitlines()]
    theirs = [json.loads(line)["id"] for line in duck["stdout"].strip().splitlines()]
    if ours != theirs:
        raise RuntimeError(f"bench index: vaepipe query --exact and DuckDB disagree: {ours} vs {theirs}")
    return {"index_query_s": round(statistics.median(r["wall"] for r in runs), 3),
            "index_query_peak_mb": max(r["own_peak_mb"] for r in runs),
            "exact_query_s": round(exact["wall"], 3), "duckdb_s": round(duck["wall"], 3)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc) -> None:
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except ProcessLookupError:                       # the group is gone already
        proc.wait()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _start_serve(folder: str, ingress: str, attempts: int = 3, ready_within: float = 300.0):
    """`vaepipe serve` on a free port, once its /healthz answers 200: (process, port, seconds to ready).
    The port is free when picked but not reserved: a process started meanwhile (a Ray worker's gRPC
    server, say) can take it before serve binds it. A non-HTTP answer there, or a serve that exits
    first, means exactly that (serve cannot bind it), and the next attempt takes another port."""
    import http.client
    import subprocess
    import urllib.request

    for _ in range(attempts):
        port = _free_port()
        proc = subprocess.Popen([*vaepipe_command(), "serve", "--latents", folder, "--port", str(port),
                                 "--ray-address", "local", "--ingress", ingress], env=child_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.perf_counter()
        taken = False
        while not taken and proc.poll() is None and time.perf_counter() - t0 < ready_within:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    if r.status == 200:
                        return proc, port, time.perf_counter() - t0
            except http.client.RemoteDisconnected:   # accepted and closed while it starts
                pass
            except http.client.HTTPException:       # something that is not an HTTP server holds the port
                taken = True
            except OSError:                          # nothing listening yet (or a 5xx while it starts)
                pass
            time.sleep(0.5)
        exited = proc.poll() is not None
        _stop(proc)
        if not (taken or exited):                    # alive but not ready in time: not a port clash
            break
    raise RuntimeError(f"bench index: vaepipe serve --ingress {ingress} did not become ready (last port {port})")


def service_side(folder: str, queries: np.ndarray, k: int, clients: int = 4, ingress: str = "haproxy") -> dict[str, Any]:
    """`vaepipe serve --ingress INGRESS` as a process (its own local Ray): per-request latency over
    HTTP, one client on a kept-alive connection (1,000 requests after 50 warm-up ones), then
    `clients` clients at once."""
    import http.client
    import threading

    proc, port, ready_s = _start_serve(folder, ingress)
    try:
        def run(n: int, seed: int, walls: list) -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            rng = np.random.default_rng(seed)
            for i in range(n):
                body = json.dumps({"vector": queries[rng.integers(0, len(queries))].tolist(), "k": k})
                t = time.perf_counter()
                c.request("POST", "/neighbours", body=body, headers={"Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    raise RuntimeError(f"bench index: the service answered {r.status}")
                walls.append(time.perf_counter() - t)
            c.close()

        run(50, 0, [])
        one: list[float] = []
        run(LATENCY_QUERIES, 1, one)
        many: list[list[float]] = [[] for _ in range(clients)]
        threads = [threading.Thread(target=run, args=(250, 10 + i, many[i])) for i in range(clients)]
        t1 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t1
        flat = [w for m in many for w in m]
        return {"ingress": ingress, "ready_s": round(ready_s, 1), "one_client": percentiles(one),
                f"{clients}_clients": {**percentiles(flat), "requests_per_s": round(len(flat) / wall, 1)}}
    finally:
        _stop(proc)


def lancedb_side(folder: str, queries: np.ndarray, truth: np.ndarray, k: int, keep: bool = False) -> dict[str, Any]:
    """LanceDB IVF-PQ on the same vectors: build wall, then recall@k and p50 per nprobes setting. With
    `keep` a Lance table and index an earlier run built from this same benchmark table (its marker names
    the table's own marker, the row count and the index settings) is searched again, its build timings
    taken from that marker: at 100 M rows the build takes the better part of an hour on 2 cores."""
    os.environ.setdefault("LANCE_LOG", "error")   # its per-search deprecation warnings otherwise fill the output
    try:
        import lancedb
    except ImportError:
        return {"skipped": "lancedb is not installed (pip install 'vaepipe[bench]')"}
    import pyarrow.dataset as pads

    from pipeline.table.parquet_io import list_parquet_files

    n = sum(pq.read_metadata(f).num_rows for f in list_parquet_files(resolve(folder)))
    parts = max(1, round(np.sqrt(n)))
    home = os.path.join(os.path.dirname(folder), f"lance-{os.path.basename(folder)}")
    marker = os.path.join(home, "_bench_lance.json")
    with open(os.path.join(folder, "_bench_index.json")) as f:
        want = {"source": json.load(f)["want"], "rows": n, "partitions": parts, "sub_vectors": 8,
                "version": lancedb.__version__}
    kept = None
    if keep and os.path.exists(marker):
        with open(marker) as f:
            kept = json.load(f)
        kept = kept if kept.get("want") == want else None
    if kept is not None:
        table = lancedb.connect(home).open_table("mu")
        t_load, t_index = kept["load_s"], kept["index_s"]
    else:
        shutil.rmtree(home, ignore_errors=True)
        db = lancedb.connect(home)
        src = pads.dataset(list_parquet_files(resolve(folder)), format="parquet")
        schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), DIM))])

        def batches():
            for b in src.to_batches(columns=["id", "mu"], batch_size=1 << 20):
                yield pa.RecordBatch.from_arrays([b.column(0), b.column(1)], schema=schema)

        t0 = time.perf_counter()
        table = db.create_table("mu", data=pa.RecordBatchReader.from_batches(schema, batches()))
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        table.create_index(metric="l2", num_partitions=parts, num_sub_vectors=8, vector_column_name="vector")
        t_index = time.perf_counter() - t0
        with open(marker + ".tmp", "w") as f:                  # written last: a marker means a whole index
            json.dump({"want": want, "load_s": t_load, "index_s": t_index, "built_at": time.time()}, f)
        os.replace(marker + ".tmp", marker)
    settings = []
    for nprobes, refine in LANCE_SETTINGS:
        if nprobes > parts:
            continue
        search = lambda q: (table.search(q).metric("l2").nprobes(nprobes).refine_factor(refine).limit(k)
                            .select(["id"]).to_arrow().column("id").to_numpy())
        got = np.stack([search(q) for q in queries])
        walls = []
        for q in queries[:100]:
            t0 = time.perf_counter()
            search(q)
            walls.append(time.perf_counter() - t0)
        settings.append({"nprobes": nprobes, "refine_factor": refine, "recall_at_10": round(recall(got, truth, k), 4),
                         **percentiles(walls)})
    return {"version": lancedb.__version__, "load_s": round(t_load, 1), "index_s": round(t_index, 1),
            "kept": kept is not None, "partitions": parts, "sub_vectors": 8, "settings": settings}


def matched(curve: list[dict], settings: list[dict]) -> list[dict]:
    """For each LanceDB setting, vaepipe's fastest nprobe whose recall is at least as high."""
    out = []
    for s in settings:
        ours = [c for c in curve if c["recall_at_10"] >= s["recall_at_10"]]
        if ours:
            best = min(ours, key=lambda c: c["p50_ms"])
            out.append({"lancedb": s, "vaepipe": best, "lancedb_over_vaepipe_p50": round(s["p50_ms"] / best["p50_ms"], 1)})
    return out


# --- the run ----------------------------------------------------------------------------------------------

def _fresh_index(folder: str) -> bool:
    from pipeline.search import ann
    from pipeline.search.latents import Latents
    from pipeline.table.parquet_io import list_parquet_files

    loc = resolve(folder)
    return ann.freshness(ann.read_pointer(loc), Latents(loc, list_parquet_files(loc)), "mu") is None


def bench_index(cfg) -> dict[str, Any]:
    root = os.path.abspath(os.path.join(cfg.workdir, "bench"))
    folder = os.path.join(root, f"index-{cfg.records}")
    os.makedirs(root, exist_ok=True)
    made = make_table(folder, cfg.records, cfg.seed, cfg.train_epochs, cfg.query_files)
    k = cfg.k
    queries = fresh_queries(folder, cfg.seed)
    truth, exact_wall = exact_rows(folder, queries, k)
    if cfg.keep_index and _fresh_index(folder):
        from pipeline.search import ann

        p = ann.read_pointer(resolve(folder))
        build = {"wall": sum(p["seconds"].values()), "own_peak_mb": None,
                 "stdout": f"kept the table's fresh index built at {p['built_at']} (phases {p['seconds']} s)"}
    else:
        build = timed_run([*vaepipe_command(), "index", "--latents", folder, "--no-extend"], child_env())   # from scratch
    load_before = load_avg()
    proc = in_process(folder, queries, truth, k)
    whole = processes(folder, queries, k, cfg.n_repeats)
    service = service_side(folder, queries, k)
    if cfg.serve_proxy:
        service["python_proxy"] = service_side(folder, queries, k, ingress="proxy")
    lance = lancedb_side(folder, queries, truth, k, cfg.keep_index) if cfg.lancedb else {"skipped": "--no-lancedb"}
    if "settings" in lance:
        lance["matched"] = matched(proc["curve"], lance["settings"])
    return {"what": "index", "records": cfg.records, "dim": DIM, "k": k, "table": made,
            "exact_scan_in_process_s_for_200": round(exact_wall, 2),
            "build": {"wall_s": round(build["wall"], 1), "peak_mb": build["own_peak_mb"],
                      "stdout": build["stdout"].strip().splitlines()[-1:]},
            "index": proc, "processes": whole, "service": service, "lancedb": lance,
            "load_avg_before": load_before, "load_avg_after": load_avg()}


def summary_index(f: dict[str, Any]) -> str:
    i, p, b, lance = f["index"], f["processes"], f["build"], f["lancedb"]
    lines = [f"bench index: {f['records']:,} latents of {f['dim']} dims ({f['table']['how']})",
             f"  build (vaepipe index, whole process): {b['wall_s']:,.1f} s, peak RSS "
             f"{'not measured (--keep-index)' if b['peak_mb'] is None else format(b['peak_mb'], ',.0f') + ' MiB'}, "
             f"index {i['index_bytes'] / 2**20:,.0f} MiB, {i['lists']:,} cells",
             f"  recall@{f['k']} on 200 fresh draws: {i['recall_at_10']:.4f} at nprobe {i['nprobe']} "
             f"(measured at build on its own records: {i['recall_at_build']:.4f})",
             f"  in-process latency per query: p50 {i['p50_ms']:.2f} ms, p99 {i['p99_ms']:.2f} ms; build phases (s): "
             f"{i['build_seconds']}",
             "  recall / p50 by nprobe: " + ", ".join(f"{c['nprobe']}: {c['recall_at_10']:.4f} / {c['p50_ms']:.2f} ms"
                                                      for c in i["curve"]),
             f"  whole `vaepipe query` process: {p['index_query_s']:.3f} s through the index "
             f"(peak {p['index_query_peak_mb']:,.0f} MiB); --exact {p['exact_query_s']:.2f} s; "
             f"DuckDB SQL {p['duckdb_s']:.2f} s"]
    sv = f["service"]
    for v in [sv] + ([sv["python_proxy"]] if "python_proxy" in sv else []):
        many = next(x for key, x in v.items() if key.endswith("_clients"))
        lines.append(f"  service (vaepipe serve over HTTP, --ingress {v.get('ingress', 'haproxy')}, one client): p50 "
                     f"{v['one_client']['p50_ms']:.2f} ms, p99 {v['one_client']['p99_ms']:.2f} ms; 4 clients: p50 "
                     f"{many['p50_ms']:.2f} ms, p99 {many['p99_ms']:.2f} ms, {many['requests_per_s']:,.0f} requests/s "
                     f"(ready in {v['ready_s']:.0f} s)")
    if "skipped" in lance:
        lines.append(f"  lancedb: skipped ({lance['skipped']})")
    else:
        lines.append(f"  lancedb {lance['version']} IVF-PQ ({lance['partitions']:,} partitions, {lance['sub_vectors']} "
                     f"sub-vectors): load {lance['load_s']:.1f} s + index {lance['index_s']:.1f} s"
                     f"{' (kept from an earlier run: its timings)' if lance.get('kept') else ''}")
        for s in lance["settings"]:
            lines.append(f"    nprobes {s['nprobes']:>4}, refine {s['refine_factor']:>2}: recall@10 {s['recall_at_10']:.4f}, "
                         f"p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms")
        for m in lance["matched"]:
            lines.append(f"  at recall ≥ {m['lancedb']['recall_at_10']:.4f}: vaepipe nprobe {m['vaepipe']['nprobe']} p50 "
                         f"{m['vaepipe']['p50_ms']:.2f} ms, LanceDB (nprobes {m['lancedb']['nprobes']}, refine "
                         f"{m['lancedb']['refine_factor']}) {m['lancedb']['p50_ms']:.2f} ms: "
                         f"{m['lancedb_over_vaepipe_p50']:.1f}× vaepipe's")
    return "\n".join(lines)
