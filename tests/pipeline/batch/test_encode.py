"""Encode on every kind of store the job promises without S3 (local, memory://), hive partitions as
columns and folders, and the provenance every output file carries. Real local Ray and MLflow store."""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch.decode import DecodeConfig, run_decode
from pipeline.batch.encode import EncodeConfig, run_encode
from pipeline.runtime.errors import ConfigError
from pipeline.table.parquet_io import read_manifest
from pipeline.table.uris import Location, resolve

from committed_io import committed, mu

MODEL = "models:/digits@production"


@pytest.fixture(scope="module")
def local_latents(trained_digits, digits_parquet, workdir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local") / "lat")
    run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=out, keep=["id"], concurrency=1, workdir=workdir))
    return committed(out).sort_by("id")


def digits_in_memory(digits_parquet: str) -> tuple[str, Location]:
    """A new memory:// root holding the digits files under in/ (memory:// is per process)."""
    root = f"memory://vaepipe-{uuid.uuid4().hex[:8]}"
    mem = resolve(root)
    for f in sorted(os.listdir(digits_parquet)):
        mem.fs.put_file(os.path.join(digits_parquet, f), f"{mem.path}/in/{f}")
    return root, mem


def test_memory_store_encodes_and_decodes_in_process_like_local(trained_digits, digits_parquet, workdir, local_latents):
    """memory:// is per process, so the job runs its units in the driver (documented fallback):
    the rows and μ equal the local Ray Data run, and decode back to memory:// works too."""
    root, mem = digits_in_memory(digits_parquet)
    r = run_encode(EncodeConfig(model=MODEL, input=f"{root}/in", output=f"{root}/lat", keep=["id"], workdir=workdir))
    t = committed(f"{root}/lat").sort_by("id")
    assert (r.rows_in, r.rows_out, t.num_rows) == (1797, 1797, 1797)
    assert t.column("id").equals(local_latents.column("id"))
    np.testing.assert_allclose(mu(t), mu(local_latents), rtol=0, atol=1e-6)
    m = run_decode(DecodeConfig(model=MODEL, input=f"{root}/lat", output=f"{root}/rec", workdir=workdir))
    rec = committed(f"{root}/rec")
    assert m["rows"] == rec.num_rows == 1797 and rec.schema.field("image").type == pa.list_(pa.float32(), 64)
    assert not mem.fs.exists(f"{mem.path}/_lat.vaepipe/staging") and not mem.fs.exists(f"{mem.path}/_rec.vaepipe/staging")


