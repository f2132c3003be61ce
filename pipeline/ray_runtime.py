"""Starting or joining Ray, sized so Ray Data tasks still get CPU beside the train workers, and
keeping a successful run's output to what it did: no internal chatter, every real warning kept."""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile

log = logging.getLogger(__name__)

# Ray Data's logging, for every process of a local Ray (read at `import ray.data`, which the driver
# redoes below): its own default (ray/data/_internal/logging.py DEFAULT_CONFIG) with the console at
# WARNING, so "Dataset … execution finished" INFO lines stay in the session's ray-data.log, and one
# known message dropped (RayDataConsoleFilter). vaepipe prints its own progress (pipeline.progress).
_RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
filters:
  console_filter: {"()": pipeline.ray_runtime.RayDataConsoleFilter}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}
  console: {class: ray._private.log.PlainRayHandler, formatter: ray, level: WARNING, filters: [console_filter]}
loggers:
  ray.data: {level: DEBUG, handlers: [file, console], propagate: false}
"""


class RayDataConsoleFilter(logging.Filter):
    """Ray Data's console filter (records marked hidden stay hidden) minus the warning that its
    progress bars are off: vaepipe switches them off on purpose and reports progress itself."""

    QUIET = ("Progress bars disabled.",)

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
    # Ray Train V2 replaces `print` in its workers by a logger call that, whenever sys.stdout is
    # wrapped (it is in a Ray worker), also prints: every epoch line reached the driver twice. With
    # the patch off a worker's print goes to its stdout once, and from there to the driver. The
    # controller passes this variable on to its workers (ENV_VARS_TO_PROPAGATE).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    if not (address or os.environ.get("RAY_ADDRESS")):
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        _quiet_local_ray_env()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
        _filter_streamed_logs()
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
    _filter_streamed_logs()


def quiet_data_progress() -> None:
    """Ray Data's bars off (they garble the logs of batch jobs, and its actors draw their own): the
    jobs report records done / total, rate and ETA themselves (pipeline.progress), and Ray Data's
    notice that the bars are off is filtered out (RayDataConsoleFilter)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        ctx.print_on_execution_start = False
    except AttributeError:
        pass
