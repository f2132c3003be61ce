"""`vaepipe bench encode|train` at a tiny size through the real code (local Ray, MLflow store): the
figures are there, finite and positive, and both sides produced the right output. Nothing here is
timed: the figures themselves are for docs/performance.md, not for a test on a shared machine."""
from __future__ import annotations

import json
import math
import os
import signal
import time

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.measure.bench_common import BenchConfig, PeakRSS, make_input, tree_memory, tree_rss_bytes
from pipeline.runtime.errors import ConfigError

KEYS = ("baseline_records_per_s", "pipeline_records_per_s", "ratio", "peak_rss_mb", "records", "device")


def check_figures(f: dict, records: int) -> None:
    for k in KEYS:
        assert k in f, k
    assert f["records"] == records
    for k in ("baseline_records_per_s", "pipeline_records_per_s", "ratio", "peak_rss_mb"):
        assert math.isfinite(f[k]) and f[k] > 0, (k, f[k])
    assert f["device"].startswith(("cpu", "cuda"))


def test_make_input_writes_tiled_mnist_in_row_groups_and_reuses_it(tmp_path):
    files = make_input(str(tmp_path / "in"), 10_000, row_group_rows=3_000, file_rows=6_000)
    assert len(files) == 2
    md = [pq.read_metadata(f) for f in files]
    assert [m.num_rows for m in md] == [6_000, 4_000] and md[0].num_row_groups == 2
    t = pq.read_table(files[1])
    assert t.column("id").to_pylist() == list(range(6_000, 10_000))
    assert t.schema.field("image").type.list_size == 784
    assert make_input(str(tmp_path / "in"), 10_000, row_group_rows=3_000, file_rows=6_000) == files


