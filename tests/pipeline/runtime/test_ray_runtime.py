"""Sizing from the cluster's alive nodes (pure functions over `ray.nodes()` entries), and joining a Ray
cluster that is already running on this machine (`ray start --head`) instead of dying on it."""
from __future__ import annotations

import os
import pathlib
import secrets
import subprocess
import sys
import tempfile

import pytest

from pipeline.table.parquet_io import read_manifest
from pipeline.table.uris import resolve

from pipeline.runtime.ray_runtime import calls_per_gpu, describe_nodes, plan_train, size_actors, train_threads, work_nodes

REPO = pathlib.Path(__file__).resolve().parents[3]


def node(cpus: float, gpus: float = 0, head: bool = False, alive: bool = True, nid: str = "") -> dict:
    """A `ray.nodes()` entry as Ray 2.60 returns it (the fields sizing reads)."""
    res = {"CPU": cpus, "memory": 1e9, "object_store_memory": 1e8, "node:127.0.0.1": 1.0}
    if gpus:
        res["GPU"] = gpus
    if head:
        res["node:__internal_head__"] = 1.0
    if not cpus:
        del res["CPU"]          # a --num-cpus=0 node lists no CPU resource at all
    return {"NodeID": nid or secrets.token_hex(28), "Alive": alive, "NodeManagerAddress": "127.0.0.1", "Resources": res}


KUBERAY = [node(0, head=True), node(2), node(2)]


def test_kuberay_shape_sizes_from_the_worker_nodes_and_skips_the_0_cpu_head():
    n, line = size_actors(KUBERAY, "encode")
    assert n == 4
    assert line == "encode: 4 actors (cluster: 2 nodes × 2 CPU, 0-CPU head skipped)"
    work, idle = work_nodes(KUBERAY)
    assert [w["cpus"] for w in work] == [2.0, 2.0] and [i["head"] for i in idle] == [True]


def test_dead_nodes_do_not_count_and_fractional_cpus_round_down():
    nodes = [node(0, head=True), node(4), node(4, alive=False), node(1.5)]
    n, line = size_actors(nodes, "encode")
    assert n == 5 and "cluster: 1 node × 4 CPU + 1 node × 1.5 CPU, 0-CPU head skipped" in line


def test_units_concurrency_and_gpus():
    assert size_actors(KUBERAY, "encode", units=3) == (3, "encode: 3 actors (cluster: 2 nodes × 2 CPU, "
                                                            "0-CPU head skipped; only 3 work units)")
    assert size_actors(KUBERAY, "decode", requested=7)[0] == 7
    assert size_actors(KUBERAY, "encode", requested=7)[1].startswith("encode: 7 actors (--concurrency 7; cluster:")
    gpu = [node(0, head=True), node(8, gpus=2), node(8, gpus=1)]
    n, line = size_actors(gpu, "encode", use_gpu=True)
    assert n == 3 and line.startswith("encode: 3 GPU actors (cluster: ") and "8 CPU + 2 GPU" in line


def test_a_gpu_actor_runs_as_many_units_at_once_as_its_node_has_cpus_per_gpu():
    # the fewest CPUs per GPU over the GPU nodes; CPU-only nodes and the 0-CPU head do not count
    assert calls_per_gpu([node(0, head=True), node(8, gpus=2), node(16, gpus=1), node(4)]) == 4
    assert calls_per_gpu([node(16, gpus=1)], local_cores=6) == 6      # a local Ray: at most the real cores
    assert calls_per_gpu([node(1, gpus=2)]) == 1                      # never below one
    assert calls_per_gpu(KUBERAY) == 1                                # no GPU node


def test_a_local_ray_is_capped_at_the_machine_cores():
    """init_ray's own local Ray declares cores + a reserve for Ray Data: actors stay at the cores."""
    n, line = size_actors([node(5, head=True)], "encode", local_cores=2)
    assert n == 2 and line == "encode: 2 actors (local Ray: 1 node × 5 CPU on 2 cores)"


def test_no_work_node_yet_still_one_actor():
    n, line = size_actors([node(0, head=True)], "encode")
    assert n == 1 and "no node with a CPU or GPU" in line and "starting with 1" in line
    assert describe_nodes([], []) == "cluster: no node with a CPU or GPU"


def test_train_threads_are_the_node_cpus_over_its_workers_never_above_the_cores():
    assert train_threads(4, 2) == 2
    assert train_threads(4, 1) == 4
    assert train_threads(1, 2) == 1            # at least one
    assert train_threads(8, 1, cores=2) == 2   # a local Ray's logical CPUs beyond the cores
    assert train_threads(0, 1) == 1


