"""Train → register → encode against a real `mlflow server` over HTTP (SQLite backend, proxied artifact
store), as the jobs do on a cluster with --tracking-uri http://…: the version and its alias live on the
server, the artifacts go through it, and the encode output records the version it used."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from pipeline.table.parquet_io import read_manifest
from pipeline.table.uris import resolve

pytestmark = pytest.mark.slow


def test_train_register_encode_through_tracking_server(mlflow_server, http_trained, digits_parquet, tmp_path):
    from mlflow import MlflowClient

    from pipeline.batch.encode import EncodeConfig, run_encode

    url = mlflow_server.url
    r, work = http_trained   # trained through the server (tests/jobs/conftest.py)
    assert r.model_uri == f"models:/digits-http/{r.version}" and r.promoted

    # the server holds the version, READY, from this run, with the alias on it
    c = MlflowClient(tracking_uri=url, registry_uri=url)
    mv = c.get_model_version("digits-http", r.version)
    assert mv.status == "READY" and mv.run_id == r.run_id
    assert c.get_model_version_by_alias("digits-http", "production").version == r.version
    assert c.get_registered_model("digits-http").aliases == {"production": r.version}
    run = c.get_run(r.run_id)
    assert run.info.status == "FINISHED" and "val_elbo" in run.data.metrics
    # artifacts went through the server into its --artifacts-destination; nothing fell back to a local store
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = [os.path.join(d, f) for d, _, fs in os.walk(mlflow_server.root / "artifacts") for f in fs]
    assert stored, "no artifact reached the server's artifact store"
    assert not (work / "mlflow.db").exists()

    out = tmp_path / "latents"
    e = run_encode(EncodeConfig(model="models:/digits-http@production", input=digits_parquet, output=str(out),
                                tracking_uri=url, workdir=str(work)))
    assert (e.rows_in, e.rows_out, e.skipped) == (1797, 1797, 0)
    assert (e.model_uri, e.model_version) == (f"models:/digits-http/{r.version}", r.version)
    manifest = read_manifest(resolve(str(out)))
    assert json.dumps(manifest).count(f"models:/digits-http/{r.version}") >= 1
    t = pq.read_table(str(out), partitioning=None)
    assert t.num_rows == 1797 and len(set(t.column("id").to_pylist())) == 1797
    md = t.schema.metadata or {}
    assert md.get(b"vaepipe.model_version") == r.version.encode()
    assert md.get(b"vaepipe.model_requested") == b"models:/digits-http@production"
