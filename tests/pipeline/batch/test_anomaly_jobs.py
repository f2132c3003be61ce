"""Anomaly scores as batch jobs (`encode/nightly --score-kind`, `--score-models`): the registered
model carries its latent reference, the job writes the protocol's score, and outside readers see it."""
from __future__ import annotations

import json
import os
import shutil

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.models import registry
from pipeline.batch.encode import EncodeConfig, run_encode
from pipeline.runtime.errors import ConfigError
from pipeline.batch.nightly import NightlyConfig, read_state, run_nightly
from pipeline.table.uris import resolve
from vae.anomaly import LatentReference, anomaly_score
from vae.checkpoint import (checkpoint_bytes, load_checkpoint, model_from_checkpoint, reference_from_checkpoint,
                            with_reference)

from committed_io import manifest

MODEL = "models:/digits@production"


def _records(digits_parquet) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(digits_parquet).sort_by("id")
    x = t.column("image").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
    return t.column("id").to_numpy(), x.copy()   # writable: torch.from_numpy warns on Arrow's read-only buffers


def _expected(checkpoint: bytes | str, x: np.ndarray, kind: str) -> np.ndarray:
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state)
    return anomaly_score(model, torch.from_numpy(x), kind, reference_from_checkpoint(state)).numpy()


def _register(workdir: str, name: str, state: dict, reference: LatentReference | None) -> str:
    """Log and register a checkpoint the way train does (pyfunc + checkpoint artifact); returns its URI."""
    tracking = f"sqlite:///{os.path.abspath(os.path.join(workdir, 'mlflow.db'))}"
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    path = os.path.join(workdir, name, "checkpoint.pt")   # the artifact's file name vaepipe looks up
    with open(path, "wb") as f:
        f.write(with_reference(state, reference) if reference is not None else checkpoint_bytes(model_from_checkpoint(state)))
    c = registry.client(tracking)
    run = c.create_run(registry.experiment_id(tracking, "anomaly-tests"), run_name=name)
    cfg = model_from_checkpoint(state).config
    uri = registry.log_model(run.info.run_id, path, cfg.input_dim, cfg.latent_dim, tracking)
    return f"models:/{name}/{registry.register(uri, name, tracking, run.info.run_id).version}"


def test_train_registers_the_models_latent_reference(trained_digits, digits_parquet):
    # the fixture's input holds 1,797 records, under --sample-rows: every one is in the reference
    state = load_checkpoint(trained_digits.checkpoint)
    ref = reference_from_checkpoint(state)
    assert ref is not None and tuple(ref.mu.shape) == (1797, 4) and ref.k == 5
    _, x = _records(digits_parquet)
    want = LatentReference.fit(model_from_checkpoint(state), torch.from_numpy(x))
    assert sorted(map(tuple, ref.mu.numpy().round(4).tolist())) == sorted(map(tuple, want.mu.numpy().round(4).tolist()))


@pytest.mark.parametrize("kind", ["knn_z", "sq_err+knn_z"])
def test_encode_writes_the_chosen_score_and_outside_readers_see_it(trained_digits, digits_parquet, workdir, tmp_path,
                                                                    kind):
    out = str(tmp_path / "scored")
    run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=out, score_kind=kind, executor="local",
                            batch_size=500, workdir=workdir))
    ids, x = _records(digits_parquet)
    want = _expected(trained_digits.checkpoint, x, kind)
    files = [os.path.join(out, e["path"]) for e in manifest(out)["files"]]
    got = duckdb.execute("SELECT id, score FROM read_parquet($f) ORDER BY id", {"f": files}).fetchnumpy()
    assert np.array_equal(got["id"], ids)
    np.testing.assert_allclose(got["score"], want, rtol=1e-5, atol=1e-4)
    top = pl.read_parquet(files).sort("score", descending=True).head(10)["id"].to_list()   # the ten most unusual
    assert top == ids[np.argsort(-want, kind="stable")][:10].tolist()
    meta = pq.read_schema(files[0]).metadata
    assert meta[b"vaepipe.score_kind"].decode() == kind
    assert json.loads(meta[b"vaepipe.score_models"]) == [meta[b"vaepipe.model_uri"].decode()]


