"""MLflow tracking and registry: the model is registered as weights + config (a vaepipe
checkpoint), with a pyfunc wrapper built from code (models-from-code, no pickled objects), its
signature, metrics and lineage; aliases move only when a version is READY."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import subprocess
import time
import warnings
from dataclasses import dataclass

import numpy as np

from pipeline.runtime.errors import ModelNotFoundError, RegistryError
from pipeline.runtime.redact import redact_uri

log = logging.getLogger(__name__)

PYFUNC_CODE = os.path.join(os.path.dirname(__file__), "mlflow_model.py")
CHECKPOINT_ARTIFACT = "checkpoint"


def client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextlib.contextmanager
def using_tracking(tracking_uri: str):
    """MLflow's fluent API against this store (tracking and registry alike) for one block.
    mlflow.set_tracking_uri and set_registry_uri also export $MLFLOW_TRACKING_URI and
    $MLFLOW_REGISTRY_URI, which would silently redirect every later job in this process (and the
    processes it starts): both globals and both variables are put back afterwards."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def experiment_id(tracking_uri: str, name: str, artifact_root: str | None = None) -> str:
    """Get or create the experiment; a local store keeps artifacts beside the SQLite file."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc = None
    if artifact_root is None and tracking_uri.startswith("sqlite:///"):
        loc = "file://" + os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]), "mlartifacts")
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(name, artifact_location=artifact_root or loc)
    except MlflowException:  # created concurrently (RESOURCE_ALREADY_EXISTS); anything else re-raises below
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    run_id: str | None
    uri: str                  # models:/NAME/VERSION (an alias resolved once, here)
    requested: str            # what the user asked for (models:/NAME@ALIAS)


_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


# What the store answers when the name, version or alias does not exist (an alias it does not know is
# INVALID_PARAMETER_VALUE in MLflow 3); anything else is the store's own failure, reported as such.
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
# A store that is busy (SQLite "database is locked" past its 20 s busy timeout, a server shedding load):
# asked again, with backoff, for up to `READ_RETRY_S`.
TRANSIENT = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
READ_RETRY_S = 60.0


def ask(fn, what: str, tracking_uri: str, retry_s: float | None = None):
    """fn() against the registry (a read, or a write that is harmless to repeat); a busy store is
    asked again until `retry_s` has passed. Not-found answers propagate as MlflowException (the
    caller says what is missing); any other failure, or a store still busy at the deadline, is a
    RegistryError that carries the store's own message."""
    from mlflow.exceptions import MlflowException

    deadline = time.monotonic() + (READ_RETRY_S if retry_s is None else retry_s)
    pause = 0.2
    while True:
        try:
            return fn()
        except MlflowException as e:
            if e.error_code in NOT_FOUND:
                raise
            if e.error_code not in TRANSIENT:
                raise RegistryError(f"{what}: the registry at {redact_uri(tracking_uri)} failed "
                                    f"({e.error_code}): {_one_line(e.message)}") from e
            if time.monotonic() + pause > deadline:
                raise RegistryError(f"{what}: the registry at {redact_uri(tracking_uri)} was still busy "
                                    f"after {retry_s if retry_s is not None else READ_RETRY_S:.0f} s "
                                    f"({e.error_code}): {_one_line(e.message)}") from e
            log.warning("%s: registry busy (%s), asking again in %.1f s", what, e.error_code, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def _one_line(message) -> str:
    """The store's message on one line, without the SQL statement SQLAlchemy appends."""
    return " ".join(str(message).split()).split(" [SQL:")[0][:500]


def resolve_model(model_uri: str, tracking_uri: str, retry_s: float | None = None) -> ModelRef:
    """models:/NAME@ALIAS or models:/NAME/VERSION → a fixed version. A job resolves once and uses that
    version for every row, even if the alias moves mid-job. A version or alias that does not exist is
    a ModelNotFoundError; a store that fails or stays busy is a RegistryError with its own message."""
    from mlflow.exceptions import MlflowException

    m = _URI.match(model_uri or "")
    if not m:
        raise ModelNotFoundError(f"model URI {model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = m["name"], m["alias"], m["version"]
    c = client(tracking_uri)
    try:
        mv = ask(lambda: c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version),
                 f"model {model_uri!r}", tracking_uri, retry_s)
    except MlflowException as e:   # not found: say what is there instead
        what = f"alias {alias!r}" if alias else f"version {version}"
        known = _known_aliases(c, name, tracking_uri, retry_s)
        raise ModelNotFoundError(f"model {model_uri!r}: registered model {name!r} has no {what} in "
                                 f"{redact_uri(tracking_uri)} ({known}; the store said: "
                                 f"{_one_line(e.message)})") from None
    return ModelRef(name=name, version=str(mv.version), run_id=mv.run_id,
                    uri=f"models:/{name}/{mv.version}", requested=model_uri)


def _known_aliases(c, name: str, tracking_uri: str, retry_s: float | None = None) -> str:
    from mlflow.exceptions import MlflowException

    try:
        rm = ask(lambda: c.get_registered_model(name), f"registered model {name!r}", tracking_uri, retry_s)
    except MlflowException:
        return "no registered model of that name"
    aliases = getattr(rm, "aliases", {}) or {}
    return f"known aliases: {dict(aliases)}" if aliases else "it has no aliases"


@contextlib.contextmanager
def _no_download_bars():
    """MLflow draws a "Downloading artifacts" bar for every download, even into a log file (logging
    and registering a model fetch its MLmodel back; a job fetches one small checkpoint). A value of
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR set by the user wins."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def download_checkpoint(ref: ModelRef, tracking_uri: str, dst: str | None = None) -> str:
    """Local path of the version's checkpoint file (weights + config + preprocessing)."""
    import mlflow

    with using_tracking(tracking_uri), _no_download_bars():   # models:/m-… sources resolve through the global URI
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=dst, tracking_uri=tracking_uri)
    found = glob.glob(os.path.join(local, "**", "checkpoint.pt"), recursive=True)
    if not found:
        raise ModelNotFoundError(f"{ref.uri}: no checkpoint.pt among its artifacts (not a vaepipe model)")
    return found[0]