def test_use_gpu_in_this_process_without_a_gpu_is_an_error_not_a_cpu_run(trained_digits, digits_parquet, workdir,
                                                                         tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # as on CI; a GPU host too
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    root, _ = digits_in_memory(digits_parquet)
    for inp, out, kw, hint in [(f"{root}/in", f"{root}/lat", {}, "memory:// lives in this process"),
                               (digits_parquet, str(tmp_path / "lat"), {"executor": "local"}, "--executor ray")]:
        with pytest.raises(ConfigError, match=r"--use-gpu: this process sees no CUDA GPU") as e:
            run_encode(EncodeConfig(model=MODEL, input=inp, output=out, use_gpu=True, workdir=workdir, **kw))
        assert hint in str(e.value)
        o = resolve(out)   # nothing written: no output, no staging left behind
        parent, name = o.path.rsplit("/", 1)
        assert not o.fs.exists(o.path) and not o.fs.exists(f"{parent}/_{name}.vaepipe/staging")


def test_hive_partitions_stay_folders_and_every_file_names_its_model(trained_digits, digits_parquet, workdir, tmp_path):
    src = tmp_path / "in"
    files = sorted(f for f in os.listdir(digits_parquet) if f.endswith(".parquet"))
    days = {}
    for i, f in enumerate(files):
        day = f"2026-01-0{i + 1}"
        (src / f"date={day}").mkdir(parents=True)
        shutil.copy(os.path.join(digits_parquet, f), src / f"date={day}" / "part.parquet")
        days[day] = pq.read_table(os.path.join(digits_parquet, f)).column("id").to_pylist()
    out = tmp_path / "out"
    r = run_encode(EncodeConfig(model=MODEL, input=str(src), output=str(out), logvar=True, score=True,
                                concurrency=1, workdir=workdir))
    assert r.rows_out == 1797
    manifest = read_manifest(resolve(str(out)))
    assert sorted({posixpath.dirname(f["path"]) for f in manifest["files"]}) == [f"date={d}" for d in sorted(days)]
    for f in manifest["files"]:
        path = out / f["path"]
        t = pq.read_table(path, partitioning=None)
        day = posixpath.dirname(f["path"]).split("=", 1)[1]
        assert "date" not in t.schema.names                                     # the folder holds the value…
        assert sorted(t.column("id").to_pylist()) == sorted(days[day])          # rows stay in their partition
        assert {"mu", "logvar", "score"} <= set(t.schema.names)
        assert np.isfinite(t.column("score").to_numpy()).all()
        # floats go in plain pages (a dictionary of distinct values only costs); the ids keep theirs
        chunks = pq.ParquetFile(path).metadata.row_group(0)
        dictionary = {chunks.column(i).path_in_schema.split(".")[0]: "RLE_DICTIONARY" in chunks.column(i).encodings
                      for i in range(chunks.num_columns)}
        assert dictionary == {"id": True, "mu": False, "logvar": False, "score": False}, dictionary
        md = pq.read_schema(path).metadata
        assert md[b"vaepipe.model_name"] == b"digits"
        assert md[b"vaepipe.model_version"].decode() == str(trained_digits.version)
        assert md[b"vaepipe.model_run_id"].decode() == trained_digits.run_id and len(trained_digits.run_id) > 0
        assert md[b"vaepipe.source_file"].decode().endswith(f"date={day}/part.parquet")


def test_storage_options_must_be_a_json_object(workdir):
    with pytest.raises(ConfigError, match="storage_options: expected a JSON object"):
        EncodeConfig(model=MODEL, input="a", output="b", storage_options="endpoint=x", workdir=workdir)


def test_decode_reference_reports_round_trip_mse_next_to_pca_through_the_cli(trained_digits, digits_parquet, workdir,
                                                                              tmp_path, capsys):
    """`vaepipe decode --reference ORIGINAL` prints reconstruction MSE (model input units, x/255) and
    PCA with k = latent size; both checked against an independent computation here."""
    import torch

    from jobs.cli import run_job
    from pipeline.evaluation.datasets import digits
    from vae.checkpoint import load_checkpoint, model_from_checkpoint

    lat, rec = str(tmp_path / "lat"), str(tmp_path / "rec")
    r8 = run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=lat, dtype="int8", concurrency=1,
                                 workdir=workdir))
    assert run_job("decode", ["--model", MODEL, "--input", lat, "--output", rec, "--reference", digits_parquet,
                              "--concurrency", "1", "--workdir", workdir]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("round trip")][0]
    assert "over 1,797 records (fixed_size_list<element: int8>[4] latents, 4 dims)" in line
    vae_mse, pca_mse = float(line.split("MSE ")[1].split()[0]), float(line.split("PCA-4 ")[1].split()[0])
    # independent figures: PCA residual = discarded eigenvalues / D; the VAE's E[x|z] at the dequantised μ
    x, _ = digits()
    xs = x.reshape(len(x), -1).astype(np.float64) / 255.0
    ev = np.linalg.eigvalsh(np.cov(xs, rowvar=False, bias=True))[::-1]
    assert pca_mse == pytest.approx(ev[4:].sum() / xs.shape[1], rel=1e-4)
    model = model_from_checkpoint(load_checkpoint(trained_digits.checkpoint))
    scale = np.asarray(json.loads(pq.read_schema(os.path.join(lat, read_manifest(resolve(lat))["files"][0]["path"]))
                                  .metadata[b"vaepipe.int8_scale"]), np.float32)
    z = mu(committed(lat).sort_by("id")) * scale
    y = model.reconstruct(torch.from_numpy(z)).numpy() / 255.0
    assert vae_mse == pytest.approx(float(((y - xs) ** 2).mean()), rel=1e-3)
    # the linear (pPCA) part alone, from its weights: μ = A·x + a, x̂ = clip(W·μ + b) in [0, 1] pixels
    lin_mse = float(line.split("linear part alone ")[1].split()[0])
    lat_dim = model.config.latent_dim
    a, a0 = (t.detach().double().numpy() for t in (model.linear_encoder.weight[:lat_dim], model.linear_encoder.bias[:lat_dim]))
    w, b = (t.detach().double().numpy() for t in (model.linear_decoder.weight, model.linear_decoder.bias))
    xm = model.preprocess(torch.from_numpy(x.reshape(len(x), -1).astype(np.float32))).double().numpy()
    assert lin_mse == pytest.approx(float(((np.clip((xm @ a.T + a0) @ w.T + b, 0, 1) - xm) ** 2).mean()), rel=1e-3)
    # the int8 error the run reports (result and manifest) is the error on every record it wrote,
    # checked against μ in float32 from an fp32 encode of the same records
    f32 = mu(committed(run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=str(tmp_path / "f32"),
                                                 concurrency=1, workdir=workdir)).output).sort_by("id"))
    err = r8.int8_error
    assert err == read_manifest(resolve(lat))["int8_error"] and err["values"] == f32.size
    assert err["rmse"] == pytest.approx(float(np.sqrt(((z - f32) ** 2).mean())), rel=1e-3)
    assert err["relative_rmse"] == pytest.approx(err["rmse"] / float(np.sqrt((f32 ** 2).mean())), rel=1e-6)
    assert err["clipped_fraction"] == pytest.approx(float((np.abs(f32) > 127 * scale).mean()), abs=1e-6)


