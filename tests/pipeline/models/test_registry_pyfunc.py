"""The registered model loads back both ways: vaepipe's weights-only builder, and MLflow's pyfunc
(built from code, not unpickled) returning μ for raw records."""
from __future__ import annotations

import os

import mlflow
import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.models.registry import load_model_bytes, using_tracking
from vae.checkpoint import load_checkpoint, model_from_checkpoint


def test_pyfunc_predict_equals_vaepipe_mu(trained_digits, digits_parquet, workdir):
    tracking = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    t = pq.read_table(digits_parquet).slice(0, 32)
    raw = t.column("image").combine_chunks().flatten().to_numpy().reshape(32, 64)   # uint8, as trained
    ref, blob = load_model_bytes("models:/digits@production", tracking)
    ours = model_from_checkpoint(load_checkpoint(blob)).embed(torch.from_numpy(raw)).mean.numpy()
    with using_tracking(tracking):
        pyfunc = mlflow.pyfunc.load_model(f"models:/digits/{ref.version}")
    assert pyfunc.metadata.signature is not None            # logged with an input/output signature
    np.testing.assert_allclose(pyfunc.predict(raw), ours, rtol=1e-5, atol=1e-6)


def test_model_carries_its_preprocessing(trained_digits, workdir):
    tracking = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    _, blob = load_model_bytes("models:/digits@production", tracking)
    cfg = load_checkpoint(blob)["config"]
    # uint8 pixels are scaled to [0, 1] (by their own range) by the model itself, so encode applies
    # what training saw; the default recipe's calibrated Gaussian keeps its σ in the weights
    assert cfg["preprocessing"]["features"] == ["image"] and cfg["preprocessing"]["scaling"] == "range"
    assert cfg["likelihood"] == "gaussian" and cfg["calibrated"] and cfg["linear_path"]
    assert cfg["arch"] == "conv" and cfg["input_shape"] == [1, 8, 8]
    assert "log_sigma" in load_checkpoint(blob)["model"]


def test_jobs_do_not_leak_their_tracking_uri_into_the_environment(trained_digits):
    # mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI; a leak would send the next job's runs
    # to this job's store instead of its own work folder
    assert "MLFLOW_TRACKING_URI" not in os.environ