def load_model_bytes(model_uri: str, tracking_uri: str) -> tuple[ModelRef, bytes]:
    """Resolve and fetch a registered model's checkpoint as bytes (cheap to ship to Ray actors)."""
    import tempfile

    ref = resolve_model(model_uri, tracking_uri)
    with tempfile.TemporaryDirectory() as d:
        with open(download_checkpoint(ref, tracking_uri, d), "rb") as f:
            return ref, f.read()


def log_model(run_id: str, checkpoint_path: str, input_dim: int, latent_dim: int, tracking_uri: str,
              example: np.ndarray | None = None) -> str:
    """Log the pyfunc model (code + checkpoint artifact + signature) into the run; return its URI.
    The signature comes from the preprocessing stored in the checkpoint (`model_signature`).
    `example` is not used: an input example would cost a model load and a predict at every log, and
    the signature already says what a request holds (docs/serving.md shows one)."""
    import mlflow

    from vae.checkpoint import load_checkpoint
    from vae.config import VAEConfig

    cfg = VAEConfig.from_dict(load_checkpoint(checkpoint_path)["config"])
    signature = model_signature(cfg.preprocessing, input_dim, latent_dim, cfg.semi.classes if cfg.semi else None)
    with using_tracking(tracking_uri), mlflow.start_run(run_id=run_id), _no_download_bars(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=PYFUNC_CODE, artifacts={CHECKPOINT_ARTIFACT: checkpoint_path},
            signature=signature, pip_requirements=_requirements(), code_paths=None)
    return info.model_uri


def _mlflow_type(dtype: np.dtype):
    """The widest MLflow column type of dtype's kind, so that every narrower input converts safely
    (MLflow refuses double → float and long → integer): floats → double, integers → long."""
    from mlflow.types import DataType

    if dtype.kind == "f":
        return DataType.double
    if dtype.kind in "iu":
        return DataType.long
    if dtype.kind == "b":
        return DataType.boolean
    raise ValueError(f"no MLflow column type for feature dtype {dtype}")