def test_decode_pca_fit_scores_pca_fit_on_other_records_not_on_the_reference(trained_digits, digits_parquet, workdir,
                                                                               tmp_path, capsys):
    """`decode --reference HELD_OUT --pca-fit TRAIN`: the PCA baseline is fit on TRAIN and scored on the
    held-out records, as the VAE is; fit on the 300 held-out records themselves it is lower (in-sample)."""
    from sklearn.decomposition import PCA

    from jobs.cli import run_job

    t = pq.read_table(digits_parquet)
    held, train = str(tmp_path / "held"), str(tmp_path / "train")
    for folder, rows in ((held, np.arange(300)), (train, np.arange(300, len(t)))):
        os.makedirs(folder)
        pq.write_table(t.take(rows), os.path.join(folder, "part-0.parquet"))
    lat, rec = str(tmp_path / "lat"), str(tmp_path / "rec")
    run_encode(EncodeConfig(model=MODEL, input=held, output=lat, concurrency=1, workdir=workdir))
    assert run_job("decode", ["--model", MODEL, "--input", lat, "--output", rec, "--reference", held,
                              "--pca-fit", train, "--concurrency", "1", "--workdir", workdir]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("round trip")][0]
    assert f"(fit on {train}; ratio " in line
    pca_mse = float(line.split("PCA-4 ")[1].split()[0])
    image = lambda tab: np.stack(tab.column("image").to_numpy(zero_copy_only=False)).astype(np.float64) / 255.0  # noqa: E731
    xh, xt = image(t.take(np.arange(300))), image(t.take(np.arange(300, len(t))))
    pca = PCA(4, random_state=0).fit(xt)
    assert pca_mse == pytest.approx(float(((pca.inverse_transform(pca.transform(xh)) - xh) ** 2).mean()), rel=1e-4)
    in_sample = PCA(4, random_state=0).fit(xh)
    assert pca_mse > float(((in_sample.inverse_transform(in_sample.transform(xh)) - xh) ** 2).mean())
    with pytest.raises(ConfigError, match="give --reference too"):
        DecodeConfig(model=MODEL, input=lat, output=rec, pca_fit=train, workdir=workdir)


