"""A multi-node Ray cluster on one host, shaped like KubeRay's: a head started with `--num-cpus=0` (it runs
the GCS, the dashboard / Jobs API and the job drivers, no work) and worker nodes, each a separate
`ray start --address=…` with its own --temp-dir, ports, process session and a custom resource naming it
(`{"node_a": 1}`). Everything on 127.0.0.1. Data, checkpoints and MLflow artifacts live on a loopback
S3 server (moto) only; MLflow is a real `mlflow server` whose artifact store is that S3 server.

What works for several raylets on one host (Ray 2.60): each node gets its own `--temp-dir` ("can be
specified per node": separate session dirs, sockets and logs), its own node-manager / object-manager /
agent / metrics ports and worker port range, and `--node-ip-address 127.0.0.1` with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (otherwise Ray rewrites 127.0.0.1 to the host's address). A driver
on this host connects to the head's raylet (Ray prefers the head when several raylets share an IP).

The code reaches the nodes as it would in a container image: PYTHONPATH names this checkout in every
node's environment (no working_dir upload, no shared data path). Teardown kills exactly the processes
each node started (its session id, or its temp dir in the command line), never `ray stop`."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent

# The process helpers of the single-head job tests (free ports, session pids, bounded stop, HTTP wait).
_spec = importlib.util.spec_from_file_location("_vaepipe_job_servers", REPO / "tests" / "jobs" / "conftest.py")
servers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(servers)
free_ports, stop_pids, wait_http = servers.free_ports, servers.stop_pids, servers.wait_http

# `ray start --address=…` on loopback. Ray refuses to add a node while its "cluster mode" switch
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) is off, and with it on rewrites every 127.0.0.1 it is given to the
# host's interface address (services.resolve_ip_for_localhost), which would put the cluster's traffic
# off loopback. So the `ray start` of a worker node runs with the switch on and that rewrite off; the
# node's own processes (raylet, agents, workers) inherit the switch off from the environment and keep
# the loopback address they are given.
JOIN_ON_LOOPBACK = ("import sys; from ray._private import ray_constants as c, services as s; "
                    "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda host: host; "
                    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())")

# Ray's failure detection, shortened so that a killed node is declared dead in ~4-6 s, not ~15 s or more
# (GCS → raylet health checks every 1 s, 2 s timeout, 4 misses). Read by the GCS at start, from the head's environment.
FAST_FAILURE = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                "RAY_health_check_failure_threshold": "4", "RAY_health_check_initial_delay_ms": "1000"}


class Node:
    def __init__(self, name: str, temp_dir: str, cmd: list[str], log: pathlib.Path):
        self.name, self.temp_dir, self.cmd, self.log = name, temp_dir, cmd, log
        self.sid: int | None = None
        self.node_id: str | None = None

    def pids(self) -> list[int]:
        if self.sid is None:
            return []
        return sorted(set(servers._session_pids(self.sid)) | set(servers._cmdline_pids(self.temp_dir)))


class LocalCluster:
    """`head` + named worker nodes; kill_node / start_node for the failure tests."""

    def __init__(self, root: pathlib.Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.token = env["RAY_AUTH_TOKEN"]
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.nodes: dict[str, Node] = {}
        self.gcs_port = self.dashboard_port = 0
        self.address = self.dashboard_url = ""
        self.specs: dict[str, dict] = {}
        self.names: dict[str, str] = {}     # every node id ever registered → its node's name (restarts too)

    def _launch(self, node: Node, timeout_s: float = 120, tries: int = 5) -> None:
        """`ray start` for `node`. Ray gives a new raylet a fixed 30 s to register with the GCS
        (ray/_private/node.py, raylet_start_wait_time_s); on a loaded 2-core host that can run out, so
        a start that timed out is cleaned up and tried again, as KubeRay recreates a pod that failed
        to start. (3 tries can all time out with the rest of `make test`
        saturating both cores, and the next test then finds one worker node.)"""
        for attempt in range(tries):
            try:
                return self._launch_once(node, timeout_s)
            except RuntimeError as e:
                if "timed out during startup" not in str(e) or attempt == tries - 1:
                    raise
                # `ray start` gave up waiting, but the raylet it spawned keeps starting: give it time
                if node.name != "head" and node.pids():
                    with contextlib.suppress(TimeoutError):
                        self.wait_node(node.name, timeout_s=120)
                        print(f"`ray start` for {node.name} timed out, its raylet registered later (host overloaded)",
                              flush=True)
                        return
                stop_pids(node.pids, grace_s=5.0)
                print(f"`ray start` for {node.name} timed out registering (host overloaded); trying again", flush=True)

    def _launch_once(self, node: Node, timeout_s: float) -> None:
        with open(node.log, "ab") as out:
            starter = subprocess.Popen(node.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.root),
                                       start_new_session=True)
        node.sid = starter.pid
        try:
            rc = starter.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`ray start` for {node.name} did not return in {timeout_s:.0f} s:\n{servers._tail(node.log)}")
        if rc != 0:
            raise RuntimeError(f"`ray start` for {node.name} failed ({rc}):\n{servers._tail(node.log)}")

    def start_head(self) -> None:
        gcs, dash, client, nm, om, ah, ag, ea, met = free_ports(9)
        self.gcs_port, self.dashboard_port = gcs, dash
        self.address, self.dashboard_url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        temp_dir = tempfile.mkdtemp(prefix="vpc-h-", dir="/tmp")
        cmd = [str(BIN / "ray"), "start", "--head", "--num-cpus", "0", "--node-ip-address", "127.0.0.1",
               "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
               "--include-dashboard", "true", "--ray-client-server-port", str(client),
               "--node-manager-port", str(nm), "--object-manager-port", str(om),
               "--dashboard-agent-listen-port", str(ah), "--dashboard-agent-grpc-port", str(ag),
               "--runtime-env-agent-port", str(ea), "--metrics-export-port", str(met),
               "--temp-dir", temp_dir, "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
        node = self.nodes["head"] = Node("head", temp_dir, cmd, self.root / "head.log")
        self._launch(node)
        wait_http(f"{self.dashboard_url}/api/version", timeout_s=90, headers=self.headers)
        node.node_id = self._node_id_by_resource(None)
        self.names[node.node_id] = "head"

    def add_node(self, name: str, cpus: int) -> Node:
        """A worker node `name` with `cpus` CPUs and the custom resource {name: 1}."""
        nm, om, ah, ag, ea, met = free_ports(6)
        base = 20000 + secrets.randbelow(120) * 100   # 100 worker ports of its own, below the ephemeral range (free_ports)
        temp_dir = tempfile.mkdtemp(prefix=f"vpc-{name[-1]}-", dir="/tmp")
        cmd = [sys.executable, "-c", JOIN_ON_LOOPBACK, "start", "--address", self.address, "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(cpus), "--resources", json.dumps({name: 1}),
               "--node-manager-port", str(nm), "--object-manager-port", str(om),
               "--dashboard-agent-listen-port", str(ah), "--dashboard-agent-grpc-port", str(ag),
               "--runtime-env-agent-port", str(ea), "--metrics-export-port", str(met),
               "--min-worker-port", str(base), "--max-worker-port", str(base + 99),
               "--temp-dir", temp_dir, "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
        node = self.nodes[name] = Node(name, temp_dir, cmd, self.root / f"{name}.log")
        self.specs[name] = {"cpus": cpus}
        self._launch(node)
        node.node_id = self.wait_node(name)
        self.names[node.node_id] = name
        return node

    def _node_id_by_resource(self, name: str | None) -> str | None:
        import ray.util.state as st

        for n in st.list_nodes(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], detail=True,
                               raise_on_missing_output=False):
            res = n.resources_total or {}
            if (name is None and n.is_head_node) or (name is not None and res.get(name)):
                return n.node_id
        return None

    def wait_node(self, name: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                nid = self._node_id_by_resource(name)
                if nid:
                    return nid
            time.sleep(0.5)
        raise TimeoutError(f"node {name} did not register with the head in {timeout_s:.0f} s")

    def kill_node(self, name: str) -> float:
        """SIGKILL every process of node `name` (raylet, agents, workers) at once: a lost machine.
        Returns the time.time() of the kill."""
        node = self.nodes[name]
        t = time.time()
        for pid in node.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while node.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        return t

    def restart_node(self, name: str) -> Node:
        """The lost node comes back (a new raylet, same name and resources, a fresh temp dir)."""
        old = self.nodes.pop(name)
        shutil.rmtree(old.temp_dir, ignore_errors=True)
        return self.add_node(name, self.specs[name]["cpus"])

    def node_of(self, node_id: str) -> str | None:
        """The name of the node (or "head") that had this Ray node id (a restarted node has a new id)."""
        return self.names.get(node_id)

    def wait_dead(self, node_id: str, timeout_s: float = 60) -> float:
        """Wait until the GCS declares node `node_id` dead; returns the time.time() it was seen dead."""
        import ray.util.state as st

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                n = st.get_node(node_id, address=self.dashboard_url)
                if n is not None and n.state == "DEAD":
                    return time.time()
            time.sleep(0.2)
        raise TimeoutError(f"node {node_id} was not declared dead within {timeout_s:.0f} s")

    def stop(self) -> list[int]:
        survivors = []
        for name in [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else []):
            node = self.nodes[name]
            survivors += stop_pids(node.pids, grace_s=10.0)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        return survivors


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on 127.0.0.1:<free port> and one bucket; {endpoint, options, options_json, fs, bucket}."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": "us-east-1"}}
        bucket = f"vpc-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, "options": opts, "options_json": json.dumps(opts),
               "fs": s3fs.S3FileSystem(**opts), "bucket": bucket}
    finally:
        server.stop()


@contextlib.contextmanager
def mlflow_server(s3: dict, root: pathlib.Path):
    """A real `mlflow server` on loopback: SQLite backend store (the server's own disk, as its Postgres
    would be), artifacts proxied into s3://BUCKET/mlflow on the S3 server. Yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    log = root / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"], "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}   # as infra/mlflow/mlflow.yaml deploys it
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{s3['bucket']}/mlflow"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(root), start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=proc, expect=b"OK")
        except (TimeoutError, RuntimeError) as e:
            raise RuntimeError(f"mlflow server did not become healthy: {e}\n{servers._tail(log)}") from None
        yield f"http://127.0.0.1:{port}"
    finally:
        survivors = stop_pids(lambda: servers._session_pids(proc.pid))
        if survivors:
            raise RuntimeError(f"mlflow server processes survived teardown: {survivors}")


