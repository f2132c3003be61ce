"""The end-to-end check on real MNIST: train with 2 Ray Train workers, then encode all 8,000."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq

from pipeline.models import registry
from pipeline.batch.encode import EncodeConfig, run_encode
from pipeline.training.run_store import RunStore
from pipeline.training.train import TrainConfig, run_train


def test_mnist_two_workers_train_then_encode_keeps_all_8000_ids(ray_local, mnist_parquet, tmp_path):
    work = str(tmp_path / "work")
    # A small MLP keeps this to seconds on 2 cores; DDP across 2 workers is the point here.
    tr = run_train(TrainConfig(input=mnist_parquet, features=["image"], workers=2, epochs=1, arch="mlp",
                               hidden=[64], latent_dim=8, batch_size=256, model_name="mnist", workdir=work))
    assert tr.version == "1" and np.isfinite(tr.metrics["val_neg_elbo"])
    # DDP really ran on 2 workers: rank 0 saw a world of 2 (MLflow tag, and every journal line)
    run = registry.client(f"sqlite:///{os.path.abspath(os.path.join(work, 'mlflow.db'))}").get_run(tr.run_id)
    assert run.data.tags["vaepipe.world_size"] == "2"
    assert [e["world_size"] for e in RunStore(tr.run_dir).journal()] == [2]
    out = str(tmp_path / "latents")
    r = run_encode(EncodeConfig(model="models:/mnist@production", input=mnist_parquet, output=out,
                                keep=["id", "label"], workdir=work))
    t = pq.read_table(out)
    assert r.rows_out == t.num_rows == 8000
    assert sorted(t.column("id").to_pylist()) == list(range(8000))
    mu = t.column("mu").combine_chunks().flatten().to_numpy().reshape(-1, 8)
    assert np.isfinite(mu).all() and mu.std(0).min() > 0   # finite and not collapsed to a constant