def test_auto_executor_stays_in_process_beside_the_one_node_ray_it_started(ray_local, tmp_path):
    """A small local job after a train in the same process (the demo, a notebook, these tests): the
    Ray this process started has the same cores, so actors would add only their start-up. A Ray the
    process joined or --concurrency still take the actor pool; size does not (the local executor runs
    an encoder thread per core: at 10 M records it beat the one-node pool, docs/performance.md)."""
    from pipeline.runtime import ray_runtime
    from pipeline.batch.encode import Unit, choose_executor

    assert ray_runtime.started_local()   # tests/conftest.py's ray_local: init_ray("local")
    loc, out = resolve(str(tmp_path / "in")), resolve(str(tmp_path / "out"))
    units = [Unit(0, "a.parquet", "a.parquet", [0], 1797)]
    cfg = EncodeConfig(model=MODEL, input=loc.path, output=out.path)
    executor, why = choose_executor(cfg, loc, out, units, record_bytes=64)
    assert executor == "local" and "beside its own one-node Ray" in why
    assert choose_executor(EncodeConfig(model=MODEL, input=loc.path, output=out.path, concurrency=1),
                           loc, out, units, 64)[0] == "ray"
    big = [Unit(i, f"{i}.parquet", f"{i}.parquet", [0], 524_288) for i in range(20)]   # 10 M MNIST images
    assert choose_executor(cfg, loc, out, big, record_bytes=784) == (
        "local", "8.22 GB of local features: in this process, beside its own one-node Ray")


def test_one_encoder_running_units_in_several_threads_at_once_writes_what_separate_ones_do(
        trained_digits, digits_parquet, workdir, tmp_path, monkeypatch):
    """A GPU actor of the pool runs several units at once on one UnitEncoder (one model on the GPU):
    here every thread of the local executor gets the same encoder, 3 units on 3 threads, int8
    latents (the per-unit error sums are the state that must not be shared), and the output and
    its reported int8 error equal a run with an encoder per thread."""
    import torch

    from pipeline.batch import encode as enc

    def run(out: str):
        threads = torch.get_num_threads()
        torch.set_num_threads(3)        # the local executor runs one thread per torch thread
        try:
            return run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=out, dtype="int8", executor="local",
                                           workdir=workdir))
        finally:
            torch.set_num_threads(threads)

    ref = run(str(tmp_path / "separate"))
    made, real = [], enc.UnitEncoder
    monkeypatch.setattr(enc, "UnitEncoder", lambda blob, plan: made[0] if made else made.append(real(blob, plan)) or made[0])
    shared = run(str(tmp_path / "shared"))
    assert len(made) == 1 and shared.files == ref.files == 3
    a, b = committed(ref.output).sort_by("id"), committed(shared.output).sort_by("id")
    assert a.column("id").equals(b.column("id")) and np.array_equal(mu(a), mu(b))
    assert shared.int8_error == ref.int8_error and shared.int8_error["values"] == 1797 * mu(a).shape[1]


GPU_POOL = """
import json, logging, sys
import ray
from pipeline.batch.encode import EncodeConfig, run_encode
logging.basicConfig(format="%(message)s")
logging.getLogger("pipeline").setLevel(logging.INFO)   # the pool's sizing lines
cfg = json.loads(sys.argv[1])
# a GPU resource declared on this CPU machine: Ray schedules the pool as on a 2-CPU + 1-GPU node
# (one GPU actor, 2 units at once); torch sees no CUDA, so the encoders run on the CPU
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, address="local")
r = run_encode(EncodeConfig(executor="ray", use_gpu=True, dtype="int8", **cfg))
print(json.dumps({"files": r.files, "int8_error": r.int8_error}))
"""