def cluster_env(token: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO),                     # the "image": this checkout's code on every node
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_V2_ENABLED": "1", "RAY_DEDUP_LOGS": "0", "VAEPIPE_LOG": "INFO", **FAST_FAILURE}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "RAY_TMPDIR",
              "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):   # Ray's default on the nodes, as on a fresh KubeRay head
        env.pop(k, None)
    return env


@contextlib.contextmanager
def local_cluster(root: pathlib.Path, worker_nodes: dict[str, int]):
    """Head (0 CPU) + the named worker nodes ({name: cpus}). This process gets the cluster's token in
    its environment (the State API and Jobs SDK read it), restored afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    env = cluster_env(secrets.token_hex(32))
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=env["RAY_AUTH_TOKEN"])
    c = LocalCluster(root, env)
    try:
        c.start_head()
        for name, cpus in worker_nodes.items():
            c.add_node(name, cpus)
        yield c
    finally:
        survivors = c.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if survivors:
            raise RuntimeError(f"Ray processes survived teardown: {survivors}")


# --- jobs ------------------------------------------------------------------------------------------

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_client(c: LocalCluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(c.dashboard_url, headers=c.headers)


# What `--working-dir .` uploads of this checkout: the code, not environments, outputs or tests.
EXCLUDES = [".venv", ".git", "vaepipe-work", "mlflow.db", "mlruns", "mlartifacts", "*.egg-info",
            "**/__pycache__", ".pytest_cache", "tests", "docs", "infra", ".gpu"]


def submit(client, argv: list[str], working_dir: bool = False) -> str:
    """`ray job submit [--working-dir REPO] -- python -m jobs.X ARGV` through the Jobs SDK; returns
    the submission id. With working_dir the checkout is uploaded to the cluster (as users submit from
    a laptop) and the driver runs in that copy."""
    import shlex

    runtime_env = {"working_dir": str(REPO), "excludes": EXCLUDES} if working_dir else None
    return client.submit_job(entrypoint=" ".join(shlex.quote(a) for a in ["python", "-m", *argv]),
                             runtime_env=runtime_env)


def wait_job(client, job_id: str, timeout_s: float) -> tuple[str, str, float]:
    """(status, logs, time.time() at the terminal status), bounded by timeout_s (then stopped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status, client.get_job_logs(job_id), time.time()
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            return f"TIMEOUT({status})", client.get_job_logs(job_id), time.time()
        time.sleep(0.5)


def ray_job_id(client, submission_id: str) -> str:
    return client.get_job_info(submission_id).job_id


def job_actor_states(c: LocalCluster, job_hex: str, class_part: str, alive_only: bool = False) -> list:
    """Ray's State API records (ActorState, detail) of the job's actors whose class name contains
    `class_part`, dead ones included unless alive_only. A restarted actor keeps its id and shows the
    node it runs on now, with num_restarts."""
    from ray.util.state import list_actors

    filters = [("job_id", "=", job_hex)] + ([("state", "=", "ALIVE")] if alive_only else [])
    return [a for a in list_actors(address=c.dashboard_url, filters=filters, detail=True, limit=10000,
                                   raise_on_missing_output=False) if class_part in (a.class_name or "")]


def job_actors(c: LocalCluster, job_hex: str, class_part: str, alive_only: bool = False) -> dict[str, str]:
    """{actor_id: Ray node id} of the job's actors (see job_actor_states): where they run or ran."""
    return {a.actor_id: a.node_id for a in job_actor_states(c, job_hex, class_part, alive_only) if a.node_id}


def actor_nodes(c: LocalCluster, job_hex: str, class_part: str) -> dict[str, str]:
    """{actor_id: node name} (see job_actors)."""
    return {a: c.node_of(n) or n for a, n in job_actors(c, job_hex, class_part).items()}


def upload_digits(s3: dict, prefix: str, copies: int = 1, files: int = 3, row_group: int = 100) -> int:
    """scikit-learn's digits (id, label, image) as Parquet on S3 under BUCKET/prefix, `copies` times over
    with fresh ids, in `files` files of `row_group`-row groups. Returns the row count."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.evaluation.datasets import digits, images_table

    x, y = digits()
    t = images_table(np.concatenate([x] * copies), np.concatenate([y] * copies))
    n = t.num_rows
    step = -(-n // files)
    for i in range(files):
        with s3["fs"].open(f"{s3['bucket']}/{prefix}/part-{i}.parquet", "wb") as f:
            pq.write_table(t.slice(i * step, step), f, row_group_size=row_group)
    s3["fs"].invalidate_cache()
    return n


def s3_objects(s3, prefix: str) -> list[str]:
    """Every object under BUCKET/prefix, listed afresh (s3fs caches listings)."""
    s3["fs"].invalidate_cache()
    try:
        return s3["fs"].find(f"{s3['bucket']}/{prefix}")
    except FileNotFoundError:
        return []
