"""The registered model's interface, as MLflow serves it: a real `mlflow models serve --env-manager
local` on 127.0.0.1 takes records with named columns in any order (split and records JSON) and returns
the same μ as the model; a missing column is a 4xx naming it. The pyfunc also takes the image dtype
training read (uint8), and the signature says both."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.registry import load_model_bytes, using_tracking
from vae.checkpoint import load_checkpoint, model_from_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cancer(ray_local, tmp_path_factory):
    """scikit-learn's breast-cancer table (569 × 30 float64 columns + id) and a tiny MLP VAE trained on
    it for 1 epoch, registered as `cancer@production`. Returns (frame, tracking URI, version)."""
    from sklearn.datasets import load_breast_cancer

    from pipeline.train import TrainConfig, run_train

    d = load_breast_cancer(as_frame=True)
    df = d.data.copy()
    df.insert(0, "id", np.arange(len(df), dtype=np.int64))
    data = tmp_path_factory.mktemp("cancer")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), str(data / "part-0.parquet"))
    work = str(tmp_path_factory.mktemp("cancer-work"))
    r = run_train(TrainConfig(input=str(data), features=list(d.data.columns), epochs=1, workers=1, latent_dim=3,
                              hidden=[16], batch_size=128, model_name="cancer", workdir=work))
    return df, f"sqlite:///{os.path.join(work, 'mlflow.db')}", r.version


def _mu(tracking: str, x: np.ndarray) -> np.ndarray:
    _, blob = load_model_bytes("models:/cancer@production", tracking)
    return model_from_checkpoint(load_checkpoint(blob)).embed(torch.from_numpy(x.copy())).mean.numpy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def served(cancer, tmp_path_factory):
    """`mlflow models serve` of cancer@production in its own process group; yields its base URL."""
    _, tracking, _ = cancer
    port = _free_port()
    bindir = os.path.dirname(sys.executable)           # the venv: mlflow runs `uvicorn` from PATH
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking, PYTHONPATH=REPO, PATH=bindir + os.pathsep + os.environ["PATH"])
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    proc = subprocess.Popen([os.path.join(bindir, "mlflow"), "models", "serve",
                             "-m", "models:/cancer@production", "--env-manager", "local", "-h", "127.0.0.1",
                             "-p", str(port), "-w", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"mlflow models serve did not come up (rc={proc.poll()}):\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        log.close()


def test_served_model_matches_columns_by_name(cancer, served):
    df, tracking, _ = cancer
    feats = [c for c in df.columns if c != "id"]
    rows = df.iloc[:20]
    want = _mu(tracking, rows[feats].to_numpy(np.float32))
    rng = np.random.default_rng(0)
    shuffled = ["id"] + list(rng.permutation(feats))          # another order, plus a column it ignores
    assert shuffled[1:] != feats
    for cols in (feats, shuffled):
        part = rows[cols]
        split = {"dataframe_split": {"columns": cols, "data": part.to_numpy().tolist()}}
        records = {"dataframe_records": part.to_dict(orient="records")}
        for body in (split, records):
            status, text = _post(served + "/invocations", body)
            assert status == 200, text
            got = np.asarray(json.loads(text)["predictions"], np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_served_model_names_a_missing_column(cancer, served):
    df, _, _ = cancer
    cols = [c for c in df.columns if c not in ("id", "mean texture")]
    status, text = _post(served + "/invocations",
                         {"dataframe_split": {"columns": cols, "data": df[cols].iloc[:3].to_numpy().tolist()}})
    assert 400 <= status < 500 and "mean texture" in text, (status, text)


def test_signature_names_the_columns_and_their_types(cancer):
    df, tracking, version = cancer
    with using_tracking(tracking):
        sig = mlflow.models.get_model_info(f"models:/cancer/{version}").signature
    inputs = sig.inputs.to_dict()
    assert [c["name"] for c in inputs] == [c for c in df.columns if c != "id"]
    assert {c["type"] for c in inputs} == {"double"}
    out = sig.outputs.to_dict()[0]["tensor-spec"]
    assert out["dtype"] == "float32" and list(out["shape"]) == [-1, 3]


def test_pyfunc_by_name_in_process(cancer):
    df, tracking, version = cancer
    feats = [c for c in df.columns if c != "id"]
    with using_tracking(tracking):
        model = mlflow.pyfunc.load_model(f"models:/cancer/{version}")
    want = _mu(tracking, df[feats].iloc[:8].to_numpy(np.float32))
    np.testing.assert_allclose(model.predict(df[feats[::-1]].iloc[:8]), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="mean radius"):
        model.predict(df[feats[1:]].iloc[:8])
    # the model's own check, without MLflow's schema enforcement in front of it
    with pytest.raises(Exception, match="mean radius"):
        model.unwrap_python_model().predict(None, df[feats[1:]].iloc[:8])


def test_pyfunc_takes_uint8_images(trained_digits, digits_parquet, workdir):
    tracking = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    t = pq.read_table(digits_parquet).slice(0, 16)
    raw = t.column("image").combine_chunks().flatten().to_numpy().reshape(16, 64)
    assert raw.dtype == np.uint8
    ref, blob = load_model_bytes("models:/digits@production", tracking)
    want = model_from_checkpoint(load_checkpoint(blob)).embed(torch.from_numpy(raw)).mean.numpy()
    with using_tracking(tracking):
        model = mlflow.pyfunc.load_model(f"models:/digits/{ref.version}")
    spec = model.metadata.signature.inputs.to_dict()[0]
    assert spec["name"] == "image" and spec["tensor-spec"]["dtype"] == "uint8" and list(spec["tensor-spec"]["shape"]) == [-1, 64]
    np.testing.assert_allclose(model.predict(raw), want, rtol=1e-5, atol=1e-6)
    # the same records as a column of vectors (what a JSON request carries)
    frame = pd.DataFrame({"image": [r.tolist() for r in raw]})
    np.testing.assert_allclose(model.predict(frame), want, rtol=1e-5, atol=1e-6)