def test_an_ensemble_score_is_the_mean_of_its_members_on_ray(trained_digits, digits_parquet, workdir, tmp_path):
    """A second member (perturbed weights, its own reference) registered beside digits; the Ray
    actors receive both and write the mean of the two models' knn_z, with μ from --model alone."""
    state = load_checkpoint(trained_digits.checkpoint)
    model = model_from_checkpoint(state)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    _, x = _records(digits_parquet)
    b_state = load_checkpoint(checkpoint_bytes(model))
    b_uri = _register(workdir, "digits_b", b_state, LatentReference.fit(model, torch.from_numpy(x)))
    out, alone = str(tmp_path / "ensemble"), str(tmp_path / "alone")
    run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=out, score_kind="knn_z", score_models=[b_uri],
                            executor="ray", concurrency=1, workdir=workdir))
    run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=alone, executor="local", workdir=workdir))
    files = [os.path.join(out, e["path"]) for e in manifest(out)["files"]]
    t = pl.read_parquet(files).sort("id")
    b_bytes = with_reference(b_state, LatentReference.fit(model, torch.from_numpy(x)))
    want = (_expected(trained_digits.checkpoint, x, "knn_z") + _expected(b_bytes, x, "knn_z")) / 2
    np.testing.assert_allclose(t["score"].to_numpy(), want, rtol=1e-5, atol=1e-4)
    assert t["mu"].to_list() == pl.read_parquet(alone).sort("id")["mu"].to_list()
    meta = pq.read_schema(files[0]).metadata
    assert json.loads(meta[b"vaepipe.score_models"])[1].startswith("models:/digits_b/")


def test_a_knn_score_from_a_model_without_a_reference_fails_before_any_work(trained_digits, digits_parquet, workdir,
                                                                              tmp_path):
    uri = _register(workdir, "digits_noref", load_checkpoint(trained_digits.checkpoint), None)
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"--score-kind knn_z: model 'models:/digits_noref/1' .* has no latent "
                                          r"reference .* use --score-kind neg_elbo or sq_err"):
        run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=str(out), score_kind="knn_z",
                                score_models=[uri], workdir=workdir))
    assert not out.exists() or not any(p.suffix == ".parquet" for p in out.rglob("*"))
    # sq_err needs no reference: the same pair of models scores
    run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=str(out), score_kind="sq_err",
                            score_models=[uri], executor="local", workdir=workdir))
    assert pq.read_table(str(out)).column("score").null_count == 0


def test_nightly_encodes_again_when_the_score_changes(trained_digits, digits_parquet, workdir, tmp_path):
    src, out = tmp_path / "in", str(tmp_path / "out")
    files = sorted(p for p in os.listdir(digits_parquet) if p.endswith(".parquet"))[:2]
    for i, f in enumerate(files):
        (src / f"date=2026-12-0{i + 1}").mkdir(parents=True)
        shutil.copy(os.path.join(digits_parquet, f), src / f"date=2026-12-0{i + 1}" / f)
    plain = NightlyConfig(model=MODEL, input=str(src), output=out, executor="local", workdir=workdir)
    assert len(run_nightly(plain, log=lambda _: None)["encoded"]) == 2
    scored = NightlyConfig(model=MODEL, input=str(src), output=out, executor="local", score_kind="sq_err+knn_z",
                           workdir=workdir)
    r = run_nightly(scored, log=lambda _: None)
    assert len(r["encoded"]) == 2
    assert set(r["reasons"].values()) == {"score None → sq_err+knn_z"}
    assert read_state(resolve(out))["partitions"]["date=2026-12-01"]["columns"]["score"] == "sq_err+knn_z"
    assert run_nightly(scored, log=lambda _: None)["encoded"] == []      # the same settings: nothing to do
    t = pl.read_parquet(f"{out}/*/*.parquet", hive_partitioning=True)
    assert t.height == sum(pq.read_metadata(os.path.join(digits_parquet, f)).num_rows for f in files)
    assert t["score"].null_count() == 0
    import pyarrow.dataset as pads

    hive = pads.dataset(out, format="parquet", partitioning="hive").to_table()   # pyarrow's hive reader
    assert hive.num_rows == t.height and hive.column("score").null_count == 0
    assert sorted(set(hive.column("date").to_pylist())) == ["2026-12-01", "2026-12-02"]


