"""Starting or joining Ray, sized so Ray Data tasks still get CPU beside the train workers, and
keeping a successful run's output to what it did: no internal chatter, every real warning kept."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator

log = logging.getLogger(__name__)

# Ray Data's logging, for every process of a local Ray (read at `import ray.data`, which the driver
# redoes below): its own default (ray/data/_internal/logging.py DEFAULT_CONFIG) with the console at
# WARNING, so "Dataset … execution finished" INFO lines stay in the session's ray-data.log, and one
# known message dropped (RayDataConsoleFilter). vaepipe prints its own progress (pipeline.runtime.progress).
_RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
filters:
  console_filter: {"()": pipeline.runtime.ray_runtime.RayDataConsoleFilter}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}
  console: {class: ray._private.log.PlainRayHandler, formatter: ray, level: WARNING, filters: [console_filter]}
loggers:
  ray.data: {level: DEBUG, handlers: [file, console], propagate: false}
"""


class RayDataConsoleFilter(logging.Filter):
    """Ray Data's console filter (records marked hidden stay hidden) minus two warnings about what
    vaepipe does on purpose: progress bars off (it reports progress itself), and GPU encode actors
    that ask for both num_gpus=1 and num_cpus=0.5 (the CPU budget that lets a GPU actor run beside
    the rest on a small node; Ray calls any such mix experimental)."""

    QUIET = ("Progress bars disabled.", "Specifying both num_cpus and num_gpus for map tasks is experimental")

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "hide", False):
            return False
        return not (record.levelno == logging.WARNING and str(record.msg).startswith(self.QUIET))


# Lines other Ray processes stream to the driver (log_to_driver) that report Ray's own housekeeping
# on a healthy run, matched whole: an actor restart caveat Ray Data triggers with its own internal
# constructor arguments (ray-project/ray#57733), and the GCS failing to kill an actor whose process
# has already exited at the end of a dataset or training run.
BENIGN_RAY_LINES = re.compile(
    r"(.*core_worker\.cc:\d+: Actor with class name: '.*' and ID: '[0-9a-f]+' has constructor arguments "
    r"in the object store and max_restarts > 0\..*"
    r"|.*gcs_actor_scheduler\.cc:\d+: Failed to kill actor (NIL_ID|[0-9a-f]+)\b.*)")


def _filter_streamed_logs() -> None:
    """Drop BENIGN_RAY_LINES from what Ray prints of other processes' output; everything else is
    printed as before. Wraps Ray's own printer (ray._private.ray_logging's dispatcher); a Ray without
    it is left alone (the lines then show, nothing else changes)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        handlers = []
        for name, fn in dispatcher.handlers:
            if name == "ray_print_logs" and not getattr(fn, "_vaepipe_filtered", False):
                fn = _filtering(fn)
            handlers.append((name, fn))
        dispatcher.handlers = handlers


def _filtering(fn):
    def handler(data):
        lines = [ln for ln in data.get("lines", []) if not BENIGN_RAY_LINES.fullmatch(ln)]
        if lines:
            fn({**data, "lines": lines})

    handler._vaepipe_filtered = True
    return handler


# The filter's own process (`python -S -c`): it reads what the driver writes to fd 2 and passes it on,
# whole lines matching BENIGN_RAY_LINES dropped. A partial line is passed on at once unless it starts
# with "[" (the start of a C++ log line, written whole): a progress line redrawn with "\r" still shows.
# Being a process, not a thread, it passes on everything written before a crash or a SIGKILL of the
# driver (a C++ stack trace included), and it ends at EOF: when every holder of the pipe has closed it.
_STDERR_FILTER = r"""
import os, re, sys
benign, out, buf = re.compile(sys.argv[1]), sys.stdout.fileno(), b""
def put(b):
    while b:
        b = b[os.write(out, b):]
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    *lines, buf = (buf + chunk).split(b"\n")
    put(b"".join(ln + b"\n" for ln in lines if not benign.fullmatch(ln.decode("utf-8", "replace"))))
    if buf and not buf.startswith(b"["):
        put(buf)
        buf = b""
