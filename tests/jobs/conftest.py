"""Real servers for the job tests, on loopback only: an `mlflow server` (train/register/encode talk to
it over HTTP), and the helpers the Ray-head tests share (tests/pipeline/runtime/test_ray_runtime.py,
tests/cluster/harness.py). Each server gets its own free ports and temp dirs; teardown stops exactly
the processes it started.

`ray stop` is deliberately not used: it kills every Ray process of the user on the machine (other test
sessions included) and has no address filter. `ray start` runs in a new session (setsid), every process
of that head inherits the session id, and teardown signals exactly those pids (SIGTERM, bounded wait,
SIGKILL). Jobs submitted to a head (`ray job submit`, working_dir upload) are tested on the multi-node
cluster of tests/cluster."""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent          # the venv's bin: ray, mlflow, python


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Pids of live processes in session `sid` (Linux /proc)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()       # after "(comm)": state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(d))
    return pids


def _cmdline_pids(marker: str) -> list[int]:
    """Pids whose command line names `marker` (our unique temp dir): processes that left the session."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(d))
    return pids


def stop_pids(find, grace_s: float = 15.0) -> list[int]:
    """SIGTERM what `find()` returns, wait up to grace_s, SIGKILL what is left. Returns survivors."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = find()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while find() and time.monotonic() < deadline:
            time.sleep(0.2)
    return find()


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None, expect: bytes | None = None,
              headers: dict[str, str] | None = None) -> bytes:
    """GET url until it answers 200 (and contains `expect`), bounded by timeout_s."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
                body = r.read()
                if r.status == 200 and (expect is None or expect in body):
                    return body
                last = f"HTTP {r.status}: {body[:200]!r}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s (last: {last})")


def _tail(path: pathlib.Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class MlflowServer:
    def __init__(self, url: str, root: pathlib.Path, proc: subprocess.Popen, log: pathlib.Path):
        self.url, self.root, self.proc, self.log = url, root, proc, log


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1:<free port>: SQLite backend store and a proxied artifact
    store in a temp dir, one worker. Ready when GET /health says OK."""
    root = tmp_path_factory.mktemp("mlflow-server")
    (port,) = free_ports(1)
    log = root / "server.log"
    # as infra/mlflow/mlflow.yaml deploys it: without MLflow's job runner (8 more processes, ~30 s of CPU
    # to start, for GenAI jobs vaepipe never submits)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(root),
                                start_new_session=True)
    find = lambda: _session_pids(proc.pid)  # noqa: E731  (the server, its uvicorn worker(s))
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=proc, expect=b"OK")
        except (TimeoutError, RuntimeError) as e:
            pytest.fail(f"mlflow server did not become healthy: {e}\n{_tail(log)}")
        yield MlflowServer(f"http://127.0.0.1:{port}", root, proc, log)
    finally:
        survivors = stop_pids(find)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        assert not survivors, f"mlflow server processes survived teardown: {survivors}"


@pytest.fixture(scope="session")
def http_trained(ray_local, mlflow_server, digits_parquet, tmp_path_factory):
    """(TrainResult, workdir): one model trained, registered and promoted through the tracking server,
    as a user with credentials runs it: a password in the tracking URI (the server has no auth, so
    requests sends it as basic auth) and storage options holding a key and a secret. Shared by the
    tracking-server test (what reached the server) and the redaction test (what must not have)."""
    from pipeline.training.train import TrainConfig, run_train
    from tests.jobs.credentials import OPTIONS, PW

    work = tmp_path_factory.mktemp("http-train")
    url = f"http://vaepipe:{PW}@{mlflow_server.url.removeprefix('http://')}"
    r = run_train(TrainConfig(input=digits_parquet, features=["image"], hidden=[8, 16], latent_dim=2, epochs=1,
                              workers=1, batch_size=128, model_name="digits-http", promote="force",
                              tracking_uri=url, workdir=str(work),
                              storage_options=OPTIONS.replace('"anon": false', '"auto_mkdir": true')))
    return r, work
