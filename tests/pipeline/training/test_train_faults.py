"""Training survives a dying worker and a stopped run, continuing from the last checkpoint."""
from __future__ import annotations

import glob
import os

import pytest

from pipeline.models.registry import client
from pipeline.training.train import TrainConfig, run_train
from pipeline.training.run_store import RunStore

from tests.tiny import TINY_TRAIN

TINY = {k: v for k, v in TINY_TRAIN.items() if k != "workers"}


def _journal(run_dir: str) -> list[int]:
    """Epochs in the order rank 0 finished them (the run folder's journal.jsonl, every attempt)."""
    return [e["epoch"] for e in RunStore(run_dir).journal()]


def test_killed_worker_restarts_from_last_checkpoint_not_from_zero(ray_local, digits_parquet, tmp_path):
    from ray.util.state import list_actors

    work = str(tmp_path)
    actors = lambda: {a.actor_id: a.class_name for a in list_actors(
        address=ray_local.get_runtime_context().gcs_address, limit=10_000, raise_on_missing_output=False)}
    before = actors()
    # rank 1 of 2 exits hard at the start of epoch 2; max_failures=1 lets Ray restart the group
    r = run_train(TrainConfig(input=digits_parquet, workers=2, max_failures=1, fail_at_epoch=2, fail_rank=1,
                              model_name="faulty", workdir=work, **TINY))
    assert os.path.exists(os.path.join(r.run_dir, ".fault_injected"))          # the fault did fire
    assert r.epochs_run == 4
    # each epoch was trained once: a restart from zero would have logged epochs 0 and 1 twice
    assert _journal(r.run_dir) == [0, 1, 2, 3]
    # the cached shards came from the driver's blocks, in both worker groups: Ray Train started no
    # DatasetManager and no SplitCoordinator actor (a process each) for this run
    started = [c for a, c in actors().items() if a not in before]
    assert "RayTrainWorker" in started and not {"DatasetManager", "SplitCoordinator"} & set(started), started


def test_resume_after_a_stopped_run_matches_an_uninterrupted_run(ray_local, digits_parquet, clean_tiny_run, tmp_path):
    # a checkpoint every epoch (--checkpoint-interval-s 0): the stop and the lost journal line are
    # placed at epoch 1's checkpoint
    work = str(tmp_path)
    clean = clean_tiny_run
    # the same run, stopped at epoch 2 (no restarts allowed), then resumed with --resume
    with pytest.raises(Exception):
        run_train(TrainConfig(input=digits_parquet, workers=1, max_failures=0, fail_at_epoch=2, run_name="stopped-1",
                              model_name="stopped", workdir=work, checkpoint_interval_s=0, **TINY))
    assert len(glob.glob(f"{work}/ray_results/stopped-1/epoch_*")) == 2
    # as if the worker group had been torn down after epoch 1's checkpoint but before its journal line
    journal_file = f"{work}/ray_results/stopped-1/journal.jsonl"
    with open(journal_file) as f:
        lines = f.readlines()
    assert len(lines) == 2
    with open(journal_file, "w") as f:
        f.write(lines[0])
    resumed = run_train(TrainConfig(input=digits_parquet, workers=1, resume=True, run_name="stopped-1",
                                    model_name="stopped", workdir=work, checkpoint_interval_s=0, **TINY))
    assert resumed.epochs_run == clean.epochs_run == 4
    assert _journal(resumed.run_dir) == [0, 1, 2, 3]                       # no epoch trained twice
    # the lost line came back from the checkpoint resumed from (the commit point), not from a rerun
    assert [e.get("recovered", False) for e in RunStore(resumed.run_dir).journal()] == [False, True, False, False]
    assert glob.glob(f"{work}/ray_results/stopped-1/resume-1/epoch_*")        # a new Ray run in the same folder
    assert resumed.run_id == client(f"sqlite:///{work}/mlflow.db").search_runs(
        [client(f"sqlite:///{work}/mlflow.db").get_experiment_by_name("vaepipe").experiment_id],
        filter_string="attributes.run_name = 'stopped-1'")[0].info.run_id      # one MLflow run across the stop
    # seeded per (seed, epoch), fixed block order and per-record validation ε: the resumed run retraces
    # the uninterrupted one (measured: bitwise equal on CPU; 1e-4 leaves room for BLAS differences)
    for m in ("val_neg_elbo", "train_neg_elbo"):
        assert resumed.metrics[m] == pytest.approx(clean.metrics[m], abs=1e-4), m