def test_train_plan_line_says_how_and_warns_when_the_group_cannot_fit(monkeypatch):
    from pipeline.runtime import ray_runtime

    monkeypatch.setattr(ray_runtime, "_STARTED_LOCAL", False)   # a cluster's nodes, not this session's local Ray
    line = plan_train(KUBERAY, workers=2, cpus_per_worker=1)
    assert line == ("train: 2 workers × 1 CPU, torch threads = CPUs of the worker's node / its workers there "
                    "(cluster: 2 nodes × 2 CPU, 0-CPU head skipped)")
    assert "fit only 2 worker(s)" in plan_train(KUBERAY, workers=3, cpus_per_worker=2)


@pytest.mark.slow
def test_encode_joins_a_running_local_cluster_instead_of_a_traceback(tmp_path, digits_parquet, trained_digits, workdir,
                                                                      ray_local):
    """A head started with `ray start --head` (its address file in a private RAY_TMPDIR, where a plain
    `ray.init()` looks), then `vaepipe encode` without --ray-address: it joins, says so, exits 0.
    Meanwhile the workers of a local Ray that init_ray("local") started (this session's) find their
    own Ray in State API calls without an address (Ray Train's PlacementGroupCleaner makes them),
    with the head running beside it (before pin_ray_address: "Found multiple active Ray instances")."""
    jobs = _load_job_servers()
    tmp = tempfile.mkdtemp(prefix="vpj-", dir="/tmp")        # short: Ray's socket paths
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO),
           "VAEPIPE_LOG": "INFO"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "ray-start.log"
    starters: list[subprocess.Popen] = []
    find = lambda: sorted({p for s in starters for p in jobs._session_pids(s.pid)}  # noqa: E731
                          | set(jobs._cmdline_pids(tmp)))

    def start_head() -> tuple[int, int]:
        """`ray start --head` on fresh ports: (its exit status, the GCS port). Ray waits a fixed 30 s
        for its raylet to register with the GCS (`raylet_start_wait_time_s` in ray/_private/node.py);
        on 2 cores shared with the rest of the suite that wait can run out, so a start
        that timed out there is retried once. What the test proves starts after the head is up."""
        ports = jobs.free_ports(9)
        flags = ["--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
                 "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port"]
        cmd = [str(pathlib.Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", *[a for f, v in zip(flags, ports) for a in (f, str(v))],
               "--num-cpus", "2", "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
        with open(log, "wb") as out:
            starters.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True))
        return starters[-1].wait(timeout=180), ports[0]

    try:
        code, gcs = start_head()
        if code != 0 and "timed out during startup" in log.read_text():
            assert not jobs.stop_pids(find)                   # the half-started head, gone before the retry
            code, gcs = start_head()
        assert code == 0, log.read_text()[-3000:]
        assert os.path.exists(os.path.join(tmp, "ray", "ray_current_cluster"))   # where ray.init() looks
        # a local Ray started by init_ray("local") (this session's), the head running beside it: its
        # workers' State API calls without an address answer for their own Ray
        ctx = ray_local.get_runtime_context()

        @ray_local.remote(num_cpus=0)   # defined here: pickled by value (workers cannot import test modules)
        def probe():
            from ray.util.state import list_nodes

            return os.environ.get("RAY_ADDRESS"), [n.node_id for n in list_nodes()]

        address, nodes = ray_local.get(probe.remote(), timeout=120)
        assert address == ctx.gcs_address and nodes == [ctx.get_node_id()], (address, nodes, ctx.gcs_address)
        out_dir = tmp_path / "latents"
        p = subprocess.run([sys.executable, "-m", "jobs.cli", "encode", "--model", "models:/digits@production",
                            "--input", digits_parquet, "--output", str(out_dir), "--workdir", workdir],
                           env=env, cwd=str(REPO), capture_output=True, text=True, timeout=400)
        text = p.stdout + p.stderr
        assert p.returncode == 0, text[-5000:]
        assert f"ray: joining the Ray cluster already running on this machine at 127.0.0.1:{gcs}" in p.stdout, text[-3000:]
        assert "Traceback" not in text and "num_cpus and num_gpus must not be provided" not in text
        assert "encode: 2 actors (cluster: 1 node × 2 CPU)" in text, text[-3000:]
        assert "encoded 1,797 of 1,797 records" in p.stdout and (out_dir / "_SUCCESS").exists() \
            and read_manifest(resolve(str(out_dir)))["rows"] == 1797
    finally:
        survivors = jobs.stop_pids(find)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        assert not survivors, f"Ray head processes survived teardown: {survivors}"


