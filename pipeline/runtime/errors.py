"""Typed errors: each names the file, column or record at fault and what was expected."""


class VaepipeError(Exception):
    """Base class: the CLI prints these as one clear line and exits with `exit_code` (2). Our messages
    are one line; Ray Data appends lines of retry advice to the message of an error raised in a map
    UDF (it cannot help with a bad record), so str() keeps the first line, the one we wrote."""

    exit_code = 2

    def __str__(self) -> str:
        return super().__str__().split("\n", 1)[0]


class InputError(VaepipeError):
    """A URI, file or data set that cannot be used (missing, empty, corrupt, not allowed)."""


class SchemaError(InputError):
    """A missing column, a column of the wrong type, or a vector of the wrong length."""


class BadRecordError(InputError):
    """Records whose values cannot be used (NaN, inf, null)."""


class ModelNotFoundError(VaepipeError):
    """A registered model, version or alias that does not exist."""


class RegistryError(VaepipeError):
    """The model registry failed or stayed busy (not a missing model): its own message is kept."""

    exit_code = 5


class ConfigError(VaepipeError):
    """A job configuration that breaks an invariant."""


class CollapseError(VaepipeError):
    """A trained model whose posterior carries (almost) nothing: fewer active latent units than the
    threshold. It is registered, for inspection, but never promoted."""

    exit_code = 4


class LeaseHeldError(VaepipeError):
    """Another run holds the output's lease: one writer per output."""


class LeaseLostError(VaepipeError):
    """This run's lease was taken over (it stopped renewing past its expiry): nothing is committed."""


class ManifestError(InputError):
    """A manifest or state file in an output that is not what vaepipe writes (untrusted input)."""


class PartialFailure(VaepipeError):
    """Some units of a run (nightly partitions) failed; the others committed."""

    exit_code = 3

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result or {}


def _wrapped(e: BaseException) -> list[BaseException | None]:
    """The exceptions `e` wraps, by type: Python's cause/context chain, Ray's RayTaskError.cause,
    Ray Train V2's WorkerGroupError.worker_failures / ControllerError.controller_failure, the
    worker-side UserExceptionWithTraceback, and ExceptionGroup members."""
    inner: list[BaseException | None] = [e.__cause__, e.__context__]
    try:
        from ray.exceptions import RayTaskError

        if isinstance(e, RayTaskError):
            inner.append(e.cause)
    except ImportError:   # pragma: no cover (ray is a dependency; pure-python callers need not load it)
        pass
    try:
        from ray.train import ControllerError, WorkerGroupError
        from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

        if isinstance(e, WorkerGroupError):
            inner.extend(e.worker_failures.values())
        elif isinstance(e, ControllerError):
            inner.append(e.controller_failure)
        elif isinstance(e, UserExceptionWithTraceback):
            inner.append(e._base_exc)   # Ray keeps the worker's exception object here
    except ImportError:   # pragma: no cover
        pass
    if isinstance(e, BaseExceptionGroup):
        inner.extend(e.exceptions)
    return inner


def _is_ray_task_error(e: BaseException) -> bool:
    try:
        from ray.exceptions import RayTaskError
    except ImportError:   # pragma: no cover
        return False
    return isinstance(e, RayTaskError)


def unwrap_ray_error(e: BaseException) -> BaseException:
    """Our own typed error from inside Ray's wrappers (a failed task, actor or training worker),
    found by following what each wrapper holds, never by parsing messages; `e` itself when there
    is none."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        cur = stack.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        # Ray raises RayTaskError as a subclass of the cause's class too (as_instanceof_cause):
        # return the cause itself, whose message is ours, not the wrapper with a traceback.
        if isinstance(cur, VaepipeError) and not _is_ray_task_error(cur):
            return cur
        stack.extend(_wrapped(cur))
    return e


def released_ray_failure(e: BaseException) -> BaseException:
    """`unwrap_ray_error(e)`, cut loose from the failed Ray Data execution, for a job to raise.

    The pool's actors are killed as the execution fails (pipeline.runtime.ray_pool.KillPoolOnFailure); this
    frees the rest of the failed execution (its queues, object references and stats) and covers an
    actor the kill missed. Ray Data frees a pool by dropping its references, so without the kill the
    actors live as long as anything reaches them: the dataset (its last execution; callers `del` it
    first) and the failure's tracebacks, whose frames hold the streaming executor. A caller that kept
    the error (a nightly run recording a failed partition and going on, a notebook, pytest.raises)
    kept a CPU per actor, and the next job on that Ray waited for those CPUs (measured: a train's
    placement group pending 26 minutes behind four such encoders). So the frames of the whole chain
    are cleared (Ray Data's logged record of the failure keeps the traceback itself), the tracebacks
    dropped (the messages name what failed; the worker's traceback is in Ray's message) and the
    cycles left collected now, not at the next GC. Raise the result outside the `except` block, so
    that it does not take `e` as its context again."""
    import gc
    import traceback

    err = unwrap_ray_error(e)
    seen: set[int] = set()
    stack: list[BaseException | None] = [e, err]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        traceback.clear_frames(cur.__traceback__)   # the same frames a logged record's exc_info holds
        cur.__traceback__ = None
        stack.extend(_wrapped(cur))
    if err is not e:
        err.__cause__ = err.__context__ = None
    del e, stack
    _join_stopping_executors()
    gc.collect()
    return err


def _join_stopping_executors(timeout_s: float = 30.0) -> None:
    """Wait for the scheduling threads of Ray Data executions already shut down to end.

    A failed execution's shutdown joins its scheduling thread for 2 s only; on a loaded machine the
    thread was still in a step then, and its frames (and `threading`'s list of live threads) held the
    executor, the pool and so the actors past our `gc.collect()` (seen in CI: an encoder actor alive
    30 s after the error). Executions still running (not shut down) are other jobs' and left alone."""
    import sys
    import threading
    import time

    mod = sys.modules.get("ray.data._internal.execution.streaming_executor")
    if mod is None:   # no Ray Data execution in this process: nothing to wait for
        return
    StreamingExecutor = mod.StreamingExecutor
    deadline = time.monotonic() + timeout_s
    for t in threading.enumerate():
        if isinstance(t, StreamingExecutor) and getattr(t, "_shutdown", False) and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