def test_the_breast_cancer_protocol_through_the_jobs_scores_the_protocols_draws(trained_digits, workdir):
    """One draw, one model, one epoch: the jobs see the protocol's draw (the same IsolationForest
    AUC as `--what breast-cancer`), and the AUC is the registered model's knn_z of the scored half."""
    from sklearn.datasets import load_breast_cancer

    from pipeline.evaluation.eval_metrics import roc_auc
    from pipeline.measure.protocol_run import run_protocol, summary
    from pipeline.measure.protocols import ProtocolConfig, breast_cancer_draw

    cfg = dict(what="breast-cancer-jobs", draws=1, ensemble=1, epochs=1, workdir=workdir)
    r = run_protocol(ProtocolConfig(**cfg))
    inproc = run_protocol(ProtocolConfig(**{**cfg, "what": "breast-cancer", "iw_samples": 2}))
    assert r["draws"][0]["isolation_forest"] == pytest.approx(inproc["draws"][0]["isolation_forest"], abs=1e-12)
    x, target = load_breast_cancer(return_X_y=True)
    te = np.sort(breast_cancer_draw(target, 0)[1])
    state = load_checkpoint(registry.load_model_bytes(r["draws"][0]["models"][0],
                                                      ProtocolConfig(**cfg).resolved_tracking_uri())[1])
    score = anomaly_score(model_from_checkpoint(state), torch.from_numpy(x[te].astype(np.float32)), "knn_z",
                          reference_from_checkpoint(state)).numpy()
    assert r["draws"][0]["jobs"] == pytest.approx(roc_auc(score, (target[te] == 0).astype(int)), abs=1e-6)
    assert "minus isolation_forest" in summary(r) and r["score"] == "knn_z"


def test_plain_score_gets_the_protocols_choice_and_a_model_without_a_reference_gets_neg_elbo(
        trained_digits, digits_parquet, workdir, tmp_path, capsys):
    out = str(tmp_path / "auto")
    run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=out, score=True, executor="local",
                            workdir=workdir))
    files = [os.path.join(out, e["path"]) for e in manifest(out)["files"]]
    assert pq.read_schema(files[0]).metadata[b"vaepipe.score_kind"] == b"sq_err+knn_z"
    ids, x = _records(digits_parquet)
    got = duckdb.execute("SELECT score FROM read_parquet($f) ORDER BY id", {"f": files}).fetchnumpy()["score"]
    np.testing.assert_allclose(got, _expected(trained_digits.checkpoint, x, "sq_err+knn_z"), rtol=1e-5, atol=1e-4)
    uri = _register(workdir, "digits_noref_auto", load_checkpoint(trained_digits.checkpoint), None)
    out2 = str(tmp_path / "auto_noref")
    run_encode(EncodeConfig(model=uri, input=digits_parquet, output=out2, score=True, executor="local",
                            workdir=workdir))
    files = [os.path.join(out2, e["path"]) for e in manifest(out2)["files"]]
    assert pq.read_schema(files[0]).metadata[b"vaepipe.score_kind"] == b"neg_elbo"
    assert "no latent reference" in capsys.readouterr().err