def model_signature(pre, input_dim: int, latent_dim: int, classes: tuple | None = None):
    """What the served model accepts, by name: one column per feature (scalar features, any order,
    each of its training type or one that converts safely), or one named tensor (N, D) of the
    training value type (a list feature, e.g. uint8 images). Output: μ, float32 (N, L); with a class
    list (`train --labels`), the columns pipeline.models.mlflow_model.prediction_frame returns: `mu` (an
    array of floats), `pred` (long or string) and one float `pred_prob_<class>` per class."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array

    from pipeline.table.labels import prob_columns

    out = Schema([TensorSpec(np.dtype(np.float32), (-1, latent_dim))])
    if classes:
        pred = DataType.long if isinstance(classes[0], int) else DataType.string
        out = Schema([ColSpec(Array(DataType.float), "mu"), ColSpec(pred, "pred"),
                      *[ColSpec(DataType.float, c) for c in prob_columns(classes)]])
    if not pre.features:   # a config without preprocessing: an unnamed float32 matrix, as before
        return ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, input_dim))]), out)
    if pre.layout == "scalars":
        inputs = Schema([ColSpec(_mlflow_type(pre.input_dtype(c)), name=c) for c in pre.features])
    else:
        inputs = Schema([TensorSpec(pre.input_dtype(), (-1, input_dim), name=pre.features[0])])
    return ModelSignature(inputs, out)


def _requirements() -> list[str]:
    import importlib.metadata as md

    pins = []
    for pkg in ("torch", "numpy", "mlflow"):
        try:
            pins.append(f"{pkg}=={md.version(pkg).split('+')[0]}")
        except md.PackageNotFoundError:
            pass
    try:
        pins.append(f"vaepipe=={md.version('vaepipe')}")
    except md.PackageNotFoundError:
        pass
    return pins


def register(model_uri: str, name: str, tracking_uri: str, run_id: str, tags: dict[str, str] | None = None,
             timeout_s: float = 120.0):
    """Register a version and wait until it is READY (MLflow's own `await_creation_for`): an alias
    must never point at a version that is still pending."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)

    def create_name():   # idempotent, so a busy store is asked again
        try:
            c.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    ask(create_name, f"registered model {name!r}", tracking_uri)
    # A logged model (models:/m-ID, what log_model returns in MLflow 3) must be named by model_id
    # too: a tracking server refuses that source without it (INVALID_PARAMETER_VALUE), and the
    # SQLite store resolves it through the global tracking URI (hence using_tracking).
    logged = re.match(r"^models:/(m-[0-9a-f]+)/?$", model_uri)
    try:   # await_creation_for: MLflow raises unless the version is READY in time (FAILED_REGISTRATION too)
        with using_tracking(tracking_uri), _no_download_bars():
            mv = c.create_model_version(name, source=model_uri, run_id=run_id, tags=tags or {},
                                        model_id=logged[1] if logged else None,
                                        await_creation_for=max(1, int(timeout_s)))
    except MlflowException as e:   # not asked again: a retried create could leave a second version
        if e.error_code in TRANSIENT:
            raise RegistryError(f"model {name}: registering {model_uri}: the registry at {redact_uri(tracking_uri)} "
                                f"was busy ({e.error_code}): {_one_line(e.message)}") from e
        raise ModelNotFoundError(f"model {name}: no READY version from {model_uri} within {timeout_s:.0f} s: "
                                 f"{e.message}") from e
    return c.get_model_version(name, mv.version)   # the status as of now (READY), not at creation


def set_alias_when_ready(name: str, alias: str, version: str, tracking_uri: str,
                         retry_s: float | None = None) -> None:
    """Point `alias` at `version` once the store says it is READY. Both calls are asked again while
    the store is busy (setting an alias twice to the same version is harmless); a store that fails
    or stays busy is a RegistryError, so the caller can say the alias did not move."""
    c = client(tracking_uri)
    mv = ask(lambda: c.get_model_version(name, version), f"model {name!r} version {version}", tracking_uri, retry_s)
    if mv.status != "READY":
        raise ModelNotFoundError(f"model {name} version {version} is {mv.status}; alias {alias!r} not moved")
    ask(lambda: c.set_registered_model_alias(name, alias, version),
        f"alias {alias!r} of model {name!r} to version {version}", tracking_uri, retry_s)


def current_alias_version(name: str, alias: str, tracking_uri: str, retry_s: float | None = None) -> str | None:
    """The version `alias` points at; None only when the store says there is none. A store that fails
    or stays busy raises (RegistryError): promotion must not read "no alias yet" into a lock."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        return str(ask(lambda: c.get_model_version_by_alias(name, alias),
                       f"alias {alias!r} of model {name!r}", tracking_uri, retry_s).version)
    except MlflowException:
        return None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):   # no git binary, or it hung
        return "unknown"


def log_evaluation(run_id: str, metrics: dict[str, float], files: list[str], tracking_uri: str) -> None:
    """An evaluation's metrics (step 0) and files (under `evaluation/`) into the model's run."""
    from mlflow.entities import Metric

    c = client(tracking_uri)
    ts = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()])
    for p in files:
        c.log_artifact(run_id, p, "evaluation")


def fingerprint(entries: list[tuple[str, int, str]]) -> str:
    """A short hash of the input files: (path, rows, footer-hash) each."""
    h = hashlib.sha256(json.dumps(sorted(entries)).encode())
    return h.hexdigest()[:16]
