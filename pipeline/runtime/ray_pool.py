"""The Ray Data actor pools of vaepipe's batch jobs (encode, decode, neighbours): one failing unit fails
the job, and a failed job's actors are killed at once, not left to Ray's reference counting.

Ray Data ends a pool by dropping its references to the actors (`ray.kill` only when forced), so an
actor lives as long as anything still reaches it. After a failure, that was the execution's scheduling
thread and the error's tracebacks. On a saturated machine the actors of a failed encode were released
107 s after the error and force-killed 30 s later (GCS log). Each held a CPU, and the next
job on that Ray (a nightly run's next partition, a training) waited for those CPUs. `KillPoolOnFailure`
kills them itself, as soon as the execution fails.

Imported only by code that runs Ray Data (it imports ray.data). `KillPoolOnFailure` reads Ray Data's
private operator and pool attributes (Ray is pinned to 2.60.0: pyproject.toml); should they move, it
kills nothing and Ray's own release still happens (tests/reliability/test_encode_reliability.py::test_04
fails then, naming the actors left alive)."""
from __future__ import annotations

import logging
import threading

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

log = logging.getLogger(__name__)


class KillPoolOnFailure(ExecutionCallback):
    """A Ray Data execution callback (one instance per execution, made by Ray Data from the dataset's
    context): it notes the actors of the execution's actor pools at each scheduling step and, if the
    execution fails, kills them (`ray.kill`, no restart). On success it only forgets them, and Ray
    Data releases them as usual. The pools are fixed-size (ActorPoolStrategy(size=n)), so noting an
    actor keeps none alive that the pool itself has let go."""

    def __init__(self) -> None:
        self._actors: dict = {}           # actor id -> handle
        self._lock = threading.Lock()     # steps run on the scheduling thread, the failure on the caller's

    def _note(self, executor) -> None:
        for op in getattr(executor, "_topology", {}):
            pool = getattr(op, "_actor_pool", None)
            if pool is None:
                continue
            handles = [*getattr(pool, "_running_actors", {}), *getattr(pool, "_pending_actors", {}).values()]
            with self._lock:
                for a in handles:
                    self._actors[a._actor_id] = a

    def on_execution_step(self, executor) -> None:
        self._note(executor)

    def after_execution_succeeds(self, executor) -> None:
        with self._lock:
            self._actors.clear()

    def after_execution_fails(self, executor, error: Exception) -> None:
        with self._lock:
            actors, self._actors = list(self._actors.values()), {}
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:   # already dead, or Ray going down: nothing more to free
                log.debug("could not kill actor %s of a failed execution: %s", a, e)


def strict_pool_dataset(ds: "ray.data.Dataset") -> "ray.data.Dataset":
    """`ds` set up for a batch job's actor pool, on the dataset's own context (a copy), never the
    process-wide DataContext that other jobs share: results in input order, one failing block fails
    the run (never a silent drop), the UDF's own typed error raised (not Ray's UserCodeException), and
    the pool's actors killed if the run fails."""
    ctx = ds.context
    ctx.execution_options.preserve_order = True
    ctx.max_errored_blocks = 0
    ctx.raise_original_map_exception = True
    ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, KillPoolOnFailure]
    return ds