def test_bench_encode_cli_writes_the_figures_and_both_outputs_agree(ray_local, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["bench", "encode", "--records", "5000", "--row-group-rows", "1000", "--workdir", str(tmp_path),
                 "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    check_figures(f, 5000)
    assert f["what"] == "encode" and f["pipeline_files"] >= 1
    assert f["max_abs_mu_diff"] < 1e-5            # baseline and vaepipe wrote the same μ (first ids)
    assert 0 < f["pipeline_units_span_s"] <= f["pipeline_wall_s"]
    text = capsys.readouterr().out
    assert "records/s" in text and "ratio vaepipe/baseline" in text
    assert f["pipeline_executor"] == "ray" and "--executor ray" in text


def test_bench_encode_local_executor_side_agrees_with_the_baseline(ray_local, tmp_path):
    # --executor local: the in-process encoder threads (what `vaepipe encode` picks on local files)
    out = tmp_path / "l.json"
    assert main(["bench", "encode", "--executor", "local", "--records", "3000", "--row-group-rows", "1000",
                 "--hidden", "32,16", "--workdir", str(tmp_path), "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    check_figures(f, 3000)
    assert f["pipeline_executor"] == "local" and f["pipeline_actors"] is None and f["pipeline_threads"] >= 1
    assert f["max_abs_mu_diff"] < 1e-5


def test_bench_train_cli_writes_the_figures(ray_local, tmp_path):
    # bf16 autocast on both sides (CPU autocast here; the same flag on a GPU host)
    out = tmp_path / "t.json"
    assert main(["bench", "train", "--records", "3000", "--epochs", "2", "--hidden", "32,16", "--amp", "bf16",
                 "--workdir", str(tmp_path), "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    check_figures(f, 3000)
    assert f["what"] == "train" and f["amp"] == "bf16"
    assert len(f["baseline_epoch_s"]) == len(f["pipeline_epoch_s"]) == 2
    assert math.isfinite(f["final_train_neg_elbo"])


def test_bench_config_checks_and_rss_helpers():
    with pytest.raises(ConfigError, match="epochs must be ≥ 2"):
        BenchConfig(what="train", epochs=1)
    with pytest.raises(ConfigError, match="records"):
        BenchConfig(records=0)
    with pytest.raises(ConfigError, match="only `vaepipe bench train` takes it"):
        BenchConfig(what="encode", amp="fp16")
    assert BenchConfig(what="train").bs == 128 and BenchConfig().bs == 4096
    with PeakRSS(interval=0.01) as m:
        blob = bytearray(64 * 2**20)
    assert m.peak >= tree_rss_bytes() - 2**30 and m.peak_mb > 64
    assert 0 < m.peak_pss_mb <= m.peak_mb
    del blob


def test_tree_pss_counts_a_page_shared_by_a_forked_child_once():
    blob = bytearray(b"x" * (64 * 2**20))             # touched: 64 MiB resident in this process
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                       # the child shares those pages (copy-on-write)
        os.close(r)
        os.write(w, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        os.close(w)
        os.read(r, 1)
        rss, pss = tree_memory(pss=True)
        # summed RSS counts the shared 64 MiB twice (parent and child), PSS once
        assert rss - pss >= 0.9 * 64 * 2**20, (rss, pss)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    del blob


def test_bench_query_runs_both_processes_and_they_agree(tmp_path, capsys):
    pytest.importorskip("duckdb")
    out = tmp_path / "q.json"
    assert main(["bench", "query", "--records", "3000", "--query-files", "3", "--query-ids", "5", "--repeats", "1",
                 "--workdir", str(tmp_path), "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    check_figures(f, 3000)
    assert f["what"] == "query" and f["same_answer"] is True and len(f["answer"]) == 10
    assert f["pipeline_many_ids"] == 5 and f["pipeline_many_ids_wall_s"] > 0
    # the cached and the Parquet-only query both timed; the bench's own cache folder holds one entry
    assert f["pipeline_nocache_wall_s"] > 0 and f["pipeline_first_wall_s"] > 0
    assert len(list((tmp_path / "bench" / "query-cache-3000").glob("*.arrow"))) == 1
    assert "ratio DuckDB/vaepipe" in capsys.readouterr().out


def test_bench_device_cuda_without_a_gpu_exits_with_a_message(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the cuda path runs for real")
    for what in ("encode", "train"):
        assert main(["bench", what, "--device", "cuda", "--records", "100", "--workdir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "no CUDA GPU is visible" in err and "nothing was measured" in err
    assert not (tmp_path / "bench").exists()          # refused before generating anything


@pytest.mark.slow
def test_bench_encode_whole_process_times_both_processes_on_both_layouts(tmp_path):
    out = tmp_path / "w.json"
    assert main(["bench", "encode", "--whole-process", "--records", "6000", "--row-group-rows", "2048",
                 "--file-rows", "3000", "--repeats", "1", "--hidden", "32,16", "--workdir", str(tmp_path),
                 "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    check_figures(f, 6000)
    assert set(f["layouts"]) == {"pyarrow-default", "2048"}
    assert f["layouts"]["pyarrow-default"]["row_groups_per_file"] == [1, 1]
    for g in f["layouts"].values():
        check_figures(g, 6000)
        assert g["max_abs_mu_diff"] < 1e-5 and g["whole_process"] is True


def test_bench_bound_scales_its_measured_rates_to_the_floors_it_prints(capsys):
    import torch

    from pipeline.measure.bench_bound import main as bound

    threads = torch.get_num_threads()
    f = bound(["--records", "1000000", "--sample", "8192", "--batch-size", "4096"])
    rates = (f["compute_all_threads_records_per_s"], f["compute_1_thread_records_per_s"],
             f["decode_1_thread_records_per_s"])
    assert all(math.isfinite(r) and r > 0 for r in rates)
    c_all, c1, dec = rates
    assert f["script_floor_s"] == pytest.approx(1e6 / dec + 1e6 / c_all)
    assert f["vaepipe_floor_s"] == pytest.approx(1e6 * (1 / dec + 1 / c1) / f["cores"])
    assert f["ratio_upper_bound"] == pytest.approx(f["script_floor_s"] / f["vaepipe_floor_s"])
    # the workers measured at once (real processes, one per core) give the floor that is printed beside it
    both = f["concurrent_workers_records_per_s"]
    assert math.isfinite(both) and both > 0
    assert f["vaepipe_floor_concurrent_s"] == pytest.approx(1e6 / both)
    assert f["ratio_bound_concurrent"] == pytest.approx(f["script_floor_s"] / f["vaepipe_floor_concurrent_s"])
    text = capsys.readouterr().out
    assert "upper bound on the whole-process ratio" in text and "one-thread workers at once" in text
    assert torch.get_num_threads() == threads                 # the timing left this process's threads alone


def test_bench_index_prints_every_side_and_the_exact_sides_agree(tmp_path, capsys):
    """The whole `vaepipe bench index` on a small table: the model's posteriors drawn from, the index
    built by its own process, recall against the exact scan, the query processes (the exact one
    checked against DuckDB inside the bench), the service over HTTP and LanceDB."""
    pytest.importorskip("duckdb")
    pytest.importorskip("lancedb")
    out = tmp_path / "i.json"
    assert main(["bench", "index", "--records", "30000", "--train-epochs", "1", "--query-files", "2", "--repeats", "1",
                 "--serve-proxy", "--workdir", str(tmp_path), "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    assert f["what"] == "index" and f["records"] == 30_000
    assert f["table"]["epochs"] == 1 and "MNIST" in f["table"]["how"]
    i = f["index"]
    assert 0 < i["recall_at_10"] <= 1 and i["p50_ms"] > 0 and i["curve"][0]["nprobe"] == 1
    assert [c["nprobe"] for c in i["curve"]] == sorted(c["nprobe"] for c in i["curve"])
    assert f["build"]["wall_s"] > 0 and f["build"]["peak_mb"] > 0 and "recall@10" in f["build"]["stdout"][0]
    assert f["processes"]["index_query_s"] > 0 and f["processes"]["duckdb_s"] > 0
    assert f["service"]["one_client"]["p50_ms"] > 0 and f["service"]["4_clients"]["requests_per_s"] > 0
    assert f["service"]["ingress"] == "haproxy" and f["service"]["python_proxy"]["ingress"] == "proxy"
    assert f["lancedb"]["settings"] and all(0 <= s["recall_at_10"] <= 1 for s in f["lancedb"]["settings"])
    printed = capsys.readouterr().out
    assert "bench index: 30,000 latents" in printed and "service (vaepipe serve over HTTP" in printed


def test_lancedb_side_searches_a_kept_index_again_only_for_the_same_table(tmp_path, monkeypatch):
    """`--keep-index` reuses the Lance table an earlier run built (its build timings from the marker) when
    the benchmark table is the same, and rebuilds when the table under it was remade."""
    pytest.importorskip("lancedb")
    import numpy as np

    from pipeline.measure import bench_index as b

    rng = np.random.default_rng(0)        # the posteriors the table is drawn from (the MNIST model is not what is tested)
    post = (rng.standard_normal((200, b.DIM)).astype(np.float32), np.full((200, b.DIM), 0.1, np.float32),
            rng.integers(0, 10, 200))
    monkeypatch.setattr(b, "mnist_posteriors", lambda seed, epochs: (*post, {"epochs": epochs, "train_s": 0.0}))
    folder = str(tmp_path / "bench" / "index-3000")
    b.make_table(folder, 3000, 0, 1, 2, row_group_rows=1000)
    queries = b.fresh_queries(folder, 0)
    truth, _ = b.exact_rows(folder, queries, 10)
    first = b.lancedb_side(folder, queries, truth, 10, keep=True)            # nothing kept yet: built
    again = b.lancedb_side(folder, queries, truth, 10, keep=True)
    assert not first["kept"] and again["kept"]
    assert (again["load_s"], again["index_s"]) == (first["load_s"], first["index_s"])
    assert again["settings"][0]["recall_at_10"] == first["settings"][0]["recall_at_10"] > 0.5
    b.make_table(folder, 3000, 1, 1, 2, row_group_rows=1000)                 # another seed: the table is remade
    truth, _ = b.exact_rows(folder, queries, 10)
    assert not b.lancedb_side(folder, queries, truth, 10, keep=True)["kept"]
    assert not b.lancedb_side(folder, queries, truth, 10, keep=False)["kept"]


def test_the_service_side_moves_to_another_port_when_a_non_http_server_took_the_picked_one(tmp_path, monkeypatch):
    """The picked port is free, not reserved: here a gRPC-like server (bytes, no HTTP) holds the first
    one, so the health check must not take its answer for an error of serve's and must try a new port.
    The latents folder is missing, so each real `vaepipe serve` exits and every attempt fails; what is
    checked is which ports were tried."""
    import socket
    import threading

    from pipeline.measure import bench_index

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]

    def answer_in_bytes():
        while True:
            try:
                conn, _ = squatter.accept()
            except OSError:
                return
            conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x05\x00\x00@\x00")   # an HTTP/2 SETTINGS frame
            conn.close()

    threading.Thread(target=answer_in_bytes, daemon=True).start()
    real, tried = bench_index._free_port, []

    def port():
        tried.append(taken if not tried else real())
        return tried[-1]

    monkeypatch.setattr(bench_index, "_free_port", port)
    try:
        with pytest.raises(RuntimeError, match="did not become ready"):
            bench_index._start_serve(str(tmp_path / "missing"), "haproxy", attempts=3, ready_within=60)
    finally:
        squatter.close()
    assert tried[0] == taken and len(tried) == 3 and taken not in tried[1:]
