"""`vaepipe serve`: the neighbour service (pipeline.serving.service) as a Ray Serve application.

Ray touches it at two points: the deployment class (one NeighbourService per replica, a poller
thread beside it) and `run_serve` (start Ray and Serve's HTTP proxy, run the app, wait for a
signal). A replica answers requests on its event loop; a search takes about a millisecond, so
requests are answered in the order they come, and more replicas (`--replicas`) take more of them at
once, each holding the index's arrays (memory-mapped from a local disk, read into memory from an
object store). HTTP comes in through Serve's HAProxy ingress by default (`--ingress`)."""
from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass

from pipeline.runtime.config import RuntimeConfig, opt
from pipeline.runtime.errors import ConfigError


@dataclass
class ServeConfig(RuntimeConfig):
    latents: str = opt("", "latents folder with an index (`vaepipe index`, or encode/nightly --index)")
    model: str = opt("", "registered model (models:/NAME@ALIAS) that encodes records sent to /neighbours; "
                         "empty: ids and vectors only")
    host: str = opt("127.0.0.1", "address Serve's HTTP proxy listens on (0.0.0.0 in a cluster)")
    port: int = opt(8000, "HTTP port")
    replicas: int = opt(1, "service replicas (each a Ray actor holding the index)")
    ingress: str = opt("haproxy", "what takes HTTP in front of the replicas: haproxy (Ray Serve's HAProxy "
                                  "ingress: measured 1.6 ms p50 against 7.6 ms for the Python proxy, "
                                  "docs/performance.md) or proxy (Serve's Python proxy). On a cluster this "
                                  "process joins, the cluster's own RAY_SERVE_ENABLE_HA_PROXY decides",
                        choices=("haproxy", "proxy"))
    poll_s: float = opt(2.0, "seconds between checks for a new index build (and whether the held one is fresh)")
    storage_options: str = opt("", "fsspec storage options as JSON for the latents' storage")

    def __post_init__(self) -> None:
        self.require("latents")
        self.choice("ingress", ("haproxy", "proxy"))
        if not 0 < self.port < 65536 or self.replicas < 1 or self.poll_s <= 0:
            raise ConfigError(f"port must be in 1..65535, replicas ≥ 1 and poll_s > 0; got {self.port}, "
                              f"{self.replicas}, {self.poll_s}")
        try:
            opts = json.loads(self.storage_options or "{}")
        except ValueError as e:
            raise ConfigError(f"storage_options is not JSON: {e}") from None
        if not isinstance(opts, dict):
            raise ConfigError("storage_options must be a JSON object")


def deployment(replicas: int):
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0})
    class Neighbours:
        def __init__(self, latents: str, model: str, tracking_uri: str | None, poll_s: float, storage_options: dict):
            from pipeline.serving.service import NeighbourService, Poller

            self.service = NeighbourService(latents, model or None, tracking_uri, storage_options)
            self.poller = Poller(self.service, poll_s)

        async def __call__(self, request):
            status, payload = self.service.handle(request.method, request.url.path, await request.body())
            return JSONResponse(payload, status_code=status)

        def check_health(self):   # Serve restarts a replica whose poller died
            if not self.poller.thread.is_alive():
                raise RuntimeError("the index poller stopped")

    return Neighbours


def app(args: dict):
    """The application builder a Serve config names (`import_path: pipeline.serving.ray_app:app`, as
    infra/kuberay/rayservice-neighbours.yaml does): `args` holds ServeConfig's fields (latents,
    model, replicas, poll_s, storage_options, tracking_uri); unknown ones are an error."""
    args = dict(args or {})
    tracking = args.pop("tracking_uri", None)
    cfg = ServeConfig(**args)
    # no tracking_uri: the replicas' own MLFLOW_TRACKING_URI (every pod of the cluster has it)
    return deployment(cfg.replicas).bind(cfg.latents, cfg.model, tracking, cfg.poll_s,
                                         json.loads(cfg.storage_options or "{}"))


def run_serve(cfg: ServeConfig, ready=print) -> None:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port, run the app, and serve until
    SIGINT or SIGTERM; then shut Serve down."""
    from ray import serve

    from pipeline.runtime.ray_runtime import init_ray

    # read by Serve's controller when it starts, in this process's Ray (a local one inherits it)
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if cfg.ingress == "haproxy" else "0"
    if cfg.ingress == "haproxy":
        # HAProxy's stats and metrics listeners have fixed default ports (8404, 9101): a second service
        # on the machine could not start. Free ones, unless set.
        for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            os.environ.setdefault(name, str(_free_port()))
    init_ray(cfg.ray_address)
    # ours from here on (Ray's driver handler exits at once): a signal while the app deploys stops it cleanly
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    tracking = cfg.resolved_tracking_uri() if cfg.model else None
    app = deployment(cfg.replicas).bind(os.path.abspath(cfg.latents) if "://" not in cfg.latents else cfg.latents,
                                        cfg.model, tracking, cfg.poll_s, json.loads(cfg.storage_options or "{}"))
    from ray.serve.schema import LoggingConfig

    # a line per request in every replica's log (and the driver's terminal) costs more than the search
    serve.run(app, name="vaepipe-neighbours", route_prefix="/", logging_config=LoggingConfig(enable_access_log=False))
    ready(f"serve: neighbours of {cfg.latents} at http://{cfg.host}:{cfg.port}/neighbours "
          f"({cfg.replicas} replica(s){', records encoded by ' + cfg.model if cfg.model else ''}); "
          f"GET /healthz; Ctrl-C stops")
    try:
        stop.wait()
    finally:
        ingress = _haproxy_descendants()   # while the tree is whole: Ray's shutdown orphans them
        serve.shutdown()
        _stop(ingress)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _haproxy_descendants() -> list[tuple[int, str]]:
    """(pid, start time) of the HAProxy processes under this one (the ingress a local Ray's proxy
    actor started), from /proc."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, str]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            children.setdefault(int(rest[1]), []).append(int(d))
            info[int(d)] = (comm, rest[19])   # name, start time in clock ticks
    out, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if info[pid][0].startswith("haproxy"):
            out.append((pid, info[pid][1]))
    return out


def _stop(procs: list[tuple[int, str]]) -> None:
    """SIGTERM, then SIGKILL after 10 s, each process that is still the one seen (same start time)."""
    import time

    def alive(pid: int, start: str) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            return stat[stat.rindex(")") + 2:].split()[19] == start
        except OSError:
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [(p, t) for p, t in procs if alive(p, t)]
        for pid, _ in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [(p, t) for p, t in left if alive(p, t)]
        if not left:
            return
