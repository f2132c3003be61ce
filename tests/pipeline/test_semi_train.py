"""`train --labels` and `encode --predict` on the real stack (local Ray Train, MLflow store, Ray Data
/ local encode): a few labels among many nulls train the semi-supervised VAE, the registered model
carries its class list, and encode writes `pred` and `pred_prob` beside μ in the same pass."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.encode import EncodeConfig, run_encode
from pipeline.errors import ConfigError, InputError, SchemaError
from pipeline.labels import label_indices, read_classes
from pipeline.registry import load_model_bytes
from pipeline.train import TrainConfig, run_train
from pipeline.uris import resolve
from vae.checkpoint import load_checkpoint, model_from_checkpoint
from vae.semi import SemiVAE

from committed_io import committed, manifest

TINY = dict(features=["image"], latent_dim=8, hidden=[8, 16], batch_size=128, workers=1, seed=0)


def _tracking(workdir: str) -> str:
    return f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"


@pytest.fixture(scope="module")
def few_labels(digits_parquet, tmp_path_factory):
    """The 8×8 digits with a `y` column holding the label of 10 records per class, null elsewhere
    (100 of 1,797 labelled), in 2 files."""
    t = pq.read_table(digits_parquet).sort_by("id")
    label = t.column("label").to_numpy()
    keep = np.zeros(len(label), bool)
    rng = np.random.default_rng(0)
    for c in range(10):
        keep[rng.choice(np.flatnonzero(label == c), 10, replace=False)] = True
    y = pa.array(np.where(keep, label, 0), pa.int64(), mask=~keep)
    t = t.append_column("y", y)
    folder = tmp_path_factory.mktemp("few-labels")
    pq.write_table(t.slice(0, 900), folder / "part-0.parquet")
    pq.write_table(t.slice(900), folder / "part-1.parquet")
    return str(folder)


@pytest.fixture(scope="module")
def semi_model(ray_local, few_labels, workdir):
    return run_train(TrainConfig(input=few_labels, labels="y", epochs=25, lr=5e-3, model_name="semi",
                                 workdir=workdir, **TINY))


def test_train_labels_registers_a_model_with_its_class_list(semi_model, workdir, capsys):
    ref, blob = load_model_bytes("models:/semi@production", _tracking(workdir))
    model = model_from_checkpoint(load_checkpoint(blob))
    assert isinstance(model, SemiVAE) and model.classes == tuple(range(10))
    assert all(type(c) is int for c in model.classes)
    assert np.isfinite(semi_model.metrics["val_neg_elbo"])


def test_encode_predict_writes_the_class_and_its_probabilities_beside_mu(semi_model, few_labels, workdir, tmp_path):
    out = str(tmp_path / "pred")
    run_encode(EncodeConfig(model="models:/semi@production", input=few_labels, output=out, keep=["id", "label"],
                            predict=True, score=True, workdir=workdir))
    t = committed(out).sort_by("id")
    assert t.num_rows == 1797
    assert t.schema.field("pred").type == pa.int64()
    assert t.schema.field("pred_prob").type == pa.list_(pa.float32(), 10)      # fixed_size_list<float32>[10]
    assert t.schema.field("mu").type == pa.list_(pa.float32(), 8)
    prob = np.asarray(t.column("pred_prob").combine_chunks().flatten()).reshape(-1, 10)
    pred = t.column("pred").to_numpy()
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-5)
    assert (pred == prob.argmax(1)).all()                    # classes 0..9: the index is the class
    acc = (pred == t.column("label").to_numpy()).mean()
    assert acc > 0.5, acc                                    # 100 labels, 1,697 unlabelled; chance is 0.1
    assert json.loads(committed(out).schema.metadata[b"vaepipe.classes"]) == list(range(10))   # every file says it
    assert manifest(out)["rows"] == 1797 and json.loads(manifest(out)["vaepipe.classes"]) == list(range(10))
    # as outside readers see it: DuckDB's SQL on the folder (pred_prob as FLOAT[], its argmax is pred)
    # and Polars' scan of the same folder
    import duckdb
    import polars as pl

    n_bad, n = duckdb.connect().execute(
        f"SELECT count(*) FILTER (WHERE list_position(pred_prob, list_max(pred_prob)) - 1 != pred), count(*) "
        f"FROM read_parquet('{out}/*.parquet')").fetchone()
    assert (n_bad, n) == (0, 1797)
    df = pl.scan_parquet(out).select("id", "pred", "pred_prob").collect().sort("id")
    assert df["pred"].to_list() == pred.tolist() and df["pred_prob"].dtype == pl.Array(pl.Float32, 10)


def test_predict_needs_a_model_trained_with_labels(trained_digits, digits_parquet, workdir, tmp_path):
    with pytest.raises(ConfigError, match="train --labels"):
        run_encode(EncodeConfig(model="models:/digits@production", input=digits_parquet, output=str(tmp_path / "o"),
                                predict=True, workdir=workdir))


def test_bad_label_columns_are_named(few_labels, digits_parquet, workdir, tmp_path):
    with pytest.raises(SchemaError, match="'nope' not found"):
        run_train(TrainConfig(input=few_labels, labels="nope", workdir=workdir, **TINY))
    t = pq.read_table(digits_parquet)
    pq.write_table(t.append_column("f", pa.array(np.zeros(t.num_rows))), tmp_path / "f.parquet")
    with pytest.raises(SchemaError, match="'f' has type double; expected integers or strings"):
        run_train(TrainConfig(input=str(tmp_path / "f.parquet"), labels="f", workdir=workdir, **TINY))
    pq.write_table(t.append_column("one", pa.array([None] * (t.num_rows - 1) + [3], pa.int64())),
                   tmp_path / "one.parquet")
    with pytest.raises(InputError, match="at least 2 classes"):
        run_train(TrainConfig(input=str(tmp_path / "one.parquet"), labels="one", workdir=workdir, **TINY))
    with pytest.raises(ConfigError, match="needs the cache"):
        TrainConfig(input=few_labels, labels="y", cache="off", **TINY)


def test_string_labels_keep_their_values_and_nulls_are_unlabelled(tmp_path):
    t = pa.table({"y": pa.array(["cat", None, "dog", "cat", None, "eel"])})
    pq.write_table(t.slice(0, 3), tmp_path / "a.parquet")
    pq.write_table(t.slice(3), tmp_path / "b.parquet")
    loc = resolve(str(tmp_path))
    classes, labelled = read_classes(loc, [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], "y", "t")
    assert classes == ("cat", "dog", "eel") and labelled == 4
    assert label_indices(t, "y", classes).tolist() == [0, -1, 1, 0, -1, 2]
