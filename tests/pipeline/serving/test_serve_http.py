"""`vaepipe serve` as users run it: a real process on Ray Serve, a real HTTP client with concurrent
requests while a nightly commits a new partition and rebuilds the index under its lease; the
service keeps answering from a whole build, picks up the new one without a restart, encodes new
records with the registered model, and stops cleanly on SIGTERM."""
from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq

from pipeline.batch.nightly import NightlyConfig, run_nightly
from pipeline.search import ann
from pipeline.table.uris import resolve
from tests.jobs.conftest import free_ports, wait_http
from tests.pipeline.batch.test_batch_jobs import daily_partitions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MODEL = "models:/digits@production"


def _request(port: int, method: str, path: str, body=None) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request(method, path, body=None if body is None else (body if isinstance(body, bytes) else json.dumps(body)),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def test_serve_answers_concurrent_clients_while_a_nightly_commits_and_picks_up_the_new_index(
        trained_digits, digits_parquet, workdir, tmp_path):
    src, out = tmp_path / "in", str(tmp_path / "out")
    files = daily_partitions(digits_parquet, src, 2)
    cfg = NightlyConfig(model=MODEL, input=str(src), output=out, workdir=workdir, index="ivf-flat")
    run_nightly(cfg)
    first = ann.read_pointer(resolve(out))
    (port,) = free_ports(1)
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--latents", out, "--model", MODEL,
                                 "--workdir", workdir, "--port", str(port), "--ray-address", "local", "--poll-s", "0.5"],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout_s=240, proc=proc)
        old_ids = pq.read_table(os.path.join(out, "date=2026-11-01"), columns=["id"]).column("id").to_pylist()
        answers, stop = [], threading.Event()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                body = {"id": rng.choice(old_ids), "k": 5} if rng.random() < 0.5 else \
                    {"vector": [rng.uniform(-2, 2) for _ in range(4)], "k": 5}
                answers.append(_request(port, "POST", "/neighbours", body))

        clients = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        for t in clients:
            t.start()
        time.sleep(1.0)
        daily_partitions(digits_parquet, src, 3, first=3)
        run_nightly(cfg)                                      # commits a partition, then the index, under its lease
        second = ann.read_pointer(resolve(out))
        deadline = time.monotonic() + 60
        while _request(port, "GET", "/healthz")[1]["build"] != second["build"]:
            assert time.monotonic() < deadline, "the service never picked up the new build"
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in clients:
            t.join(timeout=60)
        builds = [a[1]["index"]["build"] for a in answers if a[0] == 200]
        assert len(answers) >= 40 and all(s == 200 and len(b["neighbours"]) == 5 for s, b in answers), \
            [a for a in answers if a[0] != 200][:3]
        assert set(builds) == {first["build"], second["build"]}   # every answer from one whole build
        # the new partition's records are there, and a new record is encoded by the registered model
        t3 = pq.read_table(os.path.join(out, "date=2026-11-03"), columns=["id"])
        new_id = t3.column("id")[0].as_py()
        status, got = _request(port, "POST", "/neighbours", {"id": new_id, "k": 3})
        assert status == 200 and got["index"] == {"build": second["build"], "runs": second["runs"], "fresh": True}
        raw = pq.read_table(os.path.join(digits_parquet, files[2]), columns=["id", "image"]).slice(0, 1).to_pylist()[0]
        status, got = _request(port, "POST", "/neighbours", {"record": {"image": raw["image"]}, "k": 1})
        assert status == 200 and got["neighbours"][0]["id"] == raw["id"] and got["neighbours"][0]["distance"] < 1e-4
        status, got = _request(port, "POST", "/neighbours", {"record": {"pixels": [0] * 64}})
        assert status == 422 and "image" in got["error"]
        assert _request(port, "POST", "/neighbours", b"{oops")[0] == 400
        assert _request(port, "POST", "/neighbours", {"id": -7})[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = "killed"
    assert rc == 0, log.read_text()[-3000:]


def test_two_services_run_side_by_side_and_leave_no_ingress_process_behind(tmp_path):
    """HAProxy's stats and metrics ports are chosen per service (two on one machine both start), and
    stopping a service stops its HAProxy too (Ray's shutdown alone would orphan it)."""
    from tests.pipeline.search.test_ann import _build, _table

    folder, _, _ = _table(tmp_path / "lat", n=2_000)
    _build(folder, lists=10)
    ports = free_ports(2)
    procs = [subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--latents", folder, "--port", str(p),
                               "--ray-address", "local"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                              stdout=open(tmp_path / f"serve-{p}.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
             for p in ports]
    try:
        for p, proc in zip(ports, procs):
            wait_http(f"http://127.0.0.1:{p}/healthz", timeout_s=240, proc=proc)
            assert _request(p, "POST", "/neighbours", {"vector": [0.0] * 16, "k": 2})[0] == 200
    finally:
        codes = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            codes.append(proc.wait(timeout=90))
    assert codes == [0, 0], [(tmp_path / f"serve-{p}.log").read_text()[-2000:] for p in ports]
    assert [p for p in ports if any(f"127.0.0.1:{p}" in cfg for cfg in _haproxy_configs())] == []


def _haproxy_configs() -> list[str]:
    """The config text of every HAProxy process alive on this machine (its `-f FILE`)."""
    out = []
    for pid in subprocess.run(["pgrep", "-x", "haproxy"], capture_output=True, text=True).stdout.split():
        try:
            argv = open(f"/proc/{pid}/cmdline").read().split("\0")
            out.append(open(argv[argv.index("-f") + 1]).read())
        except (OSError, ValueError, IndexError):   # exited meanwhile
            pass
    return out