def _load_job_servers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_vaepipe_job_servers", REPO / "tests" / "jobs" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod



def test_train_actors_of_the_local_ray_get_no_runtime_env_and_still_have_the_train_variables(ray_local, monkeypatch):
    """Ray Train V2 passes the RAY_TRAIN_* variables set in the driver to its actors as a runtime env,
    and any runtime env makes Ray start a new process per actor instead of a prestarted one. On the
    local Ray this process started, the actors already have them from the raylet: hidden for the fit,
    restored after; one changed since the start is still passed on."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from pipeline.runtime.ray_runtime import train_env_inherited

    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" and os.environ["RAY_TRAIN_V2_ENABLED"] == "1"
    before = dict(os.environ)
    with train_env_inherited():
        assert get_env_vars_to_propagate() == {}
    assert dict(os.environ) == before

    @ray_local.remote(num_cpus=0)
    def seen(names):   # what a process of this Ray (a prestarted worker) has, without any runtime env
        return {n: os.environ.get(n) for n in names}

    names = ["RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_TRAIN_V2_ENABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_ADDRESS"]
    got = ray_local.get(seen.remote(names))
    assert got[names[0]] == "0" and got[names[1]] == "1" and got[names[2]] == os.environ[names[2]]
    assert got["RAY_ADDRESS"] == ray_local.get_runtime_context().gcs_address   # its own Ray's State API

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "7")   # set after the start: the raylet lacks it
    with train_env_inherited():
        assert get_env_vars_to_propagate() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "7"}


# The driver's own C++ line when Ray Data starts a pool actor (as `vaepipe demo` printed it).
RESTART_NOTICE = ("[2026-12-06 02:17:49,735 E 19604 19604] core_worker.cc:2465: Actor with class name: "
                  "'MapWorker(MapBatches(UnitEncoder))' and ID: 'b8304ad48f87a5c27394872701000000' has constructor "
                  "arguments in the object store and max_restarts > 0. If the arguments in the object store go out "
                  "of scope or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/"
                  "53727 for more details.")


def filtered_driver(body: str, **kw) -> subprocess.Popen:
    """A process that runs `body` inside driver_stderr_filtered, its stderr a pipe to this test."""
    code = ("import os, signal, subprocess, sys\nfrom pipeline.runtime.ray_runtime import driver_stderr_filtered\n"
            f"N = {RESTART_NOTICE!r}\n"
            "with driver_stderr_filtered():\n" + "".join(f"    {ln}\n" for ln in body.strip().splitlines()) +
            "print('after', file=sys.stderr)\n")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), **kw)


def test_driver_stderr_filter_drops_only_the_pool_restart_notice_and_keeps_order():
    p = filtered_driver("""
os.write(2, b'kept before\\n' + N.encode() + b'\\n')
os.write(2, N.replace('max_restarts > 0', 'max_restarts = 3').encode() + b'\\n')   # not the benign line
print('python stderr', file=sys.stderr, flush=True)
subprocess.run('echo from a child >&2', shell=True)
os.write(2, b'[2026-12-06 E 1 1] core_worker.cc:1: a real C++ error\\n')
""")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert err.decode().splitlines() == [
        "kept before", RESTART_NOTICE.replace("max_restarts > 0", "max_restarts = 3"), "python stderr",
        "from a child", "[2026-12-06 E 1 1] core_worker.cc:1: a real C++ error", "after"]


def test_driver_stderr_filter_passes_a_redrawn_progress_line_before_its_newline():
    # Progress on a terminal redraws one line with "\r" and no newline: it must show as it is drawn
    import select

    p = filtered_driver("""
os.write(2, b'\\rencode: 1/2 units')
sys.stdin.readline()
os.write(2, b'\\n')
""", stdin=subprocess.PIPE)
    seen, fd = b"", p.stderr.fileno()
    while b"1/2 units" not in seen:
        assert select.select([fd], [], [], 30)[0], f"the partial line did not come through: {seen!r}"
        seen += os.read(fd, 4096)
    p.stdin.write(b"go\n")
    p.stdin.close()
    assert p.wait(timeout=60) == 0
    assert (seen + p.stderr.read()).decode() == "\rencode: 1/2 units\nafter\n"


def test_driver_stderr_filter_passes_on_what_a_sigkilled_driver_wrote():
    # the filter is its own process: a driver killed mid-job still leaves its last lines
    p = filtered_driver("""
os.write(2, b'last words\\n' + N.encode() + b'\\n')
os.kill(os.getpid(), signal.SIGKILL)
""")
    _, err = p.communicate(timeout=60)
    assert p.returncode == -9
    assert err.decode() == "last words\n"