@pytest.mark.slow
def test_gpu_pool_runs_units_at_once_in_its_actor_and_writes_what_the_cpu_path_does(
        trained_digits, digits_parquet, workdir, tmp_path):
    """The pool on a GPU node: one actor per GPU, as many units at once as the node has CPUs per GPU
    (threads on one UnitEncoder). Checked on a Ray whose node declares a GPU (this machine has none):
    Ray's scheduling, the threaded actor and the output are real; the GPU's speed is not measured
    here (docs/performance.md has the H200 figures of the in-process path)."""
    import subprocess
    import sys

    ref = run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=str(tmp_path / "ref"), dtype="int8",
                                  executor="local", workdir=workdir))
    cfg = {"model": MODEL, "input": digits_parquet, "output": str(tmp_path / "pool"), "workdir": workdir}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-c", GPU_POOL, json.dumps(cfg)], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "encode: 1 GPU actor (" in p.stderr and "encode: 2 units at once in each GPU actor" in p.stderr, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    a, b = committed(ref.output).sort_by("id"), committed(str(tmp_path / "pool")).sort_by("id")
    assert got["files"] == ref.files == 3 and got["int8_error"] == ref.int8_error
    assert a.column("id").equals(b.column("id")) and np.array_equal(mu(a), mu(b))


def test_auto_executor_with_gpus(tmp_path, monkeypatch):
    """One GPU here: the job stays in this process (encoder threads decode Parquet and share the GPU);
    several: one Ray actor per GPU; --use-gpu with none visible here: GPU actors on the cluster.
    torch's GPU count is set by hand (this machine has none) for the 1- and 2-GPU cases."""
    import torch

    from pipeline.batch.encode import Unit, choose_executor

    loc, out = resolve(str(tmp_path / "in")), resolve(str(tmp_path / "out"))
    units = [Unit(0, "a.parquet", "a.parquet", [0], 1797)]
    cfg = lambda **kw: EncodeConfig(model=MODEL, input=loc.path, output=out.path, **kw)
    if not torch.cuda.is_available():
        assert choose_executor(cfg(use_gpu=True), loc, out, units, 64) == (
            "ray", "--use-gpu and no GPU visible to this process: GPU actors on the cluster")
        assert choose_executor(cfg(), loc, out, units, 64)[0] == "local"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert choose_executor(cfg(use_gpu=True), loc, out, units, 64)[0] == "local"
    assert choose_executor(cfg(), loc, out, units, 64)[0] == "local"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_executor(cfg(), loc, out, units, 64) == ("ray", "2 GPUs here: one actor each")
    assert choose_executor(cfg(use_gpu=False), loc, out, units, 64)[0] == "local"   # --no-use-gpu: CPU threads


class _FakeEncoder:
    """Stands in for UnitEncoder in each_unit: records which thread ran which unit; fails on `fail`."""

    def __init__(self, fail: int | None = None, delay: float = 0.05):
        self.fail, self.delay, self.ran = fail, delay, []

    def run_unit(self, unit: dict) -> dict:
        import threading
        import time

        self.ran.append((unit["index"], threading.current_thread().name))
        time.sleep(self.delay)      # long enough that every thread gets units
        if unit["index"] == self.fail:
            raise ValueError(f"unit {unit['index']} is bad")
        return {"unit": unit["index"], "rows": unit["rows"], "skipped": 0}


def _units(n: int):
    from pipeline.batch.encode import Unit

    return [Unit(index=i, file=f"f{i}.parquet", rel=f"f{i}.parquet", row_groups=[0], rows=10 + i) for i in range(n)]


def test_local_units_run_on_every_encoder_thread_and_come_back_in_unit_order():
    from pipeline.batch.encode import each_unit

    encs, seen = [_FakeEncoder(), _FakeEncoder()], []
    res = each_unit(encs, _units(8), seen.append)
    assert [r["unit"] for r in res] == list(range(8))              # unit order, whatever finished first
    assert sorted(r["unit"] for r in seen) == list(range(8))       # done() once per unit
    assert all(e.ran for e in encs)                                 # both encoders worked
    assert sorted(i for e in encs for i, _ in e.ran) == list(range(8))   # each unit once
    assert {t for e in encs for _, t in e.ran} == {"vaepipe-unit-0", "vaepipe-unit-1"}


def test_a_failing_local_unit_stops_the_other_threads_and_is_raised_after_they_end():
    """The error is the unit's own; no unit starts after it; no encoder thread still runs (the caller
    aborts the commit next, and nothing may write after that)."""
    import threading

    from pipeline.batch.encode import each_unit

    encs = [_FakeEncoder(fail=1), _FakeEncoder(fail=1)]
    with pytest.raises(ValueError, match="unit 1 is bad"):
        each_unit(encs, _units(40), lambda r: None)
    started = sorted(i for e in encs for i, _ in e.ran)
    assert len(started) < 40 and max(started) <= 3, started    # unit 1 fails on the second or third take
    assert not [t for t in threading.enumerate() if t.name.startswith("vaepipe-unit-")]


def test_one_encoder_runs_the_units_in_order_in_the_calling_thread():
    import threading

    from pipeline.batch.encode import each_unit

    enc = _FakeEncoder(delay=0)
    res = each_unit([enc], _units(3), lambda r: None)
    assert [r["unit"] for r in res] == [0, 1, 2]
    assert enc.ran == [(i, threading.current_thread().name) for i in range(3)]


def test_embedding_is_mu_in_the_models_metric_and_query_and_duckdb_search_it_alike(trained_digits, digits_parquet,
                                                                                    workdir, tmp_path):
    """`--embedding` writes μ·F (the model's latent metric, fitted by `train`) beside μ; `query --column
    embedding` and DuckDB's array_distance on the same column find the same neighbours."""
    import duckdb
    import torch

    from pipeline.models.registry import load_model_bytes
    from pipeline.search.query import QueryConfig, run_query
    from pipeline.table.parquet_io import list_parquet_files
    from vae.checkpoint import load_checkpoint, model_from_checkpoint

    out = str(tmp_path / "lat")
    cfg = EncodeConfig(model=MODEL, input=digits_parquet, output=out, keep=["id", "label"], embedding=True,
                       executor="local", workdir=workdir)
    run_encode(cfg)
    t = committed(out).sort_by("id")
    model = model_from_checkpoint(load_checkpoint(load_model_bytes(MODEL, cfg.resolved_tracking_uri())[1]))
    assert not torch.equal(model.metric_factor, torch.eye(4))              # train fitted a metric
    emb = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    np.testing.assert_allclose(emb, model.embedding(torch.from_numpy(mu(t))).numpy(), rtol=1e-5, atol=1e-6)
    q = run_query(QueryConfig(latents=out, id=["7"], k=5, column="embedding", workdir=workdir))
    assert "mu" not in q.column_names and "label" in q.column_names         # μ is not carried as a kept column
    duck = duckdb.connect().execute("""
        WITH t AS (SELECT id, embedding::FLOAT[4] AS e FROM read_parquet($files))
        SELECT id FROM t WHERE id != 7
        ORDER BY array_distance(e, (SELECT e FROM t WHERE id = 7)), id LIMIT 5""",
                                    {"files": list_parquet_files(resolve(out))}).fetchall()
    assert [r["id"] for r in q.to_pylist()] == [r[0] for r in duck]


def test_embedding_beside_an_int8_mu_is_float16_and_agrees_with_the_float32_run(trained_digits, digits_parquet, workdir):
    root, _ = digits_in_memory(digits_parquet)
    for dtype in ("float32", "int8"):
        run_encode(EncodeConfig(model=MODEL, input=f"{root}/in", output=f"{root}/{dtype}", embedding=True, dtype=dtype,
                                workdir=workdir))
    full, small = (committed(f"{root}/{d}").sort_by("id") for d in ("float32", "int8"))
    assert small.schema.field("embedding").type == pa.list_(pa.float16(), 4)
    assert full.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    a, b = (t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
            for t in (full, small))
    np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3)                 # from the exact μ, then rounded
