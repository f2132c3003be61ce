"""`train --labels` and `encode --predict` on the real stack (local Ray Train, MLflow store, Ray Data
/ local encode): a few labels among many nulls train the semi-supervised VAE, the head-only epochs
after the VAE's train M2 alone (journalled, logged, resumable), every labelled record stays out of the
validation split, the registered model carries its class list, and encode writes `pred` and
`pred_prob` beside μ in the same pass."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch.encode import EncodeConfig, run_encode
from pipeline.runtime.errors import ConfigError, InputError, SchemaError
from pipeline.table.labels import label_indices, read_classes
from pipeline.models.registry import client, load_model_bytes
from pipeline.training.run_store import RunStore
from pipeline.training.train import TrainConfig, build_datasets, prepare_data, run_train, training_datasets
from pipeline.table.uris import resolve
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


VAE_EPOCHS, HEAD_EPOCHS = 25, 20


@pytest.fixture(scope="module")
def semi_model(ray_local, few_labels, workdir):
    # a checkpoint every epoch, all kept, so the tests can look at the last VAE epoch's and the first
    # head epoch's as well as the final one
    return run_train(TrainConfig(input=few_labels, labels="y", epochs=VAE_EPOCHS, head_epochs=HEAD_EPOCHS, lr=5e-3,
                                 keep_checkpoints=VAE_EPOCHS + HEAD_EPOCHS, checkpoint_interval_s=0,
                                 model_name="semi", workdir=workdir, **TINY))


def _accuracy(model, few_labels) -> float:
    """argmax q(y|μ) against the true digit, over all 1,797 records (1,697 of them unlabelled in training)."""
    import torch

    t = pq.read_table(few_labels)
    raw = t.column("image").combine_chunks().flatten().to_numpy().reshape(t.num_rows, 64)
    pred = model.predict_proba(torch.from_numpy(raw.copy())).argmax(-1).numpy()
    return float((pred == t.column("label").to_numpy()).mean())


def test_head_epochs_train_the_head_alone_after_the_vae_epochs(semi_model, few_labels, workdir):
    assert semi_model.epochs_run == VAE_EPOCHS + HEAD_EPOCHS
    store = RunStore(semi_model.run_dir)
    # journalled like the VAE's epochs, numbered on from them, each once
    assert [(e["epoch"], e["phase"]) for e in store.journal()] == \
        [(i, "vae") for i in range(VAE_EPOCHS)] + [(VAE_EPOCHS + h, "head") for h in range(HEAD_EPOCHS)]
    # MLflow: the head's figures at the head epochs' steps; the VAE's curves stop where the VAE did
    c = client(_tracking(workdir))
    steps = lambda key: [m.step for m in c.get_metric_history(semi_model.run_id, key)]
    assert steps("head_train_acc") == steps("head_loss") == list(range(VAE_EPOCHS, VAE_EPOCHS + HEAD_EPOCHS))
    assert steps("train_neg_elbo") == list(range(VAE_EPOCHS))
    # the nets were checked before the head trained (on every worker alike); MLflow has it after the last epoch
    assert semi_model.metrics["nets_kept"] in (0.0, 1.0) and steps("nets_kept") == [VAE_EPOCHS + HEAD_EPOCHS]
    history = lambda key: [m.value for m in c.get_metric_history(semi_model.run_id, key)]
    assert history("head_loss")[-1] < history("head_loss")[0], history("head_loss")
    # labelled records: the pPCA-started VAE often gives the head all of them right from its first epoch
    assert history("head_train_acc")[-1] >= history("head_train_acc")[0], history("head_train_acc")
    # the VAE was frozen: only M2's weights moved after the last VAE epoch
    # (from the first head epoch on: the head starts from the VAE epoch the run keeps, which need not be the last)
    last_vae = store.load(store.checkpoints()[VAE_EPOCHS - 1])
    first_head = store.load(store.checkpoints()[VAE_EPOCHS])
    final = load_checkpoint(semi_model.checkpoint)
    assert final["extra"]["phase"] == "head" and final["extra"]["head_done"] == HEAD_EPOCHS
    for name, w in final["model"].items():
        if name.startswith("round_trip_") or name == "metric_factor":   # the map and the latent metric: fitted by
            continue                                                    # the driver after training
        same = bool((w == first_head["model"][name]).all())
        assert same != name.startswith("m2."), name
    # and the head got better at the task than the jointly trained one it started from
    before, after = _accuracy(model_from_checkpoint(last_vae), few_labels), _accuracy(model_from_checkpoint(final),
                                                                                      few_labels)
    assert after > before, (before, after)
    assert np.isfinite(semi_model.metrics["val_neg_elbo"])            # the kept VAE epoch's figures travel on
    assert "pseudo_labelled" not in semi_model.metrics                   # --pseudo-labels is off by default


def test_a_restarted_or_resumed_run_does_not_redo_finished_epochs(ray_local, few_labels, tmp_path):
    work = str(tmp_path)
    kw = dict(input=few_labels, labels="y", epochs=2, run_name="semi-r", model_name="semi_r", workdir=work,
              pseudo_labels=0.6,                         # each worker spreads over its shard, after a restart too
              **{**TINY, "workers": 2})                  # DDP: the head-only epochs average M2's gradients themselves
    # rank 1 exits at the start of the second head epoch; Ray restarts the group from epoch 2's checkpoint
    r = run_train(TrainConfig(head_epochs=3, max_failures=1, fail_at_epoch=3, fail_rank=1, **kw))
    assert os.path.exists(os.path.join(r.run_dir, ".fault_injected"))
    journal = RunStore(r.run_dir).journal()
    phases = lambda: [(e["epoch"], e["phase"]) for e in RunStore(r.run_dir).journal()]
    assert phases() == [(0, "vae"), (1, "vae"), (2, "head"), (3, "head"), (4, "head")]
    assert {e["world_size"] for e in journal} == {2}
    # before the head: label spreading over μ pseudo-labelled the surest 60 % of each class's share, counted
    # over both workers' shards (about 10 % of the unlabelled records went to validation)
    unlabelled = 1797 - 100 - round(0.1 * 1697)
    assert 0.4 * unlabelled < r.metrics["pseudo_labelled"] <= 0.61 * unlabelled, r.metrics
    assert 0.4 < r.metrics["pseudo_labelled_share"] <= 0.61
    # --resume with more head epochs: only the missing head epochs run, the VAE's are not redone
    again = run_train(TrainConfig(head_epochs=5, resume=True, **kw))
    assert phases()[5:] == [(5, "head"), (6, "head")] and again.epochs_run == 7


def test_labelled_records_all_stay_in_the_training_split(ray_local, few_labels, workdir):
    """Validation uses no labels: the content-hash split holds out unlabelled records only, so all
    100 labels train (before, about val_fraction of them were lost to validation)."""
    cfg = TrainConfig(input=few_labels, labels="y", val_fraction=0.5, workdir=workdir, **TINY)
    tr, va = (pa.concat_tables(ray_local.get(ds.to_arrow_refs())) for ds in build_datasets(prepare_data(cfg), cfg))
    assert tr.column("y").null_count == tr.num_rows - 100 and va.column("y").null_count == va.num_rows
    assert tr.num_rows + va.num_rows == 1797 and 700 < va.num_rows < 900     # about half of the 1,697 unlabelled
    assert sorted(tr.column("id").to_pylist() + va.column("id").to_pylist()) == list(range(1797))


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


def test_every_record_labelled_still_validates(ray_local, digits_parquet, tmp_path, capsys):
    """With no unlabelled record to hold out, the split falls back to all records: validation is
    never silently empty (an empty one reads as a -ELBO of 0). The datasets run_train hands to Ray
    Train, read back (a whole run for this cost ~30 CPU-seconds of Ray Train start-up)."""
    cfg = TrainConfig(input=digits_parquet, labels="label", epochs=1, head_epochs=1, workdir=str(tmp_path), **TINY)
    tr, va, cache = training_datasets(prepare_data(cfg), cfg)
    tr, va = (pa.concat_tables(ray_local.get(ds.to_arrow_refs())) for ds in (tr, va))
    assert cache and "no unlabelled record fell in the --val-fraction split" in capsys.readouterr().out
    assert va.num_rows > 0 and tr.num_rows + va.num_rows == 1797                # a split of all the records
    assert va.column("label").null_count == 0                                   # labelled ones included
    assert not set(tr.column("id").to_pylist()) & set(va.column("id").to_pylist())


def test_carve_validation_splits_the_training_records_only(digits_parquet, tmp_path):
    """The validation split settings are chosen on (docs/quality.md): disjoint, seeded, sizes as asked."""
    from pipeline.evaluation.datasets import carve_validation

    tr, va = carve_validation(digits_parquet, str(tmp_path / "a"), n_val=300)
    t, v = pq.read_table(tr), pq.read_table(va)
    assert (t.num_rows, v.num_rows) == (1497, 300)
    rows = lambda tab: {bytes(r) for r in tab.column("image").to_pylist()}
    assert not rows(t) & rows(v) and len(rows(t) | rows(v)) == len(rows(pq.read_table(digits_parquet)))
    again = carve_validation(digits_parquet, str(tmp_path / "b"), n_val=300)[1]
    assert pq.read_table(again).equals(v)
