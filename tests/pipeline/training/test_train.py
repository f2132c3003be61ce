"""Production training: AMP bf16 on CPU, MLflow metrics/figures/signature/lineage, the
promotion rule, a second validation URI with streaming (cache=off), and 1-worker reproducibility."""
from __future__ import annotations

import json
import math
import os

import pytest

from pipeline.models.registry import client, current_alias_version
from pipeline.training.train import TrainConfig, run_train

TINY = dict(features=["image"], latent_dim=2, hidden=[8, 16], batch_size=256, seed=5, workers=1)


def _tracking(workdir: str) -> str:
    return f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"


def test_bf16_run_logs_everything_and_promotion_needs_a_better_val_elbo(ray_local, digits_parquet, workdir, capsys):
    tr = _tracking(workdir)
    c = client(tr)
    # 1. a good model, trained with CPU bf16 autocast: the first version takes `production`
    # --nets-min-gain -1: both models keep their nets (the check would send both back to the same pPCA start)
    good = run_train(TrainConfig(input=digits_parquet, epochs=4, lr=5e-3, amp="bf16", model_name="t3",
                                 nets_min_gain=-1, workdir=workdir, **TINY))
    assert good.promoted and current_alias_version("t3", "production", tr) == good.version
    run = c.get_run(good.run_id)
    for key in ("train_neg_elbo", "val_neg_elbo", "train_recon", "val_recon", "train_kl", "val_kl",
                "active_units", "samples_per_s", "epoch_time_s", "lr", "beta", "wall_time_s"):
        assert key in run.data.metrics, key
        assert math.isfinite(run.data.metrics[key])
    assert [m.step for m in c.get_metric_history(good.run_id, "val_neg_elbo")] == [0, 1, 2, 3]
    assert run.data.params["amp"] == "bf16" and run.data.params["epochs"] == "4"
    for tag in ("input_uri", "data_fingerprint", "git_commit", "model_config"):
        assert run.data.tags[f"vaepipe.{tag}"], tag
    figs = {os.path.basename(a.path) for a in c.list_artifacts(good.run_id, "figures")}
    assert {"samples_reconstructions.png", "latent_2d.png"} <= figs
    import mlflow

    from pipeline.models.registry import using_tracking

    with using_tracking(tr):   # scoped: a global URI would redirect later jobs in this process
        sig = mlflow.models.get_model_info(f"models:/t3/{good.version}").signature
    assert sig is not None and sig.inputs.to_dict()[0]["tensor-spec"]["shape"][-1] == 64

    # 2. a deliberately worse model (1 epoch, tiny lr) is registered but does not take the alias
    weak = dict(input=digits_parquet, epochs=1, lr=1e-5, model_name="t3", nets_min_gain=-1, workdir=workdir, **TINY)
    worse = run_train(TrainConfig(**weak))
    assert not worse.promoted and current_alias_version("t3", "production", tr) == good.version
    tags = c.get_model_version("t3", worse.version).tags
    assert tags["vaepipe.promotion"] == "kept" and tags["vaepipe.incumbent_version"] == good.version
    new_s, cur_s = float(tags["vaepipe.val_neg_elbo"]), float(tags["vaepipe.incumbent_val_neg_elbo"])
    assert new_s > cur_s                                                      # both figures recorded
    assert f"{new_s:.3f}" in tags["vaepipe.promotion_reason"] and f"{cur_s:.3f}" in tags["vaepipe.promotion_reason"]
    out = capsys.readouterr().out
    assert f"t3 v{worse.version} not promoted" in out

    # 3. --promote force moves the alias anyway; the identical config reproduces the val ELBO exactly
    forced = run_train(TrainConfig(promote="force", **weak))
    assert forced.promoted and current_alias_version("t3", "production", tr) == forced.version
    assert c.get_model_version("t3", forced.version).tags["vaepipe.promotion_reason"] == "--promote force"
    # 1-worker CPU reproducibility: fixed block order (preserve_order, also for materialize()), seeded
    # local shuffle and ε per epoch, validation ε per record. Measured: every metric bitwise equal.
    for k, v in worse.metrics.items():
        if k not in ("epoch_time_s", "samples_per_s"):
            assert forced.metrics[k] == pytest.approx(v, abs=1e-6), k


