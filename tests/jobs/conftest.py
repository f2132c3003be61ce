"""Real servers for the job tests, on loopback only: a Ray head started with `ray start --head` (jobs are
submitted to its dashboard with the Jobs SDK) and an `mlflow server` (train/register/encode talk to it
over HTTP). Each gets its own free ports and temp dirs; teardown stops exactly the processes it started.

`ray stop` is deliberately not used: it kills every Ray process of the user on the machine (other test
sessions included) and has no address filter. `ray start` runs in a new session (setsid), every process
of that head inherits the session id, and teardown signals exactly those pids (SIGTERM, bounded wait,
SIGKILL)."""
from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


class RayHead:
    def __init__(self, temp_dir: str, gcs_port: int, dashboard_port: int, log: pathlib.Path, token: str):
        self.temp_dir, self.gcs_port, self.dashboard_port, self.log = temp_dir, gcs_port, dashboard_port, log
        self.headers = {"Authorization": f"Bearer {token}"}   # Ray 2.60 heads require a token by default
        self.address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self.sid: int | None = None


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head (`ray start --head`) on 127.0.0.1 with its own ports and a short temp dir (Unix
    socket paths must stay under ~107 characters), 4 logical CPUs, the dashboard (Jobs API) on."""
    logs = tmp_path_factory.mktemp("rayhead")
    temp_dir = tempfile.mkdtemp(prefix="vpray-", dir="/tmp")
    (gcs, dash, client, node_mgr, obj_mgr, agent_http, agent_grpc, env_agent, metrics) = free_ports(9)
    token = secrets.token_hex(32)     # this head's own token, never ~/.ray/auth_token
    head = RayHead(temp_dir, gcs, dash, logs / "ray-start.log", token)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",   # job drivers run `python` = the venv's
           # `--node-ip-address 127.0.0.1` alone is rewritten to the host's address (Ray's
           # resolve_ip_for_localhost); with cluster mode off the head advertises loopback everywhere
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--ray-client-server-port", str(client), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--dashboard-agent-listen-port", str(agent_http),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
           "--metrics-export-port", str(metrics), "--temp-dir", temp_dir, "--num-cpus", "4",
           "--object-store-memory", str(200 * 1024 * 1024), "--disable-usage-stats"]
    with open(head.log, "wb") as out:
        starter = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                   start_new_session=True)
    head.sid = starter.pid           # every process of this head inherits this session id
    find = lambda: sorted(set(_session_pids(head.sid)) | set(_cmdline_pids(temp_dir)))  # noqa: E731
    try:
        try:
            rc = starter.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`ray start --head` did not return within 120 s:\n{_tail(head.log)}")
        if rc != 0:
            pytest.fail(f"`ray start --head` failed ({rc}):\n{_tail(head.log)}")
        wait_http(f"{head.dashboard_url}/api/version", timeout_s=90, headers=head.headers)
        yield head
    finally:
        survivors = stop_pids(find)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"Ray head processes survived teardown: {survivors}"


class MlflowServer:
    def __init__(self, url: str, root: pathlib.Path, proc: subprocess.Popen, log: pathlib.Path):
        self.url, self.root, self.proc, self.log = url, root, proc, log


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1:<free port>: SQLite backend store and a proxied artifact
    store in a temp dir, one worker. Ready when GET /health says OK."""
    root = tmp_path_factory.mktemp("mlflow-server")
    (port,) = free_ports(1)
    log = root / "server.log"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
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
