"""Shared fixtures: one seed for every test; one local Ray for the session (on loopback); a real
MLflow SQLite store per test module; real Parquet data on disk."""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import json
import os
import random
import shutil
import tempfile

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # local Ray on loopback only (see init_ray)
os.environ.pop("RAY_ADDRESS", None)            # never join a cluster by accident
os.environ.pop("MLFLOW_TRACKING_URI", None)
# `vaepipe query`'s cache goes to a folder of this test process, never the user's ~/.cache, and goes
# with the process (each pytest process, xdist workers included, makes its own)
os.environ["VAEPIPE_CACHE_DIR"] = tempfile.mkdtemp(prefix="vaepipe-test-cache-")
atexit.register(shutil.rmtree, os.environ["VAEPIPE_CACHE_DIR"], ignore_errors=True)


# Test files that share a session fixture: under `make test` (`-n 2 --dist loadfile`) each group runs
# in one worker, so the fixture is made once (session fixtures are per worker process).
SHARED_FIXTURE_GROUPS = {
    "tests/jobs/test_mlflow_server.py": "http_trained",
    "tests/jobs/test_redaction.py": "http_trained",
    "tests/pipeline/training/test_train_faults.py": "clean_tiny_run",
    "tests/reliability/test_train_faults_rel.py": "clean_tiny_run",
}


# The files (and groups) that take longest, longest first: handed out first, so that the two workers
# end together instead of one finishing a long file alone while the other idles (the largest files
# first: the longest-processing-time rule). xdist's own order is by number of tests, which put these,
# few tests each, last. Order only: every other file runs after them, in collection order.
LONGEST_FIRST = [                                   # seconds in a full run (`--durations`)
    "tests/pipeline/training/test_semi_train.py",             # 246
    "clean_tiny_run",                                # 217 (test_train_faults 135 + test_train_faults_rel 82)
    "tests/pipeline/training/test_train.py",                  # 171
    "tests/reliability/test_outputs_trust.py",       # 154
    "tests/pipeline/runtime/test_ray_runtime.py",            # 79
    "tests/pipeline/measure/test_bench.py",                  # 75
    "tests/reliability/test_encode_reliability.py",  # 67
    "tests/pipeline/table/test_s3.py",                     # 63
    "tests/jobs/test_quiet_output.py",               # 59
    "http_trained",                                  # 33
    "tests/pipeline/models/test_serving.py",                # 29
    "tests/pipeline/batch/test_anomaly_jobs.py",           # 25
    "tests/pipeline/batch/test_batch_jobs.py",             # 23
    "tests/pipeline/training/test_mnist_spine.py",            # 21
    "tests/pipeline/batch/test_encode.py",                 # 20
]


