"""Starting or joining Ray, sized so Ray Data tasks still get CPU beside the train workers."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, reserve_cpus: float = 0.0) -> None:
    """Join $RAY_ADDRESS / `address` if given (e.g. under `ray job submit`), else start a local Ray.
    Locally, logical CPUs are the cores plus `reserve_cpus`, so that train workers holding one CPU
    each do not starve the data-reading tasks (2 workers on 2 cores otherwise deadlock the read)."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        # A local Ray is one node: keep every Ray address on loopback. Ray otherwise rewrites
        # 127.0.0.1 to the host's own interface address (services.resolve_ip_for_localhost); its
        # documented switch is this variable, read at import, so set it before `import ray` (and for
        # the worker processes, which inherit the environment) and on the constant if already imported.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if not (address or os.environ.get("RAY_ADDRESS")):
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Ray Train V2's controller polls its workers every 2 s by default, and every state change of a
    # run (start, each report, finish) waits for a poll: ~7 s of a 2-epoch local run. On one node a
    # poll is cheap; the workers inherit the variable from the raylet this process starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    cpus = (os.cpu_count() or 1) + max(0.0, reserve_cpus)
    # The dashboard stays on: Ray Train V2's controller watchdog queries the State API it serves.
    ray.init(num_cpus=int(cpus + 0.999), log_to_driver=True, configure_logging=True,
             logging_level=logging.WARNING, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1")  # local Ray talks over loopback only


def quiet_data_progress() -> None:
    """Ray Data progress bars garble logs of batch jobs; keep the figures, drop the bars."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        ctx.print_on_execution_start = False
    except AttributeError:
        pass
