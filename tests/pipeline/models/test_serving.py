"""The registered model's interface, as MLflow serves it: a real `mlflow models serve --env-manager
local` on 127.0.0.1 takes records with named columns in any order (split and records JSON) and returns
the same μ as the model; a missing column is a 4xx naming it. The served model is trained with
`--labels`, so each record also comes back with `pred` and one `pred_prob_<class>` per class, the
figures `encode --predict` writes for the same records. The pyfunc also takes the image dtype training
read (uint8), and the signature says all of it."""
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

from pipeline.models.registry import load_model_bytes, using_tracking
from vae.checkpoint import load_checkpoint, model_from_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def cancer(ray_local, tmp_path_factory):
    """scikit-learn's breast-cancer table (569 × 30 float64 columns + id) and a tiny semi-supervised
    MLP VAE trained on it for 1 epoch and 1 head epoch, with a `diagnosis` label ("benign" /
    "malignant") on 20 rows of each class, registered as `cancer@production`. Returns (frame of the id
    and feature columns, tracking URI, version, data folder, work folder)."""
    from sklearn.datasets import load_breast_cancer

    from pipeline.training.train import TrainConfig, run_train

    d = load_breast_cancer(as_frame=True)
    df = d.data.copy()
    df.insert(0, "id", np.arange(len(df), dtype=np.int64))
    names = np.where(d.target == 0, "malignant", "benign")
    labelled = np.zeros(len(df), bool)
    for c in ("benign", "malignant"):
        labelled[np.flatnonzero(names == c)[:20]] = True
    data = tmp_path_factory.mktemp("cancer")
    t = pa.Table.from_pandas(df, preserve_index=False).append_column("diagnosis", pa.array(names, mask=~labelled))
    pq.write_table(t, str(data / "part-0.parquet"))
    work = str(tmp_path_factory.mktemp("cancer-work"))
    r = run_train(TrainConfig(input=str(data), features=list(d.data.columns), labels="diagnosis", epochs=1,
                              head_epochs=1, workers=1, latent_dim=3, hidden=[16], batch_size=128,
                              model_name="cancer", workdir=work))
    return df, f"sqlite:///{os.path.join(work, 'mlflow.db')}", r.version, str(data), work


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
    tracking = cancer[1]
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
    df, tracking = cancer[:2]
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
            got = np.asarray([r["mu"] for r in json.loads(text)["predictions"]], np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_served_semi_model_predicts_what_encode_predict_writes(cancer, served, tmp_path):
    """Every record of the table through the server and through `encode --predict`: the same class
    and probabilities, one self-describing column per class, and μ unchanged beside them."""
    from committed_io import committed
    from pipeline.batch.encode import EncodeConfig, run_encode

    df, _, _, data, work = cancer
    out = str(tmp_path / "pred")
    run_encode(EncodeConfig(model="models:/cancer@production", input=data, output=out, keep=["id"], predict=True,
                            workdir=work))
    enc = committed(out).sort_by("id")
    assert enc.column("id").to_pylist() == df["id"].tolist()
    feats = [c for c in df.columns if c != "id"]
    status, text = _post(served + "/invocations",
                         {"dataframe_split": {"columns": feats, "data": df[feats].to_numpy().tolist()}})
    assert status == 200, text
    got = json.loads(text)["predictions"]
    classes = ["benign", "malignant"]                                        # sorted, as train stores them
    assert [list(r) for r in got[:1]] == [["mu", "pred", "pred_prob_benign", "pred_prob_malignant"]]
    assert [r["pred"] for r in got] == enc.column("pred").to_pylist()
    prob = np.asarray([[r[f"pred_prob_{c}"] for c in classes] for r in got], np.float32)
    np.testing.assert_allclose(prob, np.stack(enc.column("pred_prob").to_numpy(zero_copy_only=False)), atol=1e-6)
    mu = np.asarray([r["mu"] for r in got], np.float32)
    np.testing.assert_allclose(mu, np.stack(enc.column("mu").to_numpy(zero_copy_only=False)), rtol=1e-5, atol=1e-6)


def test_served_model_names_a_missing_column(cancer, served):
    df = cancer[0]
    cols = [c for c in df.columns if c not in ("id", "mean texture")]
    status, text = _post(served + "/invocations",
                         {"dataframe_split": {"columns": cols, "data": df[cols].iloc[:3].to_numpy().tolist()}})
    assert 400 <= status < 500 and "mean texture" in text, (status, text)


def test_signature_names_the_columns_and_their_types(cancer):
    df, tracking, version = cancer[:3]
    with using_tracking(tracking):
        sig = mlflow.models.get_model_info(f"models:/cancer/{version}").signature
    inputs = sig.inputs.to_dict()
    assert [c["name"] for c in inputs] == [c for c in df.columns if c != "id"]
    assert {c["type"] for c in inputs} == {"double"}
    out = sig.outputs.to_dict()                                  # a model trained with --labels
    assert [(c["name"], c["type"]) for c in out] == [("mu", "array"), ("pred", "string"),
                                                     ("pred_prob_benign", "float"), ("pred_prob_malignant", "float")]
    assert out[0]["items"] == {"type": "float"}


def test_pyfunc_by_name_in_process(cancer):
    df, tracking, version = cancer[:3]
    feats = [c for c in df.columns if c != "id"]
    with using_tracking(tracking):
        model = mlflow.pyfunc.load_model(f"models:/cancer/{version}")
    want = _mu(tracking, df[feats].iloc[:8].to_numpy(np.float32))
    np.testing.assert_allclose(np.stack(model.predict(df[feats[::-1]].iloc[:8])["mu"]), want, rtol=1e-5, atol=1e-6)
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
    want = model_from_checkpoint(load_checkpoint(blob)).embed(torch.from_numpy(raw.copy())).mean.numpy()
    with using_tracking(tracking):
        model = mlflow.pyfunc.load_model(f"models:/digits/{ref.version}")
    spec = model.metadata.signature.inputs.to_dict()[0]
    assert spec["name"] == "image" and spec["tensor-spec"]["dtype"] == "uint8" and list(spec["tensor-spec"]["shape"]) == [-1, 64]
    out = model.metadata.signature.outputs.to_dict()[0]["tensor-spec"]      # no labels: μ alone, as before
    assert out["dtype"] == "float32" and list(out["shape"]) == [-1, want.shape[1]]
    np.testing.assert_allclose(model.predict(raw), want, rtol=1e-5, atol=1e-6)
    # the same records as a column of vectors (what a JSON request carries)
    frame = pd.DataFrame({"image": [r.tolist() for r in raw]})
    np.testing.assert_allclose(model.predict(frame), want, rtol=1e-5, atol=1e-6)