def _scope(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return SHARED_FIXTURE_GROUPS.get(path, path)


# A test that uses one of these starts (or shares) a real Ray, MLflow server, S3 endpoint or trained
# run: it is marked `stack`, and `make test-fast` (-m "not stack and not slow") leaves it out.
STACK_FIXTURES = {"ray_local", "mlflow_server", "s3_server", "s3_bucket", "digits_model_store", "trained_digits",
                  "clean_tiny_run", "http_trained"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if STACK_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.stack)
    rank = {scope: i for i, scope in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_scope(item.nodeid), len(rank)))   # stable: file order kept


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, except that the files of one SHARED_FIXTURE_GROUPS group go to one worker,
    and files are handed out in collection order (LONGEST_FIRST above), not by number of tests.
    (xdist's own `loadgroup` put one xdist_group's tests on both workers with pytest 9.2 + xdist 3.8.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return SharedFixtureScheduling(config, log)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (the test files that train many tiny models use it: on 2
    shared cores, torch's own thread pool only adds contention), restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def no_mlflow_uri_leak():
    """A test (or the code it runs) that leaves $MLFLOW_TRACKING_URI or $MLFLOW_REGISTRY_URI changed
    fails here, at its source: a later test's job in the same worker would otherwise read another
    module's store (a job's default tracking URI is that variable) and fail far from the cause."""
    before = {k: os.environ.get(k) for k in MLFLOW_URI_VARS}
    yield
    after = {k: os.environ.get(k) for k in MLFLOW_URI_VARS}
    for k, v in before.items():   # put back, so one leak fails one test
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert after == before, f"the test left MLflow's URI variables changed: {before} -> {after}"


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance shared by the session (starting one costs ~10 s on 2 cores)."""
    import ray

    from pipeline.runtime.ray_runtime import init_ray

    init_ray("local", reserve_cpus=3)   # never a cluster found running on this machine
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def once_per_run(tmp_path_factory, name: str):
    """(folder, done) for something made once per pytest run, whatever the number of xdist workers:
    the folder lies beside the workers' own temp folders, and a file lock lets the first worker make
    it while the other waits, then reuses it (pytest-xdist's recipe for session fixtures that should
    run once). The maker writes `done` (a JSON file) last, so a folder without it is made again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                    # pytest-N/, shared by popen-gw0, popen-gw1, ...
    folder, done = root / name, root / name / "done.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # released when the file closes
        if not done.exists() and folder.exists():
            shutil.rmtree(folder)             # a maker that failed half-way
        folder.mkdir(exist_ok=True)
        yield folder, done


@pytest.fixture(scope="session")
def digits_parquet(tmp_path_factory):
    """scikit-learn's 8×8 digits as Parquet: id, label, image (64 × uint8), in 3 files (one copy for
    the whole run: the model of `digits_model_store` names it as its input)."""
    from pipeline.evaluation.datasets import digits, images_table, write_parquet

    with once_per_run(tmp_path_factory, "digits") as (folder, done):
        if done.exists():
            return json.loads(done.read_text())["path"]
        x, y = digits()
        path = write_parquet(images_table(x, y), str(folder / "data"), files=3)
        done.write_text(json.dumps({"path": path}))
        return path


@pytest.fixture(scope="session")
def mnist_parquet(tmp_path_factory):
    """The shared 8,000 real MNIST digits as Parquet: id, label, image (784 × uint8), in 4 files."""
    from pipeline.evaluation.datasets import images_table, mnist, write_parquet

    x, y = mnist()
    return write_parquet(images_table(x, y), str(tmp_path_factory.mktemp("mnist")), files=4)


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory):
    """An MLflow SQLite store with its tables made, once per session: creating them (MLflow's
    migrations) costs 4-6 s on 2 cores, copying the file 0.1 s. It holds only MLflow's own Default
    experiment; vaepipe's experiment is created in each copy, with artifacts beside that copy."""
    import shutil

    from pipeline.models.registry import client

    folder = tmp_path_factory.mktemp("mlflow-template")
    client(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return lambda dest: shutil.copyfile(folder / "mlflow.db", os.path.join(dest, "mlflow.db"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, empty_mlflow_db):
    """A work folder with its own MLflow SQLite store (a copy of the empty template)."""
    folder = str(tmp_path_factory.mktemp("work"))
    empty_mlflow_db(folder)
    return folder


@pytest.fixture(scope="session")
def clean_tiny_run(ray_local, digits_parquet, tmp_path_factory, empty_mlflow_db):
    """One uninterrupted TINY_TRAIN run (its own work folder): the reference every fault test's
    interrupted run must retrace, epoch by epoch. Tests read it, never resume or change it."""
    from pipeline.training.train import TrainConfig, run_train
    from tests.tiny import TINY_TRAIN

    work = str(tmp_path_factory.mktemp("clean-run"))
    empty_mlflow_db(work)
    return run_train(TrainConfig(input=digits_parquet, model_name="clean", workdir=work, **TINY_TRAIN))


@pytest.fixture(scope="session")
def digits_model_store(ray_local, digits_parquet, tmp_path_factory, empty_mlflow_db):
    """A small model trained once per session on the digits, registered as `digits@production` in
    its own work folder (MLflow SQLite store + artifacts). Returns (folder, TrainResult)."""
    from pipeline.training.train import TrainConfig, TrainResult, run_train

    # Trained once per run, not once per xdist worker (a fit costs ~30 CPU-seconds, mostly Ray Train's
    # processes starting): modules read it and work on copies of its SQLite file (trained_digits).
    with once_per_run(tmp_path_factory, "digits-model") as (folder, done):
        work = str(folder)
        if done.exists():
            return work, TrainResult(**json.loads(done.read_text()))
        empty_mlflow_db(work)
        r = run_train(TrainConfig(input=digits_parquet, features=["image"], epochs=3, workers=1, latent_dim=4,
                                  hidden=[8, 16], batch_size=128, model_name="digits", workdir=work))
        done.write_text(json.dumps(dataclasses.asdict(r)))
        return work, r


@pytest.fixture(scope="module")
def trained_digits(digits_model_store, workdir):
    """`digits@production` (version 1) in this module's own MLflow store: a copy of the session's
    SQLite file, so aliases moved and versions added here stay here. Training once per session
    instead of once per module saves ~40 s per module; the copy's runs keep logging their artifacts
    under the session folder (unique run ids, nothing shared is rewritten)."""
    import shutil

    src, result = digits_model_store
    shutil.copyfile(os.path.join(src, "mlflow.db"), os.path.join(workdir, "mlflow.db"))
    return result