def test_a_failure_between_shared_checkpoints_reruns_the_epochs_since_and_retraces_a_clean_run(
        ray_local, digits_parquet, clean_tiny_run, tmp_path):
    """Epochs that share a checkpoint (--checkpoint-interval-s longer than the run: the best epoch is
    held, nothing reported until the last) and a worker that dies at epoch 2: the restarted group has
    no checkpoint to go back to, so it reruns epochs 0 and 1. Their journal lines waited for a
    checkpoint that never came, so every epoch is journalled once, and the figures retrace the clean
    run's."""
    r = run_train(TrainConfig(input=digits_parquet, max_failures=1, fail_at_epoch=2, fail_rank=0,
                              checkpoint_interval_s=3600, model_name="shared", workdir=str(tmp_path), **TINY))
    assert os.path.exists(os.path.join(r.run_dir, ".fault_injected"))          # the fault did fire
    assert _journal(r.run_dir) == [0, 1, 2, 3] and r.epochs_run == 4
    clean = {e["epoch"]: e for e in RunStore(clean_tiny_run.run_dir).journal()}
    for e in RunStore(r.run_dir).journal():
        for m in ("val_neg_elbo", "train_neg_elbo"):
            assert e[m] == pytest.approx(clean[e["epoch"]][m], abs=1e-4), (e["epoch"], m)
    assert max(RunStore(r.run_dir).checkpoints()) == 3


def test_sigkill_of_train_between_shared_checkpoints_then_resume_trains_each_epoch_once_as_a_clean_run(
        ray_local, tmp_path):
    """A real `vaepipe train` process group SIGKILLed while epochs of a 20-record table share
    checkpoints (the default --checkpoint-interval-s): the journal holds exactly the committed epochs,
    the newest checkpoint is the last of them, and --resume trains the rest, each epoch once, ending
    as an uninterrupted run of the same seed does, epoch by epoch."""
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_linnerud

    from tests.jobs.conftest import REPO, _session_pids, stop_pids

    d = load_linnerud()
    x = np.hstack([d.data, d.target]).astype(np.float32)
    cols = [f"c{i}" for i in range(x.shape[1])]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": np.arange(len(x)), **{c: x[:, i] for i, c in enumerate(cols)}}),
                   tmp_path / "in" / "part-0.parquet")
    epochs = 1500
    kw = dict(input=str(tmp_path / "in"), features=cols, latent_dim=2, hidden=[16], epochs=epochs, batch_size=128,
              workers=1, seed=0, promote="never")
    work, log = tmp_path / "killed", tmp_path / "killed.log"
    args = ["train", "--input", kw["input"], "--features", ",".join(cols), "--latent-dim", "2", "--hidden", "16",
            "--epochs", str(epochs), "--batch-size", "128", "--workers", "1", "--seed", "0", "--promote", "never",
            "--model-name", "killed", "--run-name", "killed", "--workdir", str(work)]
    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, stdout=open(log, "w"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        journal_file = work / "ray_results" / "killed" / "journal.jsonl"
        deadline = time.monotonic() + 240
        while not (journal_file.exists() and journal_file.read_text().count("\n") >= 1):
            assert p.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint committed:\n" + log.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(1.5)                                     # into the next shared checkpoint's epochs
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        stop_pids(lambda: _session_pids(p.pid))           # the killed run's local Ray
    store = RunStore(str(work / "ray_results" / "killed"))
    before = [e["epoch"] for e in store.journal()]
    assert before == list(range(len(before))) and len(before) < epochs, before[-3:]   # killed mid-run
    assert max(store.checkpoints()) == before[-1]       # a line is there only once its checkpoint is
    run_train(TrainConfig(model_name="killed", run_name="killed", resume=True, workdir=str(work), **kw))
    journal = store.journal()
    assert [e["epoch"] for e in journal] == list(range(epochs))
    assert [e["attempt"] for e in journal] == [0] * len(before) + [1] * (epochs - len(before))
    clean = run_train(TrainConfig(model_name="clean", workdir=str(tmp_path / "clean"), **kw))
    for a, b in zip(journal, RunStore(clean.run_dir).journal(), strict=True):
        for m in ("val_neg_elbo", "train_neg_elbo"):
            assert a[m] == pytest.approx(b[m], abs=1e-4), (a["epoch"], m)