if not benign.fullmatch(buf.decode("utf-8", "replace")):
    put(buf)
"""
_FILTERING_STDERR = False


@contextlib.contextmanager
def driver_stderr_filtered() -> Iterator[None]:
    """While a batch job's actor pool runs: drop BENIGN_RAY_LINES that the driver's own core worker
    (C++) writes to fd 2, which no Python hook reaches. Ray Data passes every pool actor its context
    and transformer by reference and gives it max_restarts=-1 (what lets a pool survive a lost node),
    so the driver logs "constructor arguments in the object store and max_restarts > 0" at ERROR for
    every actor it starts (ray-project/ray#57733; ray/data/.../actor_pool_map_operator.py). Everything
    else written to fd 2 meanwhile (Python's stderr, Ray's other C++ lines, child processes' output)
    passes unchanged. Enter it after `init_ray` (processes started inside inherit the pipe: harmless,
    the filter outlives them) and after anything that asks whether stderr is a terminal (Progress).
    Where fd 2 cannot be redirected, it does nothing (the line then shows)."""
    global _FILTERING_STDERR
    import subprocess

    if _FILTERING_STDERR:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        r, w = os.pipe()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _STDERR_FILTER, BENIGN_RAY_LINES.pattern],
                                stdin=r, stdout=saved, stderr=saved, close_fds=True)
    except OSError as e:
        os.close(saved)
        log.debug("stderr filter not started: %s", e)
        yield
        return
    os.close(r)
    os.dup2(w, 2)
    os.close(w)
    _FILTERING_STDERR = True
    try:
        yield
    finally:
        _FILTERING_STDERR = False
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)   # the pipe's last write end here: the filter sees EOF once it has passed all on
        os.close(saved)
        try:
            proc.wait(timeout=5)   # its lines before ours, unless a process started meanwhile still holds the pipe
        except subprocess.TimeoutExpired:
            pass


def _token_auth_notice(record: logging.LogRecord) -> bool:
    """A logging filter: False for the one notice a new local Ray logs at WARNING that it enabled
    token authentication (the default since Ray 2.5x, and what vaepipe wants). Setting RAY_AUTH_MODE=token
    instead would silence it too, but only before `import ray` (Ray caches its config at import)."""
    return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


def _quiet_local_ray_env() -> None:
    """Environment for a local Ray, set before it starts so every process it spawns inherits it; each
    is a documented switch and only a default (a value already set wins). Also drops Ray's notice that
    a new local Ray uses token authentication (it still does; see _token_auth_notice).
    - RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: one node has no spot preemption to watch; the watcher
      actor also makes core_worker log an ERROR ("constructor arguments in the object store and
      max_restarts > 0") at every training start.
    - RAY_DATA_LOGGING_CONFIG: Ray Data's console at WARNING (above)."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_token_auth_notice)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
        path = os.path.join(tempfile.gettempdir(), f"vaepipe-ray-data-logging-{os.getuid()}.yaml")
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(_RAY_DATA_LOGGING)
        os.replace(tmp, path)
        os.environ["RAY_DATA_LOGGING_CONFIG"] = path
    if "ray.data" in sys.modules:   # imported before the variable was set: configure it again
        from ray.data._internal.logging import configure_logging

        configure_logging()


# Set when init_ray started the Ray instance itself (one node, this machine): its logical CPUs are the
# cores plus a reserve for Ray Data beside the train workers, so sizing caps them at the real cores.
_STARTED_LOCAL = False
# The environment this process had when it started that Ray: what the raylet, and so every Ray
# process, inherited.
_STARTED_ENV: dict[str, str] = {}


def running_local_cluster() -> str | None:
    """The GCS address of a cluster started on this machine with `ray start --head`, as `ray.init()`
    finds it (Ray writes it to <temp dir>/ray_current_cluster; $RAY_TMPDIR moves that dir), if its GCS
    port answers. None when there is none, or the file is stale (the cluster was killed, not stopped)."""
    from ray._common.utils import get_ray_address_file

    try:
        with open(get_ray_address_file(None)) as f:
            address = f.read().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
            return address
    except (OSError, ValueError):
        log.info("ignoring a stale Ray address %s (nothing answers there)", address)
        return None


def init_ray(address: str | None = None, reserve_cpus: float = 0.0) -> None:
    """Join $RAY_ADDRESS / `address` if given (e.g. under `ray job submit`), else a cluster already
    running on this machine (`ray start --head`: what `ray.init()` finds), else start a local Ray.
    `address="local"` always starts a private one. Locally, logical CPUs are the cores plus
    `reserve_cpus`, so that train workers holding one CPU each do not starve the data-reading tasks
    (2 workers on 2 cores otherwise deadlock the read)."""
    global _STARTED_LOCAL
    # Ray Train V2 replaces `print` in its workers by a logger call that, whenever sys.stdout is
    # wrapped (it is in a Ray worker), also prints: every epoch line reached the driver twice. With
    # the patch off a worker's print goes to its stdout once, and from there to the driver. The
    # controller passes this variable on to its workers (ENV_VARS_TO_PROPAGATE).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray Train V2's controller polls its workers every 2 s by default, and every state change of a
    # run (start, each report, finish) waits for a poll: ~7 s of a 2-epoch local run, and each shared
    # checkpoint of a small table up to 2 s more. A poll is one small call to each worker. Locally the
    # workers inherit the variable from the raylet this process starts; on a cluster Ray Train passes
    # the driver's value to its controller and workers (constants.ENV_VARS_TO_PROPAGATE). A value set
    # for the job or in the head's environment wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    if address is None:
        found = running_local_cluster()
        if found:
            # ray.init(num_cpus=…) against a running cluster is an error; join it as it is sized.
            print(f"ray: joining the Ray cluster already running on this machine at {found} "
                  f"(pass --ray-address local for a private one)", flush=True)
            address = found
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        _filter_streamed_logs()
        return
    # A local Ray is one node: keep every Ray address on loopback. Ray otherwise rewrites 127.0.0.1 to
    # the host's own interface address (services.resolve_ip_for_localhost); its documented switch is
    # this variable, read at import: set it for the processes this Ray starts (they inherit the
    # environment) and on the already imported constant for this one.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    _quiet_local_ray_env()
    cpus = (os.cpu_count() or 1) + max(0.0, reserve_cpus)
    # Every process of this Ray inherits the environment the raylet starts with (kept in _STARTED_ENV,
    # see train_env_inherited). For the start only, RAY_ADDRESS names this Ray's GCS, on a port chosen
    # here (RAY_GCS_SERVER_PORT): State API calls without an address in its workers (Ray Train V2's
    # PlacementGroupCleaner makes them) then answer for this Ray even when another runs on the machine
    # ("Found multiple active Ray instances" otherwise). This process's own environment is restored
    # after. (It was a worker_process_setup_hook in a job runtime env; any job runtime env makes Ray
    # start each worker afresh instead of handing out its prestarted ones.)
    global _STARTED_ENV
    port = _free_port()
    with _environ(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}"):
        # The dashboard stays on: Ray Train V2's controller watchdog queries the State API it serves.
        ray.init(address="local", num_cpus=int(cpus + 0.999), log_to_driver=True, configure_logging=True,
                 logging_level=logging.WARNING, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1")  # local Ray talks over loopback only
    _STARTED_ENV = dict(os.environ)
    _STARTED_LOCAL = True
    _filter_streamed_logs()


def _free_port() -> int:
    """A loopback TCP port free now (the kernel's pick), for the GCS of a local Ray."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """os.environ with `values` set inside the block, and exactly as before it after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def train_env_inherited() -> Iterator[None]:
    """Around TorchTrainer.fit on the local Ray this process started: Ray Train V2 hands the RAY_TRAIN_*
    variables set in the driver (constants.ENV_VARS_TO_PROPAGATE) to its controller and workers as a
    runtime env, and a runtime env with any variable in it makes Ray start a new process for each of
    them (controller, workers, placement group cleaner, synchronisation and dataset actors) instead of
    taking a prestarted one. Every process of that Ray already has the values this process had when it
    started the Ray (the raylet inherited them), so those are hidden from Ray Train for the fit; a
    variable set or changed since is still passed on. A cluster this process joined is left as it is."""
    if not started_local():
        yield
        return
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    saved = {k: os.environ[k] for k in ENV_VARS_TO_PROPAGATE
             if k in os.environ and _STARTED_ENV.get(k) == os.environ[k]
             and (k != "RAY_TRAIN_V2_ENABLED" or os.environ[k].lower() in ("1", "true"))}   # unset means on
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


# --- Sizing from the cluster: the alive nodes that do the work, not the driver's machine. -----------

def work_nodes(raw: list[dict]) -> tuple[list[dict], list[dict]]:
    """`ray.nodes()` entries → (nodes that can run CPU or GPU work, alive nodes that cannot: e.g. a
    KubeRay head started with --num-cpus=0). Each as {node_id, ip, cpus, gpus, head}."""
    work, idle = [], []
    for n in raw:
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = n.get("Resources") or {}
        node = {"node_id": n.get("NodeID", ""), "ip": n.get("NodeManagerAddress", ""),
                "cpus": float(res.get("CPU", 0.0)), "gpus": float(res.get("GPU", 0.0)),
                "head": "node:__internal_head__" in res}
        (work if node["cpus"] >= 1 or node["gpus"] >= 1 else idle).append(node)
    return work, idle


def describe_nodes(work: list[dict], idle: list[dict], local_cores: int | None = None) -> str:
    """'cluster: 2 nodes × 2 CPU, 0-CPU head skipped' (node shapes grouped, largest group first)."""
    shapes = Counter((n["cpus"], n["gpus"]) for n in work)
    parts = []
    for (cpu, gpu), k in sorted(shapes.items(), key=lambda kv: (-kv[1], -kv[0][0])):
        parts.append(f"{k} node{'s' if k != 1 else ''} × {cpu:g} CPU" + (f" + {gpu:g} GPU" if gpu else ""))
    text = ("local Ray: " if local_cores else "cluster: ") + (" + ".join(parts) or "no node with a CPU or GPU")
    if local_cores:
        text += f" on {local_cores} cores"
    heads = [n for n in idle if n["head"]]
    if heads:
        text += ", 0-CPU head skipped"
    if len(idle) > len(heads):
        text += f", {len(idle) - len(heads)} 0-CPU node(s) skipped"
    return text


def size_actors(raw_nodes: list[dict], what: str, *, use_gpu: bool = False, requested: int | None = None,
                units: int | None = None, local_cores: int | None = None) -> tuple[int, str]:
    """How many one-CPU (or one-GPU) actors the cluster runs at once: the sum over the alive work
    nodes of their whole CPUs (GPUs), each node capped at `local_cores` when this process started
    the Ray itself (its logical CPUs include a reserve); at most `units`, at least 1.
    Returns (count, one log line saying why)."""
    work, idle = work_nodes(raw_nodes)
    why = describe_nodes(work, idle, local_cores)
    if requested:
        n, why = requested, f"--concurrency {requested}; {why}"
    else:
        key = "gpus" if use_gpu else "cpus"
        n = sum(int(min(nd[key], local_cores or nd[key])) for nd in work)
        if n < 1:
            why += "; no free CPU or GPU seen yet, starting with 1"
    n = max(1, n)
    if units is not None and units < n:
        n, why = max(1, units), f"{why}; only {units} work unit{'s' if units != 1 else ''}"
    return n, f"{what}: {n} {'GPU ' if use_gpu else ''}actor{'s' if n != 1 else ''} ({why})"


def calls_per_gpu(raw_nodes: list[dict], local_cores: int | None = None) -> int:
    """Work units a GPU actor runs at once, each in a thread of its own: the fewest whole CPUs per GPU
    over the alive GPU nodes (capped at `local_cores` as in size_actors), at least 1. A GPU encode
    waits on reading and decoding Parquet, which each unit's thread does for itself (one H200 host:
    16 threads sharing the GPU encoded 7.2x faster than one; docs/performance.md)."""
    work, _ = work_nodes(raw_nodes)
    per = [min(n["cpus"], local_cores or n["cpus"]) / n["gpus"] for n in work if n["gpus"] >= 1]
    return max(1, int(min(per))) if per else 1


def plan_train(raw_nodes: list[dict], workers: int, cpus_per_worker: float) -> str:
    """One log line for the train worker group: where workers can go, and how each picks its torch
    threads (CPUs of the node it lands on / the workers there, see `train_threads`). Says so when
    the alive nodes cannot hold the group (Ray would wait for nodes that may never come)."""
    work, idle = work_nodes(raw_nodes)
    fits = sum(int(n["cpus"] // cpus_per_worker) if cpus_per_worker > 0 else workers for n in work)
    line = (f"train: {workers} worker{'s' if workers != 1 else ''} × {cpus_per_worker:g} CPU, torch threads = CPUs of "
            f"the worker's node / its workers there ({describe_nodes(work, idle, _local_cores())})")
    if fits < workers:
        line += f"; the alive nodes fit only {fits} worker(s): Ray waits for more nodes"
    return line


def train_threads(node_cpus: float, workers_on_node: int, cores: int | None = None) -> int:
    """Torch threads for one train worker: its node's CPUs shared by the workers on that node,
    never more than the machine's cores (a local Ray's logical CPUs include a reserve), at least 1."""
    cpus = node_cpus if cores is None else min(node_cpus, cores)
    return max(1, int(cpus // max(1, workers_on_node)))


def started_local() -> bool:
    """Whether this process started the Ray it is connected to (init_ray's one-node local Ray)."""
    import sys

    return _STARTED_LOCAL and "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _local_cores() -> int | None:
    return (os.cpu_count() or 1) if _STARTED_LOCAL else None


def cluster_calls_per_gpu() -> int:
    """`calls_per_gpu` on the live cluster."""
    import ray

    return calls_per_gpu(ray.nodes(), _local_cores())


def cluster_actors(what: str, *, use_gpu: bool = False, requested: int | None = None,
                   units: int | None = None) -> int:
    """`size_actors` on the live cluster (`ray.nodes()`); logs the choice at INFO."""
    import ray

    n, line = size_actors(ray.nodes(), what, use_gpu=use_gpu, requested=requested, units=units,
                          local_cores=_local_cores())
    log.info(line)
    return n


def worker_threads(workers_on_node: int) -> tuple[int, str]:
    """In a train worker: torch threads from the CPUs of the Ray node it runs on."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in work_nodes(ray.nodes())[0] if n["node_id"] == node_id), None)
    cpus = node["cpus"] if node else 1.0
    n = train_threads(cpus, workers_on_node, os.cpu_count())
    return n, (f"node {node_id[:12]} ({cpus:g} CPU, {workers_on_node} worker(s) there, "
               f"{os.cpu_count()} cores) → {n} torch thread(s)")


def quiet_data_progress() -> None:
    """Ray Data's bars off (they garble the logs of batch jobs, and its actors draw their own): the
    jobs report records done / total, rate and ETA themselves (pipeline.runtime.progress), and Ray Data's
    notice that the bars are off is filtered out (RayDataConsoleFilter)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        ctx.print_on_execution_start = False
    except AttributeError:
        pass
