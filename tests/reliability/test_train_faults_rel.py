"""Cases 1–2: training loses nothing when a worker dies or the last checkpoint disappears.

A run folder (`<storage>/<run_name>/`) holds vaepipe_run.json (one MLflow run id, the attempts),
journal.jsonl (one line per finished epoch, appended by every attempt), the first attempt's
checkpoints (`epoch_NNNN/`) and one `resume-K/epoch_NNNN/` folder per `--resume` (each a new Ray
Train run, so Ray never re-validates an earlier run's snapshot)."""
from __future__ import annotations

import os
import shutil

import pytest

from pipeline.training.train import TrainConfig, run_train
from pipeline.training.run_store import RunStore
from tests.tiny import TINY_TRAIN

TINY = dict(features=["image"], latent_dim=2, hidden=[8, 16], batch_size=256, seed=5, promote="never",
            workers=1, cache="auto")
KEYS = ("val_neg_elbo", "train_neg_elbo", "val_recon", "val_kl")


def _journal(run_dir: str) -> list[dict]:
    return RunStore(run_dir).journal()


def test_01_worker_dies_after_checkpoint_resumes_and_matches_clean_run(ray_local, digits_parquet, clean_tiny_run,
                                                                      tmp_path):
    work = str(tmp_path)
    clean = clean_tiny_run   # the same recipe, uninterrupted (tests/conftest.py)
    k = 1   # epoch 0 checkpointed (a checkpoint every epoch); the worker dies in epoch 1 (after its first batch)
    faulty = run_train(TrainConfig(input=digits_parquet, max_failures=1, fail_at_epoch=k, fail_rank=0,
                                   checkpoint_interval_s=0, model_name="faulty1", workdir=work, **TINY_TRAIN))
    assert os.path.exists(os.path.join(faulty.run_dir, ".fault_injected"))    # the fault fired
    journal = _journal(faulty.run_dir)
    assert [e["epoch"] for e in journal] == [0, 1, 2, 3]                      # resumed at k, nothing redone
    assert faulty.epochs_run == clean.epochs_run == 4
    # every epoch, not only the last, retraces the uninterrupted run
    ref = {e["epoch"]: e for e in _journal(clean.run_dir)}
    for e in journal:
        for m in KEYS:
            assert e[m] == pytest.approx(ref[e["epoch"]][m], abs=1e-4), (e["epoch"], m)
    for m in KEYS:
        assert faulty.metrics[m] == pytest.approx(clean.metrics[m], abs=1e-4), m


def test_02_resume_after_deleting_last_checkpoint_reruns_that_epoch_identically(ray_local, digits_parquet, tmp_path):
    work = str(tmp_path)
    # a checkpoint every epoch (on a fast machine these epochs are shorter than the default interval)
    first = run_train(TrainConfig(input=digits_parquet, epochs=3, run_name="del-last", model_name="del",
                                  checkpoint_interval_s=0, workdir=work, **TINY))
    run_dir = os.path.join(work, "ray_results", "del-last")
    assert first.run_dir == run_dir
    before = {e["epoch"]: e for e in _journal(run_dir)}
    shutil.rmtree(os.path.join(run_dir, "epoch_0002"))
    # --resume without a run name picks the latest run of the model name
    again = run_train(TrainConfig(input=digits_parquet, epochs=3, model_name="del", workdir=work, resume=True,
                                  checkpoint_interval_s=0, **TINY))
    assert again.run_dir == run_dir and again.run_id == first.run_id               # same folder, one MLflow run
    after = _journal(run_dir)
    assert [e["epoch"] for e in after] == [0, 1, 2, 2] and after[-1]["attempt"] == 1   # epoch 2 re-run, only it
    assert os.path.isfile(os.path.join(run_dir, "resume-1", "epoch_0002", "checkpoint.pt"))
    assert sorted(RunStore(run_dir).checkpoints()) == [0, 1, 2] and again.epochs_run == 3
    redo = after[-1]
    for m in KEYS:
        assert redo[m] == pytest.approx(before[2][m], abs=1e-4), m
        assert again.metrics[m] == pytest.approx(first.metrics[m], abs=1e-4), m