def test_second_validation_uri_streamed_without_cache(ray_local, digits_parquet, workdir, tmp_path):
    from pipeline.evaluation.datasets import digits, images_table, write_parquet

    x, y = digits()
    val_uri = write_parquet(images_table(x[:300], y[:300]), str(tmp_path / "val"), files=1)
    r = run_train(TrainConfig(input=digits_parquet, val_input=val_uri, cache="off", epochs=2, promote="never",
                              model_name="t3val", workdir=workdir, **TINY))
    run = client(_tracking(workdir)).get_run(r.run_id)
    assert run.data.params["val_input"] == val_uri and run.data.params["cache"] == "off"
    assert r.epochs_run == 2 and math.isfinite(r.metrics["val_neg_elbo"])
    assert not r.promoted


def test_checkpoints_on_an_fsspec_uri_keep_the_best_n_and_the_newest_and_resume_from_it(ray_local, digits_parquet,
                                                                                        workdir):
    """--storage-path s3://… (a local S3 server): Ray Train writes the checkpoints through a pyarrow
    wrapper of the fsspec filesystem and, with --keep-checkpoints 2, deletes the others there; vaepipe
    lists them, keeps its journal there (every epoch, pruned or not), and --resume continues from the
    newest one as a new Ray run in the same run folder."""
    import json

    import boto3
    from moto.server import ThreadedMotoServer

    from pipeline.training.run_store import RunStore

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        so = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing",
              "client_kwargs": {"region_name": "us-east-1"}}
        boto3.client("s3", endpoint_url=so["endpoint_url"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="ckpts")
        common = dict(input=digits_parquet, epochs=3, promote="never", model_name="t3s3", workdir=workdir,
                      storage_path="s3://ckpts/runs", storage_options=json.dumps(so), run_name="s3run",
                      keep_checkpoints=2, checkpoint_interval_s=0, **TINY)   # a checkpoint every epoch
        r = run_train(TrainConfig(**common))
        assert r.run_dir == "s3://ckpts/runs/s3run" and os.path.isfile(r.checkpoint)   # a local copy
        store = RunStore(r.run_dir, so)
        journal = store.journal()
        assert [e["epoch"] for e in journal] == [0, 1, 2] and r.epochs_run == 3          # every epoch journalled
        best_two = sorted(journal, key=lambda e: e["val_neg_elbo"])[:2]
        assert sorted(store.checkpoints()) == sorted({e["epoch"] for e in best_two} | {2})   # the third deleted on S3
        assert len(store.checkpoints()) == 2
        more = run_train(TrainConfig(**(common | {"epochs": 4, "resume": True})))
        assert more.run_id == r.run_id and more.epochs_run == 4
        assert [e["epoch"] for e in store.journal()] == [0, 1, 2, 3]
        assert store.checkpoints()[3].endswith("s3run/resume-1/epoch_0003/checkpoint.pt")
    finally:
        server.stop()


def _linnerud_table(tmp_path) -> tuple[str, list[str]]:
    """scikit-learn's linnerud table (20 records, 6 columns) as Parquet: (folder, feature columns)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_linnerud

    d = load_linnerud()
    x = np.hstack([d.data, d.target]).astype(np.float32)
    cols = [f"c{i}" for i in range(x.shape[1])]
    folder = tmp_path / "linnerud"
    folder.mkdir()
    pq.write_table(pa.table({"id": np.arange(len(x)), **{c: x[:, i] for i, c in enumerate(cols)}}),
                   folder / "part-0.parquet")
    return str(folder), cols


def test_the_best_epoch_outlives_keep_checkpoints_when_validation_worsens_after_it(ray_local, workdir, tmp_path):
    """The linnerud table: the nets overfit from the pPCA start, so the validation -ELBO is best at an
    early epoch and rises after it. With --keep-checkpoints 1 Ray Train keeps that epoch's checkpoint
    (ranked by its -ELBO) besides the newest, and train registers the best epoch, not the last."""
    import numpy as np

    from pipeline.training.run_store import RunStore
    from vae.checkpoint import load_checkpoint

    folder, cols = _linnerud_table(tmp_path)
    r = run_train(TrainConfig(input=folder, features=cols, latent_dim=2, hidden=[16], epochs=6, batch_size=128,
                              workers=1, seed=0, model_name="linnerud", workdir=workdir, keep_checkpoints=1,
                              val_fraction=0.25, checkpoint_interval_s=0))
    journal = RunStore(r.run_dir).journal()
    val = [e["val_neg_elbo"] for e in journal]
    best = int(np.argmin(val))
    assert best < 5 and r.epochs_run == 6              # the premise: validation got worse after the best epoch
    assert sorted(RunStore(r.run_dir).checkpoints()) == [best, 5]
    assert load_checkpoint(r.checkpoint)["epoch"] == best


def test_epochs_shorter_than_the_checkpoint_interval_share_checkpoints_and_train_alike(ray_local, workdir,
                                                                                        tmp_path):
    """Ray Train takes one report per poll of its controller, so the linnerud table's millisecond
    epochs are checkpointed together (--checkpoint-interval-s): fewer checkpoints, yet every epoch in
    the journal (and MLflow) once, the best epoch's checkpoint kept (held until the next report) and
    registered, and the same figures, epoch by epoch, as a run with a checkpoint every epoch."""
    import numpy as np

    from pipeline.training.run_store import RunStore
    from vae.checkpoint import load_checkpoint

    folder, cols = _linnerud_table(tmp_path)
    kw = dict(input=folder, features=cols, latent_dim=2, hidden=[16], epochs=40, batch_size=128, workers=1, seed=0,
              workdir=workdir, keep_checkpoints=40, val_fraction=0.25)
    every = run_train(TrainConfig(model_name="every", checkpoint_interval_s=0, **kw))
    grouped = run_train(TrainConfig(model_name="grouped", checkpoint_interval_s=3600, **kw))
    journal = {"every": RunStore(every.run_dir).journal(), "grouped": RunStore(grouped.run_dir).journal()}
    assert [e["epoch"] for e in journal["grouped"]] == [e["epoch"] for e in journal["every"]] == list(range(40))
    for a, b in zip(journal["every"], journal["grouped"]):
        assert a["val_neg_elbo"] == pytest.approx(b["val_neg_elbo"], rel=1e-6)
        assert a["train_neg_elbo"] == pytest.approx(b["train_neg_elbo"], rel=1e-6)
    best = int(np.argmin([e["val_neg_elbo"] for e in journal["grouped"]]))
    assert best < 39                                    # the premise: the best epoch was held, not the last
    assert sorted(RunStore(every.run_dir).checkpoints()) == list(range(40))
    # an interval longer than the run: the best epochs as they were overtaken need no checkpoint,
    # only the best (held, then reported first) and the last
    assert sorted(RunStore(grouped.run_dir).checkpoints()) == [best, 39]
    assert load_checkpoint(grouped.checkpoint)["epoch"] == best
    steps = [m.step for m in client(_tracking(workdir)).get_metric_history(grouped.run_id, "val_neg_elbo")]
    assert steps == list(range(40))


def test_a_failure_in_a_worker_or_after_fit_closes_the_mlflow_run_as_failed(ray_local, digits_parquet, workdir,
                                                                              tmp_path):
    """A NaN record the up-front sample did not see fails a train worker: the BadRecordError comes
    out of Ray Train as itself. A failure after fit (registering under an alias MLflow refuses)
    closes the MLflow run as FAILED too, never leaving it RUNNING."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.runtime.errors import BadRecordError
    from pipeline.table.features import fixed_size_list

    t = pq.read_table(digits_parquet)
    img = t.column("image").combine_chunks()
    x = img.flatten().to_numpy().reshape(len(t), -1).astype(np.float32)
    x[1500, 3] = np.nan
    bad = str(tmp_path / "nan")
    os.makedirs(bad)
    t = t.set_column(t.schema.get_field_index("image"), "image", fixed_size_list(x))
    pq.write_table(t.slice(0, 1000), os.path.join(bad, "part-0.parquet"))   # the sample comes from here
    pq.write_table(t.slice(1000), os.path.join(bad, "part-1.parquet"))
    c = client(_tracking(workdir))
    with pytest.raises(BadRecordError, match=r"NaN or inf features in 1 record\(s\), e.g. id=1500"):
        run_train(TrainConfig(input=bad, epochs=1, sample_rows=100, val_fraction=0, model_name="nan", workdir=workdir,
                              max_failures=0, **TINY))
    runs = c.search_runs([c.get_experiment_by_name("vaepipe").experiment_id], "attributes.run_name LIKE 'nan-%'")
    assert [r.info.status for r in runs] == ["FAILED"]

    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):   # MLflow reserves the alias "latest"
        run_train(TrainConfig(input=digits_parquet, epochs=1, model_name="badalias", alias="latest",
                              promote="force", workdir=workdir, **TINY))
    runs = c.search_runs([c.get_experiment_by_name("vaepipe").experiment_id], "attributes.run_name LIKE 'badalias-%'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_journal_lines_reach_mlflow_live_once_each_whole_only_and_after_a_failure(tmp_path, empty_mlflow_db):
    """The driver, not rank 0, logs the epochs to MLflow: it follows the run journal (no Ray needed
    here: the lines are appended as rank 0 appends them). Each line reaches MLflow while the block
    runs, once, with its epoch as the step and its time as the timestamp; a line still being written
    waits; a second driver over the same run (--resume) logs only the lines after the counted ones; a
    failure inside the block still gets the lines before it logged and propagates itself."""
    import time

    from pipeline.models.registry import experiment_id
    from pipeline.training.run_store import RunStore
    from pipeline.training.train import JOURNAL_LOGGED_TAG, journal_to_mlflow

    empty_mlflow_db(str(tmp_path))
    tr = _tracking(str(tmp_path))
    c = client(tr)
    run_id = c.create_run(experiment_id(tr, "journal")).info.run_id
    store = RunStore(str(tmp_path / "run"))
    store.fs.makedirs(store.path, exist_ok=True)
    line = lambda epoch: {"epoch": epoch, "phase": "vae", "time": 1_000.0 + epoch, "attempt": 0, "world_size": 2,
                          "train_neg_elbo": 50.0 - epoch, "lr": 1e-3}
    history = lambda key="train_neg_elbo": [(m.step, m.value, m.timestamp) for m in c.get_metric_history(run_id, key)]

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 30
        while len(history()) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    with journal_to_mlflow(store, run_id, tr, every_s=0.05):
        store.append_journal(line(0))
        wait_for(1)
        assert history() == [(0, 50.0, 1_000_000)]                      # live, before training ends
        text = (json.dumps(line(1)) + "\n").encode()
        with open(store.join(store.JOURNAL), "ab") as f:              # rank 0 half-way through a line
            f.write(text[:20])
            f.flush()
            time.sleep(0.5)
            assert len(store.journal()) == 1 and [s for s, _, _ in history()] == [0]
            f.write(text[20:])
    assert [(s, v) for s, v, _ in history()] == [(0, 50.0), (1, 49.0)]
    assert [m.step for m in c.get_metric_history(run_id, "lr")] == [0, 1]
    tags = c.get_run(run_id).data.tags
    assert tags[JOURNAL_LOGGED_TAG] == "2" and tags["vaepipe.world_size"] == "2"

    store.append_journal(line(2))
    with journal_to_mlflow(store, run_id, tr, every_s=60):            # a --resume's driver: line 2 only
        pass
    store.append_journal(line(3))
    with pytest.raises(RuntimeError, match="worker group lost"):
        with journal_to_mlflow(store, run_id, tr, every_s=60):
            raise RuntimeError("worker group lost")
    assert [s for s, _, _ in history()] == [0, 1, 2, 3]
    assert c.get_run(run_id).data.tags[JOURNAL_LOGGED_TAG] == "4"

    # a run from before the count existed: its workers logged its lines themselves, none is logged again
    old = c.create_run(experiment_id(tr, "journal")).info.run_id
    with journal_to_mlflow(store, old, tr, every_s=60):
        pass
    assert c.get_metric_history(old, "train_neg_elbo") == []


def test_a_collapsed_model_is_registered_never_promoted_and_train_says_why(ray_local, digits_parquet, workdir):
    # β = 200 pushes every latent unit of the Bernoulli model (no pPCA-started linear path) to the
    # prior: μ constant, nothing kept, the case. Even --promote force
    # (and an empty alias, which any first version would take) must not put it into production.
    tr = _tracking(workdir)
    from pipeline.runtime.errors import CollapseError

    with pytest.raises(CollapseError, match=r"0 of 2 latent units active.*--beta \(now 200\).*--free-bits") as e:
        run_train(TrainConfig(input=digits_parquet, epochs=3, beta=200, likelihood="bernoulli", promote="force",
                              model_name="flat",
                              workdir=workdir, **TINY))
    assert e.value.exit_code == 4
    assert current_alias_version("flat", "production", tr) is None
    v = client(tr).get_model_version("flat", "1")
    assert v.tags["vaepipe.promotion"] == "kept" and "posterior collapse" in v.tags["vaepipe.promotion_reason"]


def _ppca_table(tmp_path, labels: bool = False):
    """A table that is pPCA exactly (a linear map of 2 Gaussian latents plus noise), 1,200 records of 8
    columns; with `labels`, a column y (the first latent's sign) on 40 of them, null on the rest."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    g = np.random.default_rng(0)
    z = g.standard_normal((1200, 2))
    x = (z @ g.standard_normal((2, 8)) + 0.5 * g.standard_normal((1200, 8))).astype(np.float32)
    folder = tmp_path / "linear"
    folder.mkdir()
    cols = [f"c{i}" for i in range(8)]
    y = {"y": pa.array([int(v > 0) if i < 40 else None for i, v in enumerate(z[:, 0])], pa.int64())} if labels else {}
    pq.write_table(pa.table({"id": np.arange(1200), **{c: x[:, i] for i, c in enumerate(cols)}, **y}),
                   folder / "part-0.parquet")
    return folder, cols, x


def _assert_elbos_are_the_registered_models(r, model, folder, cols, labels=None):
    """The ELBOs a run reports (and `train` prints) are the registered model's on its training and
    validation parts (the same content-hash split), not the dropped nets' training-epoch figures."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.table.features import infer_spec, split_table, to_matrix
    from vae.train_step import evaluate

    table = pq.read_table(folder)
    spec = infer_spec(table.schema, cols)
    for part, want_val in (("train", False), ("val", True)):
        records = torch.from_numpy(to_matrix(split_table(table, spec, 0.1, want_val=want_val, labels=labels), spec))
        stats, _ = evaluate(model, [records], seed=0)
        assert r.metrics[f"{part}_neg_elbo"] == pytest.approx(stats.means()["neg_elbo"], rel=1e-4), part


def test_nets_that_do_not_beat_ppca_are_dropped_and_the_registered_model_round_trips_like_pca(ray_local, workdir,
                                                                                                tmp_path):
    """A pPCA table: the nets have nothing to add. The run checks them after its epochs (MLflow figures
    at the step after the last epoch), registers its pPCA start, and the registered model's round
    trip, with the map fitted after training, is PCA's projection."""
    import numpy as np
    import torch
    from sklearn.decomposition import PCA

    from pipeline.training.run_store import RunStore
    from vae.checkpoint import load_checkpoint, model_from_checkpoint

    folder, cols, x = _ppca_table(tmp_path)
    r = run_train(TrainConfig(input=str(folder), features=cols, latent_dim=2, hidden=[16], epochs=5, batch_size=128,
                              workers=1, seed=0, model_name="linear", workdir=workdir))
    assert [e["phase"] for e in RunStore(r.run_dir).journal()] == ["vae"] * 5 and r.epochs_run == 5
    assert r.metrics["nets_kept"] == 0.0
    assert r.metrics["val_round_trip_mse"] > 0.95 * r.metrics["val_linear_round_trip_mse"]   # the trained nets' figure
    history = client(_tracking(workdir)).get_metric_history(r.run_id, "nets_kept")
    assert [(m.step, m.value) for m in history] == [(5, 0.0)]
    model = model_from_checkpoint(load_checkpoint(r.checkpoint))
    xt = torch.from_numpy(x)
    full, lin = model.round_trip_errors(model.preprocess(xt))
    assert torch.allclose(full, lin, atol=1e-4)                          # the nets add nothing: the pPCA start
    z = model.preprocess(xt).numpy()                                      # standardised, as the model sees it
    pca = PCA(2).fit(z)
    ours = model.preprocess(model.reconstruct(model.embed(xt).mean)).numpy()
    assert np.mean((ours - z) ** 2) == pytest.approx(np.mean((pca.inverse_transform(pca.transform(z)) - z) ** 2),
                                                     rel=1e-3)
    _assert_elbos_are_the_registered_models(r, model, folder, cols)


def test_with_labels_nets_dropped_before_the_head_report_the_registered_models_elbos(ray_local, workdir, tmp_path):
    """With --labels the workers check the nets before the head trains (their figures ride in the head
    checkpoints): when they drop them, the ELBOs reported are the pPCA start's on both parts too."""
    import torch

    from vae.checkpoint import load_checkpoint, model_from_checkpoint

    folder, cols, x = _ppca_table(tmp_path, labels=True)
    r = run_train(TrainConfig(input=str(folder), features=cols, labels="y", latent_dim=2, hidden=[16], epochs=3,
                              head_epochs=2, batch_size=128, workers=1, seed=0, model_name="linear_y",
                              workdir=workdir))
    assert r.metrics["nets_kept"] == 0.0 and r.epochs_run == 5
    model = model_from_checkpoint(load_checkpoint(r.checkpoint))
    full, lin = model.round_trip_errors(model.preprocess(torch.from_numpy(x)))
    assert torch.allclose(full, lin, atol=1e-4)                          # the pPCA start, as registered
    _assert_elbos_are_the_registered_models(r, model, folder, cols, labels="y")


def test_no_linear_path_trains_the_nets_alone_from_their_seeded_start(ray_local, workdir, tmp_path):
    """--no-linear-path: no pPCA start and so no nets' check; the models of two seeds differ (with the
    pPCA start both begin at the same exact pPCA), which is what an ensemble of --score-models needs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from vae.checkpoint import load_checkpoint, model_from_checkpoint

    g = np.random.default_rng(0)
    x = (g.standard_normal((400, 2)) @ g.standard_normal((2, 6)) + 0.5 * g.standard_normal((400, 6))).astype(np.float32)
    folder = tmp_path / "nets"
    folder.mkdir()
    cols = [f"c{i}" for i in range(6)]
    pq.write_table(pa.table({"id": np.arange(400), **{c: x[:, i] for i, c in enumerate(cols)}}), folder / "part-0.parquet")
    mus = []
    for seed in (0, 1):
        r = run_train(TrainConfig(input=str(folder), features=cols, latent_dim=2, hidden=[16], epochs=2, batch_size=64,
                                  workers=1, seed=seed, linear_path=False, model_name=f"nets{seed}", workdir=workdir))
        assert "nets_kept" not in r.metrics
        model = model_from_checkpoint(load_checkpoint(r.checkpoint))
        assert not model.config.linear_path and model.config.calibrated
        mus.append(model.embed(torch.from_numpy(x)).mean)
    assert not torch.allclose(mus[0], mus[1], atol=1e-2)
